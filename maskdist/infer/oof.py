"""The out-of-fold predictions of one or more experiments: read from every fold's
``oof.csv``, aligned by sample key, scored, and tuned into decisions
(:mod:`maskdist.infer.decisions`).

Each training image has one OOF probability per experiment: that of the one fold model of
the experiment that did not train on it. Several experiments must cover the same images
(models trained on the same shard set); the nested figure splits the rows by the first
experiment's folds.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from maskdist import metrics
from maskdist.data import labels
from maskdist.errors import MaskdistError
from maskdist.infer import decisions, finite
from maskdist.infer.members import FULL_DATA, FoldRun, find_members, mixed_plans, unfinished
from maskdist.system.fileio import atomic_write_json
from maskdist.train.checkpoint import MODEL_JSON, OOF

PROB_COLUMNS = [f"p{c:02d}" for c in range(labels.NUM_CLASSES)]


@dataclass
class OofSet:
    """Every OOF row, aligned over experiments."""

    keys: np.ndarray  # sample keys ``<person>/<stem>``, sorted
    folds: np.ndarray  # the first experiment's validation fold of each row
    label_true: np.ndarray  # the metric's labels (age cut 60): what F1 is scored on
    label: np.ndarray  # the training labels (the shard set's age cut): what the models learnt
    probs: np.ndarray  # rows x experiments x classes
    preds: np.ndarray  # rows x experiments: each fold model's argmax as its oof.csv records it
    experiments: list[Path]
    runs: list[FoldRun]
    per_fold: dict = field(default_factory=dict)  # experiment index -> fold -> Scores of that fold's rows
    fold_sets: np.ndarray | None = None  # rows x experiments: each experiment's validation fold of each row
    train_labels: np.ndarray | None = None  # rows x experiments: each experiment's training labels
    nonfinite: list = field(default_factory=list)  # (key, why): rows left out, their probabilities not finite

    @property
    def unfinished(self) -> list[str]:
        return unfinished(self.runs)


def _read(run: FoldRun) -> pd.DataFrame:
    path = run.run_dir / OOF
    if not path.is_file():
        raise MaskdistError(f"{path} not found: fold {run.fold} has no out-of-fold predictions; retrain it")
    frame = pd.read_csv(path)
    missing = [c for c in ("key", "fold", "label_true", "label", "pred", *PROB_COLUMNS) if c not in frame.columns]
    if missing:
        raise MaskdistError(f"{path} lacks column(s) {', '.join(missing)}: retrain the fold")
    return frame


def _nonfinite_rows(frames: list[pd.DataFrame], experiments: list[Path], allow: bool) -> tuple[np.ndarray, list]:
    """Rows whose probabilities are not finite in some experiment's ``oof.csv`` (a fold trained
    before validation refused such epochs): refused in one line unless ``allow``; then the
    mask of rows to keep and each left-out row with why."""
    bad = np.zeros(len(frames[0]), bool)
    why: dict[str, list[str]] = {}
    for experiment, frame in zip(experiments, frames):
        rows = ~np.isfinite(frame[PROB_COLUMNS].to_numpy(np.float64)).all(axis=1)
        for key, fold in zip(frame["key"][rows], frame["fold"][rows]):
            why.setdefault(key, []).append(str(Path(experiment) / f"fold{fold}" / OOF))
        bad |= rows
    if bad.any() and not allow:
        files = sorted({f for found in why.values() for f in found})
        raise MaskdistError(f"non-finite probabilities (NaN or inf) in {', '.join(files)} for {int(bad.sum())} of {len(bad)} row(s)"
                            f" (e.g. {', '.join(list(why)[:3])}): the fold's validation gave non-finite output; retrain it."
                            f" {finite.ALLOW_OPTION} scores without these rows, naming them")
    return ~bad, [(key, "non-finite probabilities in " + ", ".join(found)) for key, found in why.items()]


def load_oof(sources: Sequence[str | os.PathLike], allow_unfinished: bool = False, allow_nonfinite: bool = False) -> OofSet:
    """The OOF rows of every experiment of ``sources`` (see :func:`find_members`); rows with
    non-finite probabilities are refused, or left out and named when ``allow_nonfinite``."""
    runs = find_members(sources, allow_unfinished)
    full = [str(r.run_dir) for r in runs if r.full_data]
    if full:
        raise MaskdistError(f"{', '.join(full)}: the full-data model has no out-of-fold predictions (nothing was held out);"
                            " pass the experiment folder for its folds' figures")
    experiments = list(dict.fromkeys(r.experiment for r in runs))
    frames = []
    for experiment in experiments:
        parts = [_read(r) for r in runs if r.experiment == experiment]
        frame = pd.concat(parts, ignore_index=True)
        if frame["key"].duplicated().any():
            raise MaskdistError(f"{experiment}: a sample appears in two folds' oof.csv: the folds come from different shard sets")
        frames.append(frame.sort_values("key").reset_index(drop=True))
    first = frames[0]
    for experiment, frame in zip(experiments[1:], frames[1:]):
        if len(frame) != len(first) or not (frame["key"].to_numpy() == first["key"].to_numpy()).all():
            raise MaskdistError(f"{experiment} and {experiments[0]} hold OOF predictions of different images: ensemble"
                                " experiments trained on the same shard set")
        if not (frame["label_true"].to_numpy() == first["label_true"].to_numpy()).all():
            raise MaskdistError(f"{experiment} and {experiments[0]} disagree on the labels of the same images:"
                                " train them on one shard set (same label fixes)")
    keep, nonfinite = _nonfinite_rows(frames, experiments, allow_nonfinite)
    frames = [f[keep].reset_index(drop=True) for f in frames]
    per_fold = {e: {int(fold): metrics.score(rows["label_true"], rows["pred"]) for fold, rows in frame.groupby("fold")}
                for e, frame in enumerate(frames)}
    first = frames[0]
    probs = np.stack([f[PROB_COLUMNS].to_numpy(np.float64) for f in frames], axis=1)
    preds = np.stack([f["pred"].to_numpy(np.int64) for f in frames], axis=1)
    return OofSet(first["key"].to_numpy(), first["fold"].to_numpy(np.int64), first["label_true"].to_numpy(np.int64),
                  first["label"].to_numpy(np.int64), probs, preds, experiments, runs, per_fold,
                  fold_sets=np.stack([f["fold"].to_numpy(np.int64) for f in frames], axis=1),
                  train_labels=np.stack([f["label"].to_numpy(np.int64) for f in frames], axis=1), nonfinite=nonfinite)


def oof_scores(experiment: str | os.PathLike | Sequence[str | os.PathLike], allow_unfinished: bool = False,
               allow_nonfinite: bool = False) -> dict:
    """Macro F1 of each fold's rows and of all OOF rows together (the first experiment's;
    with several experiments also their equal-weight blend, ``blend``)."""
    sources = [experiment] if isinstance(experiment, (str, os.PathLike)) else list(experiment)
    oof = load_oof(sources, allow_unfinished, allow_nonfinite)
    scores = [metrics.score(oof.label_true, oof.preds[:, e]) for e in range(len(oof.experiments))]
    result = {"folds": oof.per_fold[0], "oof": scores[0], "samples": len(oof.keys), "unfinished": oof.unfinished,
              "mixed_plans": mixed_plans(oof.runs),
              "nonfinite": [{"key": k, "why": why} for k, why in oof.nonfinite],
              "ignored": [f"{p / FULL_DATA}: the full-data model has no out-of-fold rows, so these figures leave it out"
                          for p in map(Path, sources) if (p / FULL_DATA / MODEL_JSON).is_file()]}
    if len(oof.experiments) > 1:
        result["experiments"] = {str(p): {"oof": s, "folds": oof.per_fold[e]} for e, (p, s) in enumerate(zip(oof.experiments, scores))}
        result["blend"] = metrics.score(oof.label_true, oof.probs.mean(axis=1).argmax(axis=1))
    return result


def tune_decisions(sources: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, force: bool = False,
                   allow_unfinished: bool = False, allow_nonfinite: bool = False) -> dict:
    """Tune experiment and class weights on the OOF rows, compute the nested figure, and
    write the decisions file (default: :func:`decisions.default_path`). A nested gain that is
    not positive is refused unless ``force``. Returns what was written."""
    oof = load_oof(sources, allow_unfinished, allow_nonfinite)
    started = time.perf_counter()
    tuned = decisions.tune(oof.probs, oof.label_true)
    seconds = time.perf_counter() - started
    nested = decisions.nested(oof.probs, oof.label_true, oof.folds)
    equal = np.full(len(oof.experiments), 1 / len(oof.experiments))
    path = Path(out) if out is not None else decisions.default_path(oof.experiments)
    record = decisions.record(path, oof.runs, oof.experiments, tuned, {
        "rows": int(len(oof.keys)),
        "argmax": decisions.macro_f1(oof.label_true, decisions.decide(np.einsum("nec,e->nc", oof.probs, equal), None)),
        "tuned": decisions.macro_f1(oof.label_true, tuned.predict(oof.probs)),
        "seconds": seconds,
    }, nested, oof.unfinished)
    if nested["gain"] <= 0 and not force:
        raise MaskdistError(f"the nested OOF gain of tuned decisions is {nested['gain']:+.4f} (tuned on k-1 folds, scored on"
                            f" the k-th): they do not generalise, so {path} was not written; --force writes it anyway")
    atomic_write_json(path, record)
    return record | {"path": str(path)}


def describe_tuned(record: dict) -> str:
    oof, nested = record["oof"], record["nested"]
    lines = [f"decisions tuned on {oof['rows']} OOF rows in {oof['seconds']:.2f} s: OOF macro F1 {oof['argmax']:.4f} (argmax)"
             f" -> {oof['tuned']:.4f} (in-sample, optimistic)",
             f"nested (tuned on k-1 folds, scored on the k-th): {nested['argmax']:.4f} -> {nested['tuned']:.4f}"
             f" ({nested['gain']:+.4f}); per fold: "
             + ", ".join(f"{k} {v['tuned'] - v['argmax']:+.4f}" for k, v in nested["folds"].items())]
    if len(record["experiments"]) > 1:
        lines.append("experiment weights: " + ", ".join(f"{e} {w:.2f}" for e, w in zip(record["experiments"], record["experiment_weights"])))
    lines.append("class weights: " + " ".join(f"{w:.2f}" for w in record["class_weights"]))
    if nested["gain"] <= 0:
        lines.append("warning: the nested gain is not positive: these decisions are not expected to help (written because of --force)")
    lines.append(f"wrote {record['path']}: predict and pseudo-label apply it by default (--decisions argmax turns it off)")
    return "\n".join(lines)
