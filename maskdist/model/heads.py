"""Part heads: three classifiers (mask 3, gender 2, age 3) instead of one 18-way head.

The 18 classes are the product of three parts (:mod:`maskdist.data.labels`), so a model can
predict each part and take ``P(class) = P(mask) P(gender) P(age)``: the rare classes (old,
incorrect mask) then share what the model learns about each of their parts with the common
classes. A ``parts`` model outputs the 8 part logits ``[mask 3 | gender 2 | age 3]``;
:func:`probabilities` turns either kind of output into 18-class probabilities, so
prediction, OOF files, ensembling and TTA stay on 18-class probabilities.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskdist.data import labels
from maskdist.errors import MaskdistError

HEADS = ("single", "parts")
PART_NAMES = ("mask", "gender", "age")
PART_SIZES = (len(labels.MASK_NAMES), len(labels.GENDER_NAMES), len(labels.AGE_NAMES))
# (mask, gender, age group) of every class, from the label code itself
CLASS_PARTS = torch.tensor([labels.decode(c) for c in range(labels.NUM_CLASSES)], dtype=torch.int64)


def check_heads(heads: str) -> str:
    if heads not in HEADS:
        raise MaskdistError(f"unknown heads {heads!r}: choose one of {', '.join(HEADS)}")
    return heads


def output_size(heads: str) -> int:
    """Logits per sample: 18 for ``single``, 3 + 2 + 3 for ``parts``."""
    return labels.NUM_CLASSES if check_heads(heads) == "single" else sum(PART_SIZES)


def init_linear(layer: nn.Linear) -> None:
    """Kaiming-uniform weights and zero bias (no activation follows a head)."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class PartHeads(nn.Module):
    """Three linear heads on the pooled features; forward gives their logits concatenated."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = int(in_features)
        self.mask, self.gender, self.age = (nn.Linear(self.in_features, size) for size in PART_SIZES)
        for layer in self.layers():
            init_linear(layer)

    def layers(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.mask, self.gender, self.age

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(features) for layer in self.layers()], dim=1)


def split_logits(logits8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask (N, 3), gender (N, 2), age (N, 3)) logits of a parts model's output."""
    if logits8.ndim != 2 or logits8.shape[1] != sum(PART_SIZES):
        raise ValueError(f"part logits must be (N, {sum(PART_SIZES)}), got {tuple(logits8.shape)}")
    return tuple(torch.split(logits8, PART_SIZES, dim=1))


@functools.cache
def _class_parts(device: torch.device) -> torch.Tensor:
    """CLASS_PARTS on ``device``, copied there once (a copy per step from host memory would
    make every step wait for the device)."""
    return CLASS_PARTS.to(device)


def part_log_probs(logits8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of each part (float32): ``(log_p_mask, log_p_gender, log_p_age)``."""
    return tuple(F.log_softmax(part.float(), dim=1) for part in split_logits(logits8))


def class_log_probs(logits8: torch.Tensor) -> torch.Tensor:
    """``(N, 18)`` log probabilities: the sum of the parts' log probabilities of each class."""
    parts = _class_parts(logits8.device)
    return sum(log_p[:, parts[:, k]] for k, log_p in enumerate(part_log_probs(logits8)))


def class_probs(logits8: torch.Tensor) -> torch.Tensor:
    """``(N, 18)`` probabilities: the product of the part probabilities of each class."""
    return class_log_probs(logits8).exp()


def probabilities(logits: torch.Tensor, heads: str = "single") -> torch.Tensor:
    """18-class float32 probabilities of a model output of either kind."""
    if check_heads(heads) == "single":
        return torch.softmax(logits.float(), dim=1)
    return class_probs(logits)


def part_targets(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-part targets of 18-class targets: indices decode to part indices; soft ``(N, 18)``
    targets are marginalised (summed over the other parts) to soft part targets."""
    parts = _class_parts(target.device)
    if not target.is_floating_point():
        return tuple(parts[target, k] for k in range(len(PART_SIZES)))
    if target.ndim != 2 or target.shape[1] != labels.NUM_CLASSES:
        raise ValueError(f"soft targets must be (N, {labels.NUM_CLASSES}), got {tuple(target.shape)}")
    return tuple(target @ F.one_hot(parts[:, k], size).to(target.dtype) for k, size in enumerate(PART_SIZES))


def part_counts(counts: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """Training counts of each part's classes: the 18 class counts summed over the other parts."""
    n = np.asarray(counts, dtype=np.int64)
    if n.shape != (labels.NUM_CLASSES,):
        raise MaskdistError(f"class counts {list(counts)} are not usable: expected {labels.NUM_CLASSES} counts")
    return tuple(np.bincount(CLASS_PARTS[:, k].numpy(), weights=n, minlength=size).astype(np.int64).tolist()
                 for k, size in enumerate(PART_SIZES))
