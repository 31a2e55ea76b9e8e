"""Decode shard JPEGs with OpenCV and transform them with albumentations, keeping uint8.

The CPU side of the input pipeline stops at uint8: :func:`decode_jpeg` gives an RGB
``(H, W, 3)`` array (decoding at 1/2, 1/4 or 1/8 size when the transform's resize target is
at most that size, which libjpeg does much faster than a full decode), a :class:`Transform`
turns it into a uint8 ``(3, h, w)`` array, the loader stacks those into uint8 NCHW batches,
and :func:`to_device` moves a batch to the accelerator and normalises it there. A uint8
batch is 4x smaller to pass between processes than a float one, and normalising on the
device costs nothing measurable, while on the CPU it costs more than resize and flip.

Presets (:func:`build_transform`, ``resize``/``crop`` configurable):

* ``recipe``: Resize(224x224) then CenterCrop(150x150), the seed recipe's training transform
  (it beat heavier augmentation there) and the default.
* ``light``: ``recipe`` plus horizontal flip, a small shift/scale/rotate and colour jitter.
* ``strong``: ``recipe`` plus horizontal flip, two ops drawn from a RandAugment-like list
  (rotate, shear, shift, brightness/contrast, saturation, equalise, posterise, sharpen,
  auto-contrast) and CoarseDropout (cutout) with black holes (0 in uint8).
* ``none``: the evaluation transform: ``recipe``'s geometry without randomness.

Random transforms are seeded by the loader per rank, worker and epoch
(:meth:`Transform.set_seed`), so a run is reproducible from one base seed.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from maskdist.data.images import jpeg_frame

PRESETS = ("recipe", "light", "strong", "none")
_GEOMETRY_ONLY = ("recipe", "none")  # presets from_jpeg runs without albumentations
DEFAULT_RESIZE = 224
DEFAULT_CROP = 150
# Normalisation of the competition's reference code (the seed recipe), in 0..1 units.
RECIPE_MEAN = (0.548, 0.504, 0.479)
RECIPE_STD = (0.237, 0.247, 0.246)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


class DecodeError(Exception):
    """A shard image that does not decode."""


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header without decoding; None if not found."""
    frame = jpeg_frame(data)
    return None if frame is None else (frame.height, frame.width)


def reduction_factor(stored: tuple[int, int] | None, target: tuple[int, int] | None) -> int:
    """The largest libjpeg scale (8, 4, 2 or 1) whose decode still covers ``target`` (h, w)."""
    if stored is None or target is None:
        return 1
    (h, w), (th, tw) = stored, target
    for factor, _ in _REDUCED:
        # libjpeg rounds scaled sizes up
        if -(-h // factor) >= th and -(-w // factor) >= tw:
            return factor
    return 1


def decode_jpeg(data: bytes, target: tuple[int, int] | None = None, rgb: bool = True) -> np.ndarray:
    """JPEG bytes -> RGB uint8 (H, W, 3) with OpenCV (BGR, OpenCV's order, with ``rgb=False``).

    With ``target`` (h, w), decode at the smallest 1/2, 1/4, 1/8 scale that is still at
    least ``target`` in both dimensions (the transform then resizes down to it).
    """
    flag = cv2.IMREAD_COLOR
    if target is not None:
        factor = reduction_factor(jpeg_size(data), target)
        flag = dict(_REDUCED).get(factor, cv2.IMREAD_COLOR)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if bgr is None:
        raise DecodeError("JPEG does not decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if rgb else bgr


@dataclass
class Transform:
    """An albumentations pipeline on RGB uint8 HWC -> uint8 CHW (contiguous).

    ``decode_target`` is the size the pipeline first resizes to (h, w): the decoder may
    decode at a reduced scale down to it. Picklable, so DataLoader workers get a copy.
    """

    preset: str
    resize: tuple[int, int] | None
    crop: tuple[int, int] | None
    pipeline: object | None  # albumentations.Compose, or None for "decode only"

    @property
    def decode_target(self) -> tuple[int, int] | None:
        return self.resize

    @property
    def output_size(self) -> tuple[int, int] | None:
        return self.crop or self.resize

    def set_seed(self, seed: int) -> None:
        """Reseed all random ops. Each op gets its own seed: albumentations' ``set_random_seed``
        gives every op the same one, so their coin flips would be identical (flip, affine
        and jitter always applied together). Ops nested in ``SomeOf``/``OneOf`` get their
        own seeds too (the pipeline, then each op, in depth-first order; a flat pipeline gets
        the same seeds as before nesting was handled)."""
        if self.pipeline is None:
            return
        ops = list(_walk(self.pipeline))
        seeds = np.random.SeedSequence(int(seed) % (2**63)).generate_state(len(ops))
        for op, op_seed in zip(ops, seeds):
            # a composition passes its seed on to its ops: parents first, so each op keeps its own
            op.set_random_seed(int(op_seed))

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if self.pipeline is not None:
            rgb = self.pipeline(image=rgb)["image"]
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))

    def from_jpeg(self, data: bytes, out: np.ndarray | None = None) -> np.ndarray:
        """JPEG bytes -> uint8 RGB CHW: decode (reduced where possible) and transform.

        ``recipe`` and ``none`` are pure geometry, so they take a fast path with the same
        pixels as the albumentations pipeline (same cv2 calls and crop offsets, checked by
        the tests) without its per-call overhead, and stay in OpenCV's BGR order until the
        final CHW copy reverses the channels (no separate colour conversion). A decoded image
        that already has the resize size (a shard set built with ``--image-size HxW`` equal to
        it) is not resized: a same-size ``cv2.resize`` is an exact copy.

        ``out``: a uint8 ``(3, h, w)`` array to write the result into (a slot of a batch), which
        saves a copy; it is returned.
        """
        if self.preset not in _GEOMETRY_ONLY:
            chw = self(decode_jpeg(data, self.decode_target))
            if out is None:
                return chw
            out[...] = chw
            return out
        image = decode_jpeg(data, self.decode_target, rgb=False)
        if self.resize is not None and image.shape[:2] != self.resize:
            image = cv2.resize(image, (self.resize[1], self.resize[0]), interpolation=cv2.INTER_LINEAR)
        if self.crop is not None:
            (h, w), (ch, cw) = image.shape[:2], self.crop
            if ch > h or cw > w:
                raise ValueError(f"centre crop {ch}x{cw} is larger than the image {h}x{w}")
            y, x = (h - ch) // 2, (w - cw) // 2
            image = image[y:y + ch, x:x + cw]
        chw = image.transpose(2, 0, 1)[::-1]
        if out is None:
            return np.ascontiguousarray(chw)
        if out.shape != chw.shape:
            raise ValueError(f"image {chw.shape[1]}x{chw.shape[2]} does not fit the batch slot {out.shape[1]}x{out.shape[2]}:"
                             " without a resize or crop all shard images must share one size")
        out[...] = chw
        return out


def _walk(op):
    """``op`` and, depth first, every op nested in it if it is a composition (Compose, SomeOf,
    OneOf...; some single ops, such as ColorJitter, also have a ``transforms`` list, of functions)."""
    from albumentations import BaseCompose

    yield op
    if isinstance(op, BaseCompose):
        for child in op.transforms:
            yield from _walk(child)


def _pair(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


def build_transform(preset: str = "recipe", resize: int | Sequence[int] | None = DEFAULT_RESIZE,
                    crop: int | Sequence[int] | None = DEFAULT_CROP, seed: int | None = None) -> Transform:
    """A preset (``recipe``, ``light``, ``strong``, ``none``) with resize / crop sizes (int or (h, w)).

    ``resize=None`` skips the resize and ``crop=None`` the centre crop (all images must then
    share a size to be batched).
    """
    import albumentations as A

    if preset not in PRESETS:
        from maskdist.errors import MaskdistError

        raise MaskdistError(f"unknown transform preset {preset!r}: expected one of {', '.join(PRESETS)}")
    resize, crop = _pair(resize), _pair(crop)
    ops = []
    if resize is not None:
        ops.append(A.Resize(resize[0], resize[1], interpolation=cv2.INTER_LINEAR))
    if crop is not None:
        ops.append(A.CenterCrop(crop[0], crop[1]))
    if preset == "light":
        ops += [
            A.HorizontalFlip(p=0.5),
            A.Affine(translate_percent=(-0.05, 0.05), scale=(0.95, 1.05), rotate=(-10, 10),
                     border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ]
    if preset == "strong":
        reflect = dict(border_mode=cv2.BORDER_REFLECT_101, p=1.0)
        ops += [
            A.HorizontalFlip(p=0.5),
            # RandAugment-like: two ops a sample, each at a fixed moderate magnitude range
            A.SomeOf([
                A.Affine(rotate=(-15, 15), **reflect),
                A.Affine(shear=(-10, 10), **reflect),
                A.Affine(translate_percent=(-0.1, 0.1), **reflect),
                A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=1.0),
                A.ColorJitter(brightness=0.0, contrast=0.0, saturation=0.4, hue=0.0, p=1.0),
                A.Equalize(p=1.0),
                A.Posterize(num_bits=(4, 6), p=1.0),
                A.Sharpen(p=1.0),
                A.AutoContrast(p=1.0),
            ], n=2, p=1.0),
            A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.25), hole_width_range=(0.1, 0.25),
                            fill=0, p=0.5),
        ]
    pipeline = A.Compose(ops, seed=seed) if ops else None
    return Transform(preset, resize, crop, pipeline)


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean * 255`` and ``1 / (std * 255)`` as (1, C, 1, 1) tensors on ``device``, made once:
    a copy from host memory on every batch would make each step wait for the device."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    inv_std = 1.0 / (torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0)
    return mean_t, inv_std


def to_device(batch_uint8: torch.Tensor, device: torch.device | str, mean: Sequence[float] = RECIPE_MEAN,
              std: Sequence[float] = RECIPE_STD, channels_last: bool = False,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW batch -> normalised float tensor on ``device``: ``(x / 255 - mean) / std``.

    ``mean``/``std`` are per channel in 0..1 units (as torchvision's Normalize takes them).
    The copy is non-blocking (pin the loader's memory for it to overlap on CUDA). The result
    is channels_last with ``channels_last``, else contiguous NCHW; a batch that is already
    NHWC in memory (the loaders' layout on CUDA) keeps its layout through the copy and the
    arithmetic, so it needs no conversion on the device.
    """
    if batch_uint8.dtype != torch.uint8 or batch_uint8.ndim != 4:
        raise ValueError(f"expected a uint8 NCHW batch, got {batch_uint8.dtype} {tuple(batch_uint8.shape)}")
    x = batch_uint8.to(device, non_blocking=True)
    mean_t, inv_std = _normalisation(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device)
    x = (x.float() - mean_t) * inv_std
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x.to(dtype) if dtype != torch.float32 else x
