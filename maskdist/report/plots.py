"""The report's pictures, drawn with matplotlib (the ``report`` extra) into PNG bytes.

matplotlib: the plotting library every scientific Python user has, drawing without a display
(the Agg backend), with no network and no browser at view time; the figures it writes are
plain PNGs the page inlines.
"""
from __future__ import annotations

import io
import math

import numpy as np

from maskdist.data import labels
from maskdist.errors import MaskdistError

DPI = 100


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MaskdistError("maskdist report draws with matplotlib, which is not installed:"
                            " pip install 'maskdist[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def curves(folds) -> bytes:
    """Training loss and validation macro F1 per epoch, one line per fold."""
    plt = _pyplot()
    figure, (loss, f1) = plt.subplots(1, 2, figsize=(10, 3.4))
    for fold in folds:
        c = fold.curves
        if not c.epochs:
            continue
        loss.plot(c.epochs, c.values["loss"], marker="o", label=f"fold{fold.fold}")
        line = f1.plot(c.epochs, c.values["macro_f1"], marker="o", label=f"fold{fold.fold}")[0]
        if 0 <= fold.best_epoch < len(c.epochs):
            f1.plot([fold.best_epoch], [c.values["macro_f1"][fold.best_epoch]], marker="*", markersize=14, color=line.get_color())
    loss.set(title="training loss per epoch", xlabel="epoch")
    f1.set(title="validation macro F1 per epoch (* best)", xlabel="epoch")
    for axes in (loss, f1):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    f1.legend(fontsize=8)
    return _png(figure)


def class_f1(per_class: list[float], counts: list[int]) -> bytes:
    """Per-class F1 bars, each with its class count."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(10, 3.6))
    x = np.arange(len(per_class))
    bars = axes.bar(x, per_class, color="#4c72b0")
    for bar, n in zip(bars, counts):
        axes.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, f"n={n}", ha="center", fontsize=7)
    axes.set_xticks(x, [labels.class_name(c) for c in range(len(per_class))], rotation=60, ha="right", fontsize=7)
    axes.set(ylim=(0, 1.1), ylabel="F1", title="out-of-fold F1 per class (n: images)")
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def confusion(matrix: list[list[int]]) -> bytes:
    """The 18x18 confusion matrix as a heat map, rows normalised (the counts written in)."""
    plt = _pyplot()
    counts = np.asarray(matrix)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure, axes = plt.subplots(figsize=(7.5, 7))
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (r, c), n in np.ndenumerate(counts):
        if n:
            axes.text(c, r, str(n), ha="center", va="center", fontsize=6, color="white" if shares[r, c] > 0.5 else "black")
    names = [labels.class_name(c) for c in range(len(counts))]
    axes.set_xticks(range(len(counts)), names, rotation=90, fontsize=6)
    axes.set_yticks(range(len(counts)), names, fontsize=6)
    axes.set(xlabel="predicted", ylabel="true", title="confusion matrix (colour: share of the true class)")
    return _png(figure)


def reliability(figures: dict) -> bytes:
    """Mean confidence against accuracy per bin, beside the diagonal of perfect calibration."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.2, 4))
    used = [b for b in figures["bins"] if b["count"]]
    centres = [(b["low"] + b["high"]) / 2 for b in used]
    axes.bar(centres, [b["accuracy"] for b in used], width=1 / len(figures["bins"]), edgecolor="black", alpha=0.7, label="accuracy")
    axes.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axes.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "o-", color="#c44e52", label="mean confidence")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy",
             title=f"reliability (ECE {figures['ece']:.3f})" if not math.isnan(figures["ece"]) else "reliability")
    axes.legend(fontsize=7, loc="upper left")
    return _png(figure)
