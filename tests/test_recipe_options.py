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

from maskdist import labels, losses, metrics
from maskdist.errors import MaskdistError
from maskdist.model import create_model

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
