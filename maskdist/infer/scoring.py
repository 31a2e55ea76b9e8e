"""Scores a user reports: a submission against answers, and the cross-validated
(out-of-fold) F1 of an experiment's fold models."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from maskdist import metrics
from maskdist.data import labels, layout
from maskdist.errors import MaskdistError

FULL_DATA_FOLD = -1  # the full-data model's entry in a prediction's integer fold array (.probs.npz)


def _labels_column(frame: pd.DataFrame, path: Path) -> np.ndarray:
    try:
        values = frame["ans"].astype(int).to_numpy()
    except ValueError:
        raise MaskdistError(f"{path}: column ans must hold class numbers 0..17") from None
    if ((values < 0) | (values >= labels.NUM_CLASSES)).any():
        raise MaskdistError(f"{path}: column ans must hold class numbers 0..17")
    return values


def score_submission(submission: str | os.PathLike, answers: str | os.PathLike) -> metrics.Scores:
    """Scores of a submission (ImageID,ans) against an answers file of the same images."""
    sub_path, ans_path = Path(submission), Path(answers)
    sub = layout.read_csv(sub_path, ("ImageID", "ans"), "a submission")
    ans = layout.read_csv(ans_path, ("ImageID", "ans"), "an answers file")
    if sub["ImageID"].duplicated().any():
        raise MaskdistError(f"{sub_path} lists some ImageID twice: write one row per image")
    if set(sub["ImageID"]) != set(ans["ImageID"]):
        only_sub = len(set(sub["ImageID"]) - set(ans["ImageID"]))
        only_ans = len(set(ans["ImageID"]) - set(sub["ImageID"]))
        raise MaskdistError(f"{sub_path} and {ans_path} cover different images ({only_sub} only in the submission, {only_ans} only in the answers)")
    merged = ans.merge(sub, on="ImageID", suffixes=("_true", "_pred"))
    return metrics.score(_labels_column(merged.rename(columns={"ans_true": "ans"}), ans_path),
                         _labels_column(merged.rename(columns={"ans_pred": "ans"}), sub_path))


def oof_scores(experiment, allow_unfinished: bool = False) -> dict:
    """Macro F1 of each fold's best epoch and of all out-of-fold predictions together
    (:func:`maskdist.infer.oof.oof_scores`)."""
    from maskdist.infer.oof import oof_scores as scores  # here, not at the top: `maskdist score` needs no torch

    return scores(experiment, allow_unfinished)


def describe_scores(scores: metrics.Scores, title: str = "") -> str:
    width = max(len(labels.class_name(c)) for c in range(labels.NUM_CLASSES))  # the age cut names the classes
    lines = [f"{title}macro F1 {scores.macro_f1:.4f}  accuracy {scores.accuracy:.4f}  ({scores.samples} images)",
             "part F1: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.part_f1.items()),
             f"{'class':<{width + 3}} {'F1':>5} {'true':>6} {'predicted':>9}"]
    matrix = np.asarray(scores.confusion)
    for c in range(labels.NUM_CLASSES):
        lines.append(f"{c:>2} {labels.class_name(c):<{width}} {scores.per_class_f1[c]:.3f} {matrix[c].sum():>6d} {matrix[:, c].sum():>9d}")
    lines.append("confusion (rows true, columns predicted):")
    lines.extend(" ".join(f"{v:>4d}" for v in row) for row in matrix)
    return "\n".join(lines)


def ensemble_and_folds(probs_npz: str | os.PathLike, answers: str | os.PathLike) -> dict:
    """Macro F1 on the answers of the ensemble (with the decisions its submission used, and
    by argmax) and of each fold model alone, from the ``.probs.npz`` that ``predict`` writes
    beside the submission."""
    saved = np.load(probs_npz)
    truth = layout.read_csv(Path(answers), ("ImageID", "ans"), "an answers file").set_index("ImageID")
    missing = set(saved["image_id"]) - set(truth.index)
    if missing:
        raise MaskdistError(f"{answers} lacks {len(missing)} of the predicted images: pass the answers of this eval set")
    y = truth.loc[list(saved["image_id"]), "ans"].astype(int).to_numpy()
    folds = {int(k): metrics.score(y, saved["fold_probs"][:, i].argmax(axis=1)).macro_f1 for i, k in enumerate(saved["folds"])}
    full_data = folds.pop(FULL_DATA_FOLD, None)  # the full-data model, when it voted
    decided = decided_labels(saved)
    return {"ensemble": metrics.score(y, decided).macro_f1, "ensemble_argmax": metrics.score(y, saved["probs"].argmax(axis=1)).macro_f1,
            "decisions": str(saved["decisions"]) if "decisions" in saved.files else "argmax",
            "folds": folds, "fold_mean": float(np.mean(list(folds.values()))) if folds else float("nan"),
            **({"full_data": full_data} if full_data is not None else {})}


def decided_labels(saved) -> np.ndarray:
    """The classes a ``.probs.npz`` decided: its probabilities with the decisions' class
    weights the submission used (argmax without them)."""
    weights = saved["class_weights"] if "class_weights" in saved.files else np.ones(labels.NUM_CLASSES)
    return (saved["probs"] * weights[None, :]).argmax(axis=1)


def placeholder_warning(answers: str | os.PathLike) -> str:
    """A warning when an answers file holds one class only (``info.csv`` before prediction
    holds 0 everywhere): scores against it mean nothing. Empty when it looks real."""
    path = Path(answers)
    values = _labels_column(layout.read_csv(path, ("ImageID", "ans"), "an answers file"), path)
    if len(values) > 1 and len(set(values.tolist())) == 1:
        return (f"warning: every answer in {path} is class {values[0]}: they look like placeholders (an info.csv before"
                " prediction), not true labels; pass the real answers")
    return ""
