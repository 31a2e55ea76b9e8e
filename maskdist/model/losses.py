"""Losses: focal loss with class weights (the recipe), cross-entropy, label smoothing, soft F1.

Focal loss (Lin et al.): ``-w_y (1 - p_y)^gamma log p_y``, averaged with the class weights
as torch's weighted cross-entropy averages (divided by the sum of the targets' weights), so
that ``gamma = 0`` is exactly ``F.cross_entropy(weight=w)``. Label smoothing spreads
``smoothing`` of the target mass uniformly over the classes, as torch does.

Targets are class indices (int64 ``(N,)``) or soft targets (float ``(N, C)`` rows summing to
1, from mixup / cutmix). A soft target is used as given: timm's ``Mixup`` (``mixing.Mixer``)
has already label-smoothed it, so the loss does not smooth it again.

The soft macro-F1 loss optimises the competition metric directly; ``focal+f1`` mixes it
with focal loss, which keeps the per-sample signal F1 alone lacks on small batches.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskdist.errors import MaskdistError
from maskdist.model.heads import PART_SIZES, check_heads, part_counts, part_targets, split_logits

CLASS_WEIGHTINGS = ("seed", "inverse", "effective-number", "none")
LOSSES = ("focal", "ce", "f1", "focal+f1", "ce+f1")


def class_weights(counts: Sequence[int], scheme: str = "seed", beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights from training-class counts.

    * ``seed``: ``1 - n_c / N`` (the recipe's weights)
    * ``inverse``: ``N / (C n_c)`` (1 on balanced data)
    * ``effective-number``: ``(1 - beta) / (1 - beta^n_c)`` (Cui et al.), scaled to mean 1
    * ``none``: all ones

    Classes with no samples get weight 0 under ``inverse`` and ``effective-number`` (they
    cannot appear as targets anyway) so they do not distort the scale.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or (n < 0).any() or n.sum() <= 0:
        raise MaskdistError(f"class counts {list(counts)} are not usable: expected non-negative counts with at least one sample")
    present = n > 0
    if scheme == "seed":
        w = 1.0 - n / n.sum()
    elif scheme == "inverse":
        w = np.zeros_like(n)
        w[present] = n.sum() / (present.sum() * n[present])
    elif scheme == "effective-number":
        w = np.zeros_like(n)
        w[present] = (1.0 - beta) / (1.0 - np.power(beta, n[present]))
        w[present] *= present.sum() / w[present].sum()
    elif scheme == "none":
        w = np.ones_like(n)
    else:
        raise MaskdistError(f"unknown class weighting {scheme!r}: choose one of {', '.join(CLASS_WEIGHTINGS)}")
    return torch.tensor(w, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss with optional class weights and label smoothing (gamma 0 is cross-entropy)."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        if gamma < 0 or not 0.0 <= label_smoothing < 1.0:
            raise MaskdistError(f"focal loss needs gamma >= 0 and 0 <= label smoothing < 1 (got {gamma}, {label_smoothing})")
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", None if weight is None else weight.detach().float().clone())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of class indices ``(N,)`` or soft targets ``(N, C)``.

        A soft target's weight is ``sum_c target[n, c] w_c`` and the mean divides by the sum
        of those, so a one-hot soft target gives exactly the class-index value. Soft targets
        are not label-smoothed here (the mixer smoothed them).
        """
        log_p = F.log_softmax(logits.float(), dim=1)  # float32 even under autocast: logs of small p
        classes = logits.shape[1]
        weight = self.weight if self.weight is not None else log_p.new_ones(classes)
        if target.is_floating_point():
            soft = _check_soft(target, logits).to(log_p.dtype)
            total_weight = (soft * weight).sum(dim=1).sum()
        else:
            soft = F.one_hot(target, classes).to(log_p.dtype)
            if self.label_smoothing:
                soft = soft * (1.0 - self.label_smoothing) + self.label_smoothing / classes
            total_weight = weight[target].sum()
        modulating = (1.0 - log_p.exp()).pow(self.gamma) if self.gamma else 1.0
        per_sample = -(soft * weight * modulating * log_p).sum(dim=1)
        return per_sample.sum() / total_weight


def _check_soft(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if target.shape != logits.shape:
        raise ValueError(f"soft targets {tuple(target.shape)} do not match the logits {tuple(logits.shape)}")
    return target


def _as_soft(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Float ``(N, C)`` targets from class indices or soft targets."""
    if target.is_floating_point():
        return _check_soft(target, logits).float()
    return F.one_hot(target, logits.shape[1]).float()


class SoftF1Loss(nn.Module):
    """``1 - `` macro F1 over the classes, with softmax probabilities as soft predictions.

    Per class over the batch: ``TP = sum p t``, ``FP = sum p (1 - t)``, ``FN = sum (1 - p) t``
    and ``F1 = 2 TP / (2 TP + FP + FN + eps)``. As in the metric (``zero_division = 0``), a
    class absent from the batch's targets scores 0: it adds a constant to the loss and no
    gradient (its TP is 0 whatever the probabilities), so the loss stays in [0, 1] and its
    gradient finite on batches that miss classes. No class weights: the macro mean already
    weighs every class equally.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        if not eps > 0:
            raise MaskdistError(f"soft F1 epsilon {eps} must be positive")
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=1)
        t = _as_soft(target, logits)
        tp = (p * t).sum(dim=0)
        fp = (p * (1.0 - t)).sum(dim=0)
        fn = ((1.0 - p) * t).sum(dim=0)
        f1 = 2.0 * tp / (2.0 * tp + fp + fn + self.eps)
        return 1.0 - f1.mean()


class MixedLoss(nn.Module):
    """``(1 - f1_weight) * base + f1_weight * soft F1``."""

    def __init__(self, base: nn.Module, f1: nn.Module, f1_weight: float):
        super().__init__()
        if not 0.0 <= f1_weight <= 1.0:
            raise MaskdistError(f"F1 loss weight {f1_weight} must be in [0, 1]")
        self.base, self.f1, self.f1_weight = base, f1, float(f1_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.f1_weight) * self.base(logits, target) + self.f1_weight * self.f1(logits, target)


def make_loss(name: str, counts: Sequence[int] | None, weighting: str = "seed", gamma: float = 2.0, label_smoothing: float = 0.0,
              f1_weight: float = 0.5, heads: str = "single") -> nn.Module:
    """``focal``, ``ce``, ``f1``, ``focal+f1`` or ``ce+f1`` with the chosen class weighting from ``counts``.

    ``f1_weight`` is the soft-F1 share of a ``+f1`` mix. ``heads="parts"`` gives the sum of
    this loss over the mask, gender and age parts (:class:`PartLoss`), each
    part weighted from its own counts; ``counts`` are the 18 class counts either way.
    """
    if name not in LOSSES:
        raise MaskdistError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    if check_heads(heads) == "parts":
        return PartLoss(counts, name, weighting, gamma, label_smoothing, f1_weight)
    if name == "f1":
        return SoftF1Loss()
    weight = None if weighting == "none" or counts is None else class_weights(counts, weighting)
    base = FocalLoss(gamma=gamma if name.startswith("focal") else 0.0, weight=weight, label_smoothing=label_smoothing)
    return MixedLoss(base, SoftF1Loss(), f1_weight) if name.endswith("+f1") else base


class PartLoss(nn.Module):
    """The sum of one loss per part (focal by default), each class-weighted from its part's counts.

    Takes 18-class targets (indices or soft). Label smoothing of index targets happens per
    part; a soft target smoothed uniformly over 18 classes marginalises to a part target
    smoothed uniformly by the same amount, so both routes smooth alike.
    """

    def __init__(self, counts: Sequence[int] | None, name: str = "focal", weighting: str = "seed", gamma: float = 2.0,
                 label_smoothing: float = 0.0, f1_weight: float = 0.5):
        super().__init__()
        per_part = part_counts(counts) if counts is not None else (None,) * len(PART_SIZES)
        self.parts = nn.ModuleList(
            make_loss(name, c, weighting, gamma, label_smoothing, f1_weight) for c in per_part)

    def forward(self, logits8: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(loss(part, t) for loss, part, t in zip(self.parts, split_logits(logits8), part_targets(target)))
