"""Every figure the report shows of one experiment, gathered from its folder: the plan, each
fold's curves and speed, the out-of-fold scores (as ``maskdist oof`` computes them), the
reliability of the OOF confidences, and the tuned decisions and the audit where they exist.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maskdist import metrics
from maskdist.infer import decisions
from maskdist.infer.oof import load_oof, oof_scores
from maskdist.report.events import Curves, fold_curves
from maskdist.train.checkpoint import CONFIG
from maskdist.train.folder import read_plan
from maskdist.train.state import read_config

RELIABILITY_BINS = 10
AUDIT = "audit"  # where `maskdist audit` writes by default: EXPERIMENT/audit/{audit.json, contact_sheet.png}


@dataclass
class Fold:
    name: str
    fold: int
    best_epoch: int  # 0-based, as the console and the model card count
    best_macro_f1: float
    epochs: int  # the schedule's
    finished: bool
    curves: Curves


@dataclass
class Experiment:
    path: Path
    plan: dict  # the training settings every fold shares (experiment.yaml; else fold 0's config)
    data: dict  # shard set, image size and crop, pretrained source
    folds: list[Fold]
    oof: metrics.Scores
    class_counts: list[int]  # true labels of the OOF rows
    reliability: dict  # bins of confidence: count, confidence, accuracy; and the expected calibration error
    fold_scores: dict = field(default_factory=dict)  # fold -> Scores of its OOF rows
    unfinished: list[str] = field(default_factory=list)
    decisions: dict | None = None  # the decisions file's nested figures
    audit: dict | None = None  # audit.json, and the contact sheet's path
    notes: list[str] = field(default_factory=list)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = RELIABILITY_BINS) -> dict:
    """Confidence against accuracy in ``bins`` equal-width bins of confidence; the expected
    calibration error is the count-weighted mean gap."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        held = index == b
        n = int(held.sum())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                     "confidence": float(confidence[held].mean()) if n else None,
                     "accuracy": float(correct[held].mean()) if n else None})
    total = max(len(confidence), 1)
    ece = sum(r["count"] / total * abs(r["confidence"] - r["accuracy"]) for r in rows if r["count"])
    return {"bins": rows, "ece": float(ece)}


def _data(run_dir: Path, card: dict) -> dict:
    config = read_config(run_dir / CONFIG) if (run_dir / CONFIG).is_file() else {}
    return {"shards": config.get("shards", "?"), "architecture": card.get("architecture", "?"),
            "resize": card.get("image", {}).get("resize"), "crop": card.get("image", {}).get("crop"),
            "face_crop": card.get("crop") or "none", "pretrained": card.get("pretrained", {"source": "none"}),
            "age_cut": card.get("age_cut")}


def _decisions(experiment: Path) -> dict | None:
    path = decisions.default_path([experiment])
    return decisions.read(path) | {"path": str(path)} if path.is_file() else None


def _audit(experiment: Path) -> dict | None:
    summary = experiment / AUDIT / "audit.json"
    if not summary.is_file():
        return None
    data = json.loads(summary.read_text())
    sheet = Path(data.get("sheet", {}).get("path", experiment / AUDIT / "contact_sheet.png"))
    if not sheet.is_absolute() and not sheet.is_file():
        sheet = experiment / AUDIT / sheet.name
    return data | {"sheet_file": str(sheet) if sheet.is_file() else None}


def gather(experiment: str | Path, allow_unfinished: bool = False) -> Experiment:
    """The figures of one experiment folder (its folds; the full-data model has no OOF rows)."""
    experiment = Path(experiment)
    scores = oof_scores(experiment, allow_unfinished)
    oof = load_oof([experiment], allow_unfinished)
    probs = oof.probs[:, 0]
    preds = oof.preds[:, 0]
    folds = [Fold(r.name, int(r.fold), int(r.card.get("epoch", -1)), float(r.card.get("metrics", {}).get("macro_f1", float("nan"))),
                  int(r.card.get("epochs", 0)), bool(r.card.get("finished", False)), fold_curves(r.run_dir)) for r in oof.runs]
    first = oof.runs[0]
    plan = read_plan(experiment) or read_config(first.run_dir / CONFIG)
    counts = np.bincount(oof.label_true, minlength=len(scores["oof"].per_class_f1))
    return Experiment(experiment, plan, _data(first.run_dir, first.card), folds, scores["oof"], [int(c) for c in counts],
                      reliability(probs.max(axis=1), preds == oof.label_true), scores["folds"], scores["unfinished"],
                      _decisions(experiment), _audit(experiment), [f.curves.note for f in folds if f.curves.note] + scores["ignored"])
