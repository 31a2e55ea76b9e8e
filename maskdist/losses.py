"""Losses: focal loss with class weights (the recipe), cross-entropy, label smoothing.

Focal loss (Lin et al.): ``-w_y (1 - p_y)^gamma log p_y``, averaged with the class weights
as torch's weighted cross-entropy averages (divided by the sum of the targets' weights), so
that ``gamma = 0`` is exactly ``F.cross_entropy(weight=w)``. Label smoothing spreads
``smoothing`` of the target mass uniformly over the classes, as torch does.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskdist.errors import MaskdistError

CLASS_WEIGHTINGS = ("seed", "inverse", "effective-number", "none")


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
        log_p = F.log_softmax(logits.float(), dim=1)  # float32 even under autocast: logs of small p
        classes = logits.shape[1]
        weight = self.weight if self.weight is not None else log_p.new_ones(classes)
        soft = F.one_hot(target, classes).to(log_p.dtype)
        if self.label_smoothing:
            soft = soft * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        modulating = (1.0 - log_p.exp()).pow(self.gamma) if self.gamma else 1.0
        per_sample = -(soft * weight * modulating * log_p).sum(dim=1)
        return per_sample.sum() / weight[target].sum()


def make_loss(name: str, counts: Sequence[int] | None, weighting: str = "seed", gamma: float = 2.0, label_smoothing: float = 0.0) -> nn.Module:
    """``focal`` or ``ce`` with the chosen class weighting from ``counts``."""
    weight = None if weighting == "none" or counts is None else class_weights(counts, weighting)
    if name == "focal":
        return FocalLoss(gamma=gamma, weight=weight, label_smoothing=label_smoothing)
    if name == "ce":
        return FocalLoss(gamma=0.0, weight=weight, label_smoothing=label_smoothing)
    raise MaskdistError(f"unknown loss {name!r}: choose focal or ce")
