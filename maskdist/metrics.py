"""Macro F1 (the competition metric), per-class and per-part F1, confusion matrix.

Macro F1 averages the per-class F1 over all 18 classes with ``zero_division = 0``: a class
with no true and no predicted sample scores 0, as DATA.md defines the metric.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maskdist.data import labels


def confusion(y_true, y_pred, classes: int) -> np.ndarray:
    """Counts ``[true, predicted]``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * classes + y_pred, minlength=classes * classes).reshape(classes, classes)


def f1_per_class(matrix: np.ndarray) -> np.ndarray:
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    denominator = predicted + actual
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


@dataclass
class Scores:
    macro_f1: float
    per_class_f1: list[float]
    part_f1: dict[str, float]  # macro F1 of mask (3), gender (2) and age (3) parts
    accuracy: float
    confusion: list[list[int]]
    samples: int

    def to_dict(self) -> dict:
        return dict(vars(self))


def score(y_true, y_pred) -> Scores:
    """All figures of 18-class predictions against true labels (metric age cut)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    matrix = confusion(y_true, y_pred, labels.NUM_CLASSES)
    per_class = f1_per_class(matrix)
    parts = {}
    for name, divisor, modulo, size in (("mask", 6, 3, 3), ("gender", 3, 2, 2), ("age", 1, 3, 3)):
        part_matrix = confusion((y_true // divisor) % modulo, (y_pred // divisor) % modulo, size)
        parts[name] = float(f1_per_class(part_matrix).mean())
    return Scores(
        macro_f1=float(per_class.mean()),
        per_class_f1=[float(v) for v in per_class],
        part_f1=parts,
        accuracy=float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        confusion=matrix.tolist(),
        samples=int(len(y_true)),
    )
