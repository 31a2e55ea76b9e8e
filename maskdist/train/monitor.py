"""What a run shows in TensorBoard: scalars, per-class F1, a confusion-matrix picture,
a grid of augmented training images, hparams. Main process only.

``accelerator.log`` drops values that are not int/float/str/tensor (numpy floats among
them), so every value goes through :func:`scalars` first.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from maskdist.data import labels
from maskdist.metrics import Scores


def scalars(values: dict) -> dict[str, float]:
    """Plain Python floats (accelerate's trackers silently drop numpy scalars)."""
    return {k: float(v) for k, v in values.items()}


def score_scalars(scores: Scores, prefix: str = "val") -> dict[str, float]:
    out = {f"{prefix}/macro_f1": scores.macro_f1, f"{prefix}/accuracy": scores.accuracy}
    out.update({f"{prefix}/part_f1/{k}": v for k, v in scores.part_f1.items()})
    out.update({f"{prefix}/class_f1/{c:02d}_{labels.class_name(c).replace('/', '_')}": v for c, v in enumerate(scores.per_class_f1)})
    return scalars(out)


def confusion_image(matrix, cell: int = 22) -> np.ndarray:
    """The confusion matrix (rows true, columns predicted) as an RGB uint8 HWC picture,
    rows normalised to the true count, with counts written in the cells."""
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    margin = cell
    img = np.full((margin + n * cell, margin + n * cell, 3), 255, np.uint8)
    for i in range(n):
        for j in range(n):
            shade = int(255 * (1 - share[i, j]))
            y, x = margin + i * cell, margin + j * cell
            img[y:y + cell, x:x + cell] = (shade, shade, 255) if i != j else (shade, 255, shade)
            if m[i, j]:
                text = str(int(m[i, j]))
                cv2.putText(img, text, (x + 2, y + cell - 9), cv2.FONT_HERSHEY_PLAIN, 0.7 if len(text) < 4 else 0.5, (0, 0, 0), 1)
        cv2.putText(img, str(i), (3, margin + i * cell + cell - 9), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1)
        cv2.putText(img, str(i), (margin + i * cell + 3, margin - 9), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1)
    return img


def image_grid(batch_uint8: torch.Tensor, columns: int = 8) -> np.ndarray:
    """A uint8 NCHW batch as one HWC picture."""
    images = batch_uint8[: columns * 4].cpu().numpy().transpose(0, 2, 3, 1)
    count, h, w, c = images.shape
    rows = (count + columns - 1) // columns
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for k in range(count):
        r, q = divmod(k, columns)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k]
    return grid


def hparams(config: dict) -> dict:
    """Config values TensorBoard's hparams accept (no lists, no None)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
