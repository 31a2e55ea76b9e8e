"""Recipe options: soft targets and soft F1 in the losses, part heads, mixup/cutmix, EMA,
drop path and the ``strong`` augmentation preset."""
from __future__ import annotations

import math

import albumentations as A
import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import DropPath
from torch import nn

from maskdist import metrics
from maskdist.data import labels, transforms
from maskdist.errors import MaskdistError
from maskdist.model import heads, losses, mixing
from maskdist.model.ema import Ema
from maskdist.model.factory import create_model
from maskdist.train import checkpoint

COUNTS = [500, 400, 60, 700, 550, 80, 100, 80, 12, 140, 110, 16, 100, 80, 12, 140, 110, 16]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 18, generator=g) * 3, torch.randint(0, 18, (32,), generator=g)


def _soft_targets(n: int, classes: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, classes, generator=g) * 2, dim=1)


# --- soft targets in focal loss ----------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_hot_soft_targets_equal_class_indices(batch, gamma, weighted):
    logits, target = batch
    weight = losses.class_weights(COUNTS) if weighted else None
    one_hot = F.one_hot(target, 18).float()
    hard = losses.FocalLoss(gamma, weight)(logits, target)
    assert torch.equal(losses.FocalLoss(gamma, weight)(logits, one_hot), hard)
    # a soft target is not smoothed again: the loss's own smoothing only touches indices
    assert torch.equal(losses.FocalLoss(gamma, weight, label_smoothing=0.1)(logits, one_hot), hard)
    assert not torch.allclose(losses.FocalLoss(gamma, weight, label_smoothing=0.1)(logits, target), hard)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_soft_targets_follow_the_weighted_formula(batch, gamma):
    logits, _ = batch
    soft = _soft_targets(32, 18)
    weight = torch.linspace(0.2, 1.0, 18)
    got = losses.FocalLoss(gamma, weight)(logits, soft)
    p = torch.softmax(logits, dim=1)
    expected = (-(soft * weight * (1 - p) ** gamma * torch.log(p))).sum() / (soft * weight).sum()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if gamma == 0:  # unweighted soft cross-entropy is torch's probability-target cross-entropy
        torch.testing.assert_close(losses.FocalLoss(0.0)(logits, soft), F.cross_entropy(logits, soft), rtol=1e-5, atol=1e-6)


def test_soft_targets_of_the_wrong_shape_are_refused(batch):
    logits, _ = batch
    with pytest.raises(ValueError, match="do not match"):
        losses.FocalLoss()(logits, torch.rand(32, 8))


# --- soft F1 -----------------------------------------------------------------------------------

def test_soft_f1_of_confident_logits_is_the_macro_f1(batch):
    _, target = batch
    g = torch.Generator().manual_seed(3)
    predicted = torch.where(torch.rand(32, generator=g) < 0.6, target, torch.randint(0, 18, (32,), generator=g))
    logits = F.one_hot(predicted, 18).float() * 40  # probabilities one-hot to float precision
    macro = metrics.score(target.numpy(), predicted.numpy()).macro_f1
    assert 0 < macro < 1
    assert math.isclose(float(losses.SoftF1Loss()(logits, target)), 1 - macro, abs_tol=1e-4)
    # hard targets and their one-hot soft form agree
    assert torch.equal(losses.SoftF1Loss()(logits, target), losses.SoftF1Loss()(logits, F.one_hot(target, 18).float()))


def test_soft_f1_matches_its_formula_on_soft_targets(batch):
    logits, _ = batch
    soft = _soft_targets(32, 18)
    p = torch.softmax(logits, dim=1)
    f1 = [2 * (p[:, c] * soft[:, c]).sum() / (p[:, c].sum() + soft[:, c].sum() + 1e-6) for c in range(18)]
    torch.testing.assert_close(losses.SoftF1Loss()(logits, soft), 1 - torch.stack(f1).mean())


@pytest.mark.parametrize("scale", [1.0, 100.0, "saturated"])
def test_soft_f1_gradient_is_finite_on_a_batch_missing_classes(scale):
    g = torch.Generator().manual_seed(4)
    target = torch.tensor([3, 11] * 8)  # 2 of the 18 classes
    if scale == "saturated":  # the absent classes' probabilities underflow to exactly 0
        logits = (F.one_hot(target, 18).float() * 200).requires_grad_(True)
    else:
        logits = (torch.randn(16, 18, generator=g) * scale).requires_grad_(True)
    loss = losses.SoftF1Loss()(logits, target)
    loss.backward()
    value = float(loss.detach())
    # the 16 absent classes score 0: the loss cannot go below 16/18
    assert 16 / 18 - 1e-6 <= value <= 1.0
    assert torch.isfinite(logits.grad).all()
    if scale == 1.0:  # (at scale 100 the softmax saturates and the gradient may vanish)
        assert logits.grad.abs().sum() > 0


def test_focal_plus_f1_mixes_the_two(batch):
    logits, target = batch
    mixed = losses.make_loss("focal+f1", COUNTS, "seed", 2.0, 0.1, f1_weight=0.3)
    focal = losses.FocalLoss(2.0, losses.class_weights(COUNTS), label_smoothing=0.1)(logits, target)
    f1 = losses.SoftF1Loss()(logits, target)
    torch.testing.assert_close(mixed(logits, target), 0.7 * focal + 0.3 * f1)
    torch.testing.assert_close(losses.make_loss("f1", COUNTS)(logits, target), f1)
    with pytest.raises(MaskdistError, match="unknown loss 'dice'"):
        losses.make_loss("dice", COUNTS)
    with pytest.raises(MaskdistError, match="F1 loss weight 1.5"):
        losses.make_loss("focal+f1", COUNTS, f1_weight=1.5)


# --- part heads --------------------------------------------------------------------------------

def _brute_force_parts(logits8: torch.Tensor) -> torch.Tensor:
    pm, pg, pa = (torch.softmax(t, dim=1) for t in (logits8[:, :3], logits8[:, 3:5], logits8[:, 5:]))
    out = torch.zeros(len(logits8), 18)
    for c in range(18):
        m, g, a = labels.decode(c)
        out[:, c] = pm[:, m] * pg[:, g] * pa[:, a]
    return out


def test_class_probs_are_the_product_of_the_parts():
    g = torch.Generator().manual_seed(5)
    logits8 = torch.randn(64, 8, generator=g) * 3
    probs = heads.class_probs(logits8)
    assert probs.shape == (64, 18)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(64))
    torch.testing.assert_close(probs, _brute_force_parts(logits8))
    torch.testing.assert_close(heads.probabilities(logits8, "parts"), probs)
    log_mask, log_gender, log_age = heads.part_log_probs(logits8)
    assert (log_mask.shape, log_gender.shape, log_age.shape) == ((64, 3), (64, 2), (64, 3))
    # confident parts: the 18-way argmax decodes to each part's argmax
    confident = logits8 * 10
    best = heads.class_probs(confident).argmax(dim=1)
    for row, label in enumerate(best.tolist()):
        expected = tuple(int(part[row].argmax()) for part in heads.split_logits(confident))
        assert labels.decode(label) == expected
    single = torch.randn(4, 18, generator=g)
    torch.testing.assert_close(heads.probabilities(single, "single"), torch.softmax(single, dim=1))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        heads.probabilities(single, "parts")
    with pytest.raises(MaskdistError, match="unknown heads 'three'"):
        heads.probabilities(single, "three")


def test_part_counts_and_targets_follow_the_label_code():
    mask, gender, age = heads.part_counts(COUNTS)
    by_hand = [[0] * 3, [0] * 2, [0] * 3]
    for c, n in enumerate(COUNTS):
        for k, part in enumerate(labels.decode(c)):
            by_hand[k][part] += n
    assert [mask, gender, age] == by_hand
    target = torch.arange(18)
    assert [t.tolist() for t in heads.part_targets(target)] == [list(col) for col in zip(*map(labels.decode, range(18)))]
    soft = _soft_targets(8, 18)
    marginals = heads.part_targets(soft)
    for k, size in enumerate(heads.PART_SIZES):
        expected = torch.zeros(8, size)
        for c in range(18):
            expected[:, labels.decode(c)[k]] += soft[:, c]
        torch.testing.assert_close(marginals[k], expected)


@pytest.mark.parametrize("soft", [False, True])
def test_part_loss_is_the_sum_of_three_focal_losses(soft):
    g = torch.Generator().manual_seed(6)
    logits8 = torch.randn(24, 8, generator=g) * 2
    target = _soft_targets(24, 18) if soft else torch.randint(0, 18, (24,), generator=g)
    loss = losses.PartLoss(COUNTS, gamma=2.0, label_smoothing=0.1)
    expected = 0
    for k, (start, size) in enumerate(((0, 3), (3, 2), (5, 3))):
        part_counts = [sum(n for c, n in enumerate(COUNTS) if labels.decode(c)[k] == v) for v in range(size)]
        if soft:
            part_target = torch.stack([sum(target[:, c] for c in range(18) if labels.decode(c)[k] == v) for v in range(size)], dim=1)
        else:
            part_target = torch.tensor([labels.decode(int(c))[k] for c in target])
        focal = losses.FocalLoss(2.0, losses.class_weights(part_counts), label_smoothing=0.1)
        expected = expected + focal(logits8[:, start:start + size], part_target)
    torch.testing.assert_close(loss(logits8, target), expected)
    via_factory = losses.make_loss("focal", COUNTS, "seed", 2.0, 0.1, heads="parts")
    torch.testing.assert_close(via_factory(logits8, target), expected)


def test_part_heads_init_and_concatenation():
    torch.manual_seed(0)
    part_heads = heads.PartHeads(64)
    layers = part_heads.layers()
    assert [layer.out_features for layer in layers] == [3, 2, 3]
    bound = 1 / math.sqrt(64)
    for layer in layers:
        assert (layer.bias == 0).all() and layer.weight.abs().max() <= bound + 1e-6 and layer.weight.std() > bound / 4
    x = torch.randn(5, 64)
    torch.testing.assert_close(part_heads(x), torch.cat([layer(x) for layer in layers], dim=1))


@pytest.fixture(scope="module")
def parts_model():
    torch.manual_seed(0)
    return create_model("test_efficientnet", drop_rate=0.5, warn_random=False, heads="parts")


def test_parts_model_outputs_part_logits_with_dropout_before_the_heads(parts_model):
    assert isinstance(parts_model.get_classifier(), heads.PartHeads)
    assert isinstance(parts_model, type(timm.create_model("test_efficientnet")))  # still the timm model
    seen = []
    hook = parts_model.get_classifier().register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x = torch.rand(4, 3, 64, 64)
    try:
        parts_model.eval()
        with torch.no_grad():
            out = parts_model(x)
        parts_model.train()
        with torch.no_grad():
            parts_model(x)
    finally:
        hook.remove()
        parts_model.eval()
    assert out.shape == (4, 8)
    assert float((seen[0] == 0).float().mean()) < 0.05
    assert 0.3 < float((seen[1] == 0).float().mean()) < 0.7  # dropout 0.5 on the head's input


def test_parts_model_round_trips_through_a_run_folder(parts_model, tmp_path):
    card = checkpoint.model_card("test_efficientnet", 64, 48, (0.5,) * 3, (0.25,) * 3, 58, 0, 1, {}, 0.5, heads="parts")
    checkpoint.save(tmp_path, parts_model, card)
    loaded, read = checkpoint.load(tmp_path)
    assert read["heads"] == "parts" and isinstance(loaded.get_classifier(), heads.PartHeads)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), parts_model.eval()(x))


def test_heads_argument_errors():
    with pytest.raises(MaskdistError, match="unknown heads 'both'"):
        create_model("test_efficientnet", warn_random=False, heads="both")
    with pytest.raises(MaskdistError, match="not 10"):
        create_model("test_efficientnet", num_classes=10, warn_random=False, heads="parts")


# --- drop path ---------------------------------------------------------------------------------

def test_drop_path_rate_reaches_the_blocks():
    def rates(model):
        return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]

    with_drop_path = rates(create_model("test_vit", warn_random=False, drop_path_rate=0.2, heads="parts"))
    # timm scales the rate up with depth: the last blocks get close to 0.2, none above
    assert with_drop_path and 0.1 < max(with_drop_path) <= 0.2 + 1e-6 and min(with_drop_path) >= 0
    assert rates(create_model("test_vit", warn_random=False)) == []
    with pytest.raises(MaskdistError, match="drop-path rate 1.0"):
        create_model("test_efficientnet", warn_random=False, drop_path_rate=1.0)


def test_drop_path_drops_in_training_only_and_an_inert_one_is_named():
    torch.manual_seed(0)
    # (a ViT: residual branches that are not zero at initialisation, unlike timm's ResNets)
    model = create_model("test_vit", drop_rate=0.0, warn_random=False, drop_path_rate=0.5)
    images = torch.rand(2, 3, 64, 64)
    model.train()
    assert not torch.allclose(model(images), model(images)), "training forwards must drop different paths"
    model.eval()
    assert torch.equal(model(images), model(images))
    # test_efficientnet builds DropPath layers, but none of its blocks has a skip connection
    with pytest.warns(UserWarning, match="test_efficientnet has no residual block.*drop-path 0.1 changes nothing"):
        create_model("test_efficientnet", drop_path_rate=0.1, pretrained_file=None)


# --- mixup / cutmix ----------------------------------------------------------------------------

def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_disabled_mixer_passes_the_batch_through():
    mixer = mixing.Mixer(0.0, 0.0, label_smoothing=0.1)
    x, y = _images(4), torch.tensor([0, 5, 17, 3])
    before = x.clone()
    out_x, out_y = mixer(x, y)
    assert not mixer.enabled and out_x is x and out_y is y and torch.equal(x, before)


def test_mixup_mixes_images_and_targets_alike():
    np.random.seed(0)
    mixer = mixing.Mixer(mixup_alpha=0.4, label_smoothing=0.0)
    x, y = _images(8), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    original = x.clone()
    out, soft = mixer(x, y)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
    lam = float(soft[0, 0])  # sample 0 is mixed with sample 7
    assert 0 < lam < 1 and math.isclose(float(soft[0, 7]), 1 - lam, rel_tol=1e-6)
    torch.testing.assert_close(out, lam * original + (1 - lam) * original.flip(0))


@pytest.mark.parametrize("mode", mixing.MODES)
def test_mixing_is_reproducible_from_numpy_alone(mode):
    def run(np_seed, torch_seed):
        np.random.seed(np_seed)
        torch.manual_seed(torch_seed)
        mixer = mixing.Mixer(mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1, mode=mode)
        return [mixer(_images(6, i), torch.arange(6) * 3) for i in range(4)]

    first, again, other_torch, other_numpy = run(1, 0), run(1, 7), run(1, 0), run(2, 0)
    for (xa, ya), (xb, yb), (xc, _yc) in zip(first, again, other_torch):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xa, xc)
        torch.testing.assert_close(ya.sum(dim=1), torch.ones(6))
    assert any(not torch.equal(ya, yb) for (_, ya), (_, yb) in zip(first, other_numpy))


def test_cutmix_pastes_a_box_with_the_area_share_as_target():
    np.random.seed(3)
    mixer = mixing.Mixer(cutmix_alpha=1.0)
    x = torch.stack([torch.full((3, 16, 16), float(i)) for i in range(4)])
    out, soft = mixer(x.clone(), torch.arange(4))
    for i in range(4):
        share_own = float((out[i] == i).float().mean())
        assert math.isclose(float(soft[i, i]), share_own, abs_tol=1e-6)
        assert math.isclose(float(soft[i, 3 - i]), 1 - share_own, abs_tol=1e-6)


def test_an_odd_batch_leaves_its_last_sample_unmixed():
    np.random.seed(0)
    mixer = mixing.Mixer(mixup_alpha=1.0, label_smoothing=0.1)
    x, y = _images(5), torch.tensor([0, 1, 2, 3, 17])
    original = x.clone()
    out, soft = mixer(x, y)
    assert soft.shape == (5, 18)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(5))
    assert torch.equal(out[4], original[4])
    expected_last = torch.full((18,), 0.1 / 18)
    expected_last[17] += 0.9
    torch.testing.assert_close(soft[4], expected_last)
    assert not torch.equal(out[:4], original[:4])  # the even part is mixed
    np.random.seed(0)
    single, soft_single = mixer(_images(1), torch.tensor([17]))
    torch.testing.assert_close(soft_single[0], expected_last)


def test_smoothing_moved_to_the_mixer_gives_the_same_loss(batch):
    # an unmixed batch (prob 0) gets timm's smoothed one-hot targets; without class weights the
    # loss of those equals the loss smoothing the indices itself
    logits, target = batch
    mixer = mixing.Mixer(mixup_alpha=0.2, label_smoothing=0.1, prob=0.0)
    _, soft = mixer(torch.zeros(32, 3, 4, 4), target)
    for gamma in (0.0, 2.0):
        torch.testing.assert_close(losses.FocalLoss(gamma, label_smoothing=0.1)(logits, soft),
                                   losses.FocalLoss(gamma, label_smoothing=0.1)(logits, target), rtol=1e-5, atol=1e-6)


def test_mixer_argument_errors():
    with pytest.raises(MaskdistError, match="alphas"):
        mixing.Mixer(mixup_alpha=-1)
    with pytest.raises(MaskdistError, match="mix mode 'row'"):
        mixing.Mixer(mixup_alpha=1, mode="row")


# --- EMA ---------------------------------------------------------------------------------------

def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _sgd_states(model: nn.Module, steps: int, ema: Ema, with_step: bool) -> list[dict]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    states = []
    for step in range(1, steps + 1):
        model.train()
        loss = model(torch.randn(8, 3, generator=g)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step if with_step else None)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


@pytest.mark.parametrize("with_step", [False, True])
def test_ema_is_the_hand_computed_average(with_step):
    model = _tiny_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ema = Ema(model, decay=0.8)
    states = _sgd_states(model, 5, ema, with_step)
    # without a step every update uses the decay, from the initial weights; with one, timm
    # copies the model at step 1, then uses the decay
    expected = {k: v.clone() for k, v in (states[0] if with_step else initial).items()}
    for state in states[1:] if with_step else states:
        for k, v in state.items():
            expected[k] = 0.8 * expected[k] + 0.2 * v if v.is_floating_point() else v.clone()
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.allclose(got["0.weight"], model.state_dict()["0.weight"])
    assert got["1.running_mean"].abs().sum() > 0  # BatchNorm statistics are averaged too
    assert not ema.module.training


def test_ema_warmup_decay():
    ema = Ema(_tiny_model(), decay=0.99, warmup=True, warmup_power=0.75)
    assert ema.decay(1) == 0.0
    assert math.isclose(ema.decay(10), 1 - 10 ** -0.75)
    assert ema.decay(10**6) == 0.99
    assert Ema(_tiny_model(), decay=0.99).decay(None) == 0.99
    with pytest.raises(MaskdistError, match="EMA decay 1.0"):
        Ema(_tiny_model(), decay=1.0)


def test_ema_state_round_trips_through_safetensors_and_torch_save(tmp_path):
    model = _tiny_model()
    ema = Ema(model, decay=0.5)
    _sgd_states(model, 3, ema, with_step=False)
    state = ema.state_dict()
    assert state.keys() == model.state_dict().keys() and all(isinstance(v, torch.Tensor) for v in state.values())
    save_file(state, str(tmp_path / "ema.safetensors"))
    torch.save(state, tmp_path / "ema.pt")
    x = torch.randn(5, 3)
    with torch.no_grad():
        reference = ema.module(x)
    for loaded in (load_file(str(tmp_path / "ema.safetensors")), torch.load(tmp_path / "ema.pt", weights_only=True)):
        restored = Ema(_tiny_model(), decay=0.5)
        with torch.no_grad():
            assert not torch.allclose(restored.module(x), reference)
            restored.load_state_dict(loaded)
            torch.testing.assert_close(restored.module(x), reference)
        plain = _tiny_model().eval()  # the averaged weights load into a plain model too
        plain.load_state_dict(loaded)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), reference)


# --- strong augmentation -----------------------------------------------------------------------

def _jpeg(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(30, 225, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    rgb = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_strong_is_uint8_chw_random_and_seeded():
    t = transforms.build_transform("strong")
    images = [_jpeg(341, 256, i) for i in range(4)]
    t.set_seed(5)
    a = [t.from_jpeg(data) for data in images]
    assert all(x.dtype == np.uint8 and x.shape == (3, 150, 150) and x.flags["C_CONTIGUOUS"] for x in a)
    t.set_seed(5)
    assert all(np.array_equal(x, t.from_jpeg(data)) for x, data in zip(a, images))
    t.set_seed(6)
    assert any(not np.array_equal(x, t.from_jpeg(data)) for x, data in zip(a, images))
    plain = transforms.build_transform("recipe")
    assert any(not np.array_equal(x, plain.from_jpeg(data)) for x, data in zip(a, images))


def test_strong_cutout_zeroes_pixels():
    # the same pipeline without the dropout (each op has its own seed, so the other ops draw
    # alike): every pixel that differs is a hole, and holes are black
    with_holes = transforms.build_transform("strong")
    without = transforms.build_transform("strong")
    dropout = without.pipeline.transforms[-1]
    assert isinstance(dropout, A.CoarseDropout)
    dropout.p = 0.0
    with_holes.set_seed(2)
    without.set_seed(2)
    zeroed = 0
    for i in range(6):
        data = _jpeg(300, 220, i)
        a, b = with_holes.from_jpeg(data), without.from_jpeg(data)
        differ = (a != b).any(axis=0)
        assert (a[:, differ] == 0).all()
        zeroed += int(differ.sum())
    assert zeroed >= 15 * 15  # at least one hole of the smallest size


def test_ops_nested_in_a_composition_get_their_own_seeds():
    # albumentations seeds a SomeOf's ops with the SomeOf's seed: two identical ops would draw
    # identical parameters; set_seed gives each its own
    pipeline = A.Compose([A.SomeOf([A.RandomBrightnessContrast(p=1), A.RandomBrightnessContrast(p=1)], n=2)],
                         save_applied_params=True)
    image = np.full((8, 8, 3), 100, np.uint8)
    pipeline.set_random_seed(3)
    same = [params for _, params in pipeline(image=image)["applied_transforms"]]
    assert same[0]["alpha"] == same[1]["alpha"]  # the albumentations behaviour worked around
    transforms.Transform("strong", None, None, pipeline).set_seed(3)
    own = [params for _, params in pipeline(image=image)["applied_transforms"]]
    assert own[0]["alpha"] != own[1]["alpha"] and own[0]["beta"] != own[1]["beta"]
