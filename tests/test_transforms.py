"""OpenCV decode (full and reduced), the albumentations presets and on-device normalisation."""
from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from maskdist.data import transforms
from maskdist.errors import MaskdistError


def _jpeg(h: int, w: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    # smooth content so JPEG round trips stay close to the source
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    rgb = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes(), rgb


def test_jpeg_size_reads_the_frame_header():
    data, _ = _jpeg(341, 256)
    assert transforms.jpeg_size(data) == (341, 256)
    assert transforms.jpeg_size(b"not a jpeg") is None


def test_decode_is_rgb():
    data, rgb = _jpeg(64, 48)
    out = transforms.decode_jpeg(data)
    assert out.shape == (64, 48, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 4  # RGB, not BGR


@pytest.mark.parametrize("stored,target,expected", [
    ((512, 384), (224, 224), (512, 384)),   # 384/2 < 224: full decode
    ((512, 384), (150, 150), (256, 192)),   # half still covers the target
    ((512, 384), (96, 64), (128, 96)),      # quarter
    ((512, 384), (40, 40), (64, 48)),       # eighth
    ((341, 256), (224, 224), (341, 256)),
    ((341, 256), (100, 100), (171, 128)),   # libjpeg rounds up
])
def test_reduced_decode_size(stored, target, expected):
    data, _ = _jpeg(*stored)
    out = transforms.decode_jpeg(data, target)
    assert out.shape[:2] == expected
    assert out.shape[0] >= target[0] and out.shape[1] >= target[1]


def test_reduced_decode_matches_full_decode_downscaled():
    data, _ = _jpeg(512, 384)
    half = transforms.decode_jpeg(data, (200, 150)).astype(float)
    full = cv2.resize(transforms.decode_jpeg(data), (192, 256), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(half - full).mean() < 3


@pytest.mark.parametrize("preset", transforms.PRESETS)
def test_presets_give_uint8_chw_of_the_crop_size(preset):
    t = transforms.build_transform(preset)
    data, _ = _jpeg(341, 256)
    for out in (t(transforms.decode_jpeg(data, t.decode_target)), t.from_jpeg(data)):
        assert out.dtype == np.uint8 and out.shape == (3, 150, 150) and out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("stored,resize,crop", [((341, 256), 224, 150), ((299, 224), 224, 150), ((224, 224), 224, 150),
                                                ((512, 384), (120, 100), 64), ((120, 100), (120, 100), 64),
                                                ((512, 384), 224, None), ((40, 30), None, (20, 10)),
                                                ((40, 30), None, None)])
@pytest.mark.parametrize("preset", ["recipe", "none"])
def test_fast_path_equals_the_albumentations_pipeline(preset, stored, resize, crop):
    t = transforms.build_transform(preset, resize=resize, crop=crop)
    data, _ = _jpeg(*stored)
    expected = t(transforms.decode_jpeg(data, t.decode_target))
    np.testing.assert_array_equal(t.from_jpeg(data), expected)
    # written into a batch slot: the same pixels
    slot = np.full((2, *expected.shape), 7, np.uint8)
    assert np.shares_memory(t.from_jpeg(data, out=slot[1]), slot[1])
    np.testing.assert_array_equal(slot[1], expected)
    assert (slot[0] == 7).all()


def test_a_same_size_resize_is_an_exact_copy():
    # why from_jpeg may skip the resize of an image stored at the resize size
    _, rgb = _jpeg(224, 224)
    for interpolation in (cv2.INTER_LINEAR, cv2.INTER_AREA):
        np.testing.assert_array_equal(cv2.resize(rgb, (224, 224), interpolation=interpolation), rgb)
    t = transforms.build_transform("light", resize=224, crop=150)
    t.set_seed(3)
    data, _ = _jpeg(224, 224)
    slot = np.zeros((3, 150, 150), np.uint8)
    t.from_jpeg(data, out=slot)
    t.set_seed(3)
    np.testing.assert_array_equal(slot, t.from_jpeg(data))


def test_a_slot_of_the_wrong_size_is_refused():
    t = transforms.build_transform("none", resize=None, crop=None)
    data, _ = _jpeg(40, 30)
    with pytest.raises(ValueError, match="batch slot"):
        t.from_jpeg(data, out=np.zeros((3, 30, 40), np.uint8))


def test_sizes_are_configurable_and_eval_matches_recipe_geometry():
    data, _ = _jpeg(300, 200)
    rgb = transforms.decode_jpeg(data)
    t = transforms.build_transform("none", resize=(120, 100), crop=64)
    assert t(rgb).shape == (3, 64, 64)
    # 'none' is resize then centre crop, no randomness: equal to doing it by hand
    by_hand = cv2.resize(rgb, (100, 120), interpolation=cv2.INTER_LINEAR)[28:92, 18:82]
    np.testing.assert_array_equal(t(rgb), by_hand.transpose(2, 0, 1))
    recipe = transforms.build_transform("recipe", resize=(120, 100), crop=64)
    np.testing.assert_array_equal(recipe(rgb), t(rgb))


def test_light_is_random_but_seeded():
    data, _ = _jpeg(341, 256)
    rgb = transforms.decode_jpeg(data)
    t = transforms.build_transform("light")
    t.set_seed(5)
    a = [t(rgb) for _ in range(6)]
    t.set_seed(5)
    b = [t(rgb) for _ in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({x.tobytes() for x in a}) > 2
    t.set_seed(6)
    assert any(not np.array_equal(x, y) for x, y in zip(a, [t(rgb) for _ in range(6)]))
    # the ops draw independently: the flip does not always come with the colour jitter
    flip = transforms.build_transform("light", resize=None, crop=None)
    flip.pipeline.transforms = flip.pipeline.transforms[:1] + flip.pipeline.transforms[2:]  # flip, jitter
    both = Counter()
    flip.set_seed(1)
    for _ in range(200):
        out = flip(rgb).transpose(1, 2, 0)
        flipped = np.abs(out.astype(int) - rgb[:, ::-1].astype(int)).mean() < np.abs(out.astype(int) - rgb.astype(int)).mean()
        jittered = not (np.array_equal(out, rgb) or np.array_equal(out, rgb[:, ::-1]))
        both[(flipped, jittered)] += 1
    assert len(both) == 4, both


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(MaskdistError, match="preset"):
        transforms.build_transform("heavy")


@pytest.mark.parametrize("channels_last", [False, True])
def test_to_device_normalises_like_the_formula(channels_last):
    batch = torch.randint(0, 256, (4, 3, 10, 12), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = transforms.to_device(batch, "cpu", mean, std, channels_last=channels_last)
    expected = (batch.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    # the torchvision reference: ToTensor + Normalize
    from torchvision.transforms import functional as F

    ref = F.normalize(batch.float() / 255, mean, std)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_to_device_refuses_float_input():
    with pytest.raises(ValueError):
        transforms.to_device(torch.zeros(1, 3, 2, 2), "cpu")
