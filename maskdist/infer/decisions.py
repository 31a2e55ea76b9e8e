"""Decisions tuned for macro F1 on the out-of-fold predictions.

With 18 unequal classes the most probable class is not the decision that maximises macro F1:
the rare classes are predicted too rarely. The decision here is ``argmax_c w_c p_c`` with one
weight per class, tuned on the OOF probabilities. When several experiments vote, their
ensemble weights are tuned first on the same rows.

The method (deterministic, a fixed budget):

* experiment weights: every point of the simplex grid with step 1/10 (1/5 from four
  experiments on), the OOF macro F1 of the argmax of the blend; ties keep the point nearest
  equal weights;
* class weights: coordinate ascent on the log-weights, ``ROUNDS`` rounds over the 18 classes,
  each trying ``CANDIDATES`` values spread over ``±SPAN[r]`` around the current one (the
  spans halve from round to round); a weight moves only when macro F1 strictly rises, ties
  keep the value nearest the current one. That is 4 x 18 x 17 = 1,224 macro-F1 evaluations,
  vectorised per coordinate: about 0.3 s at 18,900 rows on one core.

The honest figure is nested: for each fold k, tune on the OOF rows of the other folds and
decide fold k's rows with those weights; the pooled macro F1 of those decisions against the
argmax of the same rows is the gain to expect on new images.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskdist.data import labels
from maskdist.errors import MaskdistError
from maskdist.metrics import f1_per_class
from maskdist.system.fileio import sha256_file
from maskdist.train.checkpoint import OOF

ROUNDS = 4
CANDIDATES = 17
SPAN = (2.0, 1.0, 0.5, 0.25)  # natural-log units per round: e^-2 .. e^2 at first
C = labels.NUM_CLASSES


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    matrix = np.bincount(y * C + pred, minlength=C * C).reshape(C, C)
    return float(f1_per_class(matrix).mean())


def _macro_f1_many(y: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Macro F1 of each row of ``preds`` (candidates x images) against ``y``."""
    g = len(preds)
    index = (np.arange(g)[:, None] * C * C + y[None, :] * C + preds).ravel()
    matrix = np.bincount(index, minlength=g * C * C).reshape(g, C, C)
    tp = np.diagonal(matrix, axis1=1, axis2=2).astype(np.float64)
    denominator = matrix.sum(axis=1) + matrix.sum(axis=2)
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=1)


def decide(probs: np.ndarray, class_weights: np.ndarray | None) -> np.ndarray:
    """The class of each row: ``argmax_c w_c p_c`` (the plain argmax without weights)."""
    if class_weights is None:
        return probs.argmax(axis=1)
    return (probs * np.asarray(class_weights, dtype=probs.dtype)[None, :]).argmax(axis=1)


def tune_class_weights(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-class weights that raise the macro F1 of ``decide(probs, w)`` on ``(probs, y)``."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    log_w = np.zeros(C)
    best = macro_f1(y, decide(probs, np.exp(log_w)))
    steps = np.linspace(-1.0, 1.0, CANDIDATES)
    nearest_first = np.argsort(np.abs(steps), kind="stable")
    for span in SPAN[:ROUNDS]:
        for c in range(C):
            scores = probs * np.exp(log_w)[None, :]
            scores[:, c] = -np.inf
            other = scores.argmax(axis=1)
            other_score = scores[np.arange(len(y)), other]
            values = log_w[c] + span * steps
            raw = probs[:, c][None, :] * np.exp(values)[:, None]
            preds = np.where(raw > other_score[None, :], c, other[None, :])
            f1 = _macro_f1_many(y, preds)
            choice = nearest_first[np.argmax(f1[nearest_first])]  # the best; on a tie the smallest move
            if f1[choice] > best:
                best, log_w[c] = float(f1[choice]), float(values[choice])
    log_w -= log_w.mean()  # scale-free: a geometric mean of 1
    return np.exp(log_w)


def _simplex(parts: int, step: float) -> list[np.ndarray]:
    n = round(1 / step)
    points = [np.array(c, dtype=np.float64) / n for c in itertools.product(range(n + 1), repeat=parts) if sum(c) == n]
    uniform = np.full(parts, 1 / parts)
    return sorted(points, key=lambda p: (float(np.abs(p - uniform).sum()), tuple(-p)))


def tune_experiment_weights(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights of E experiments (``probs``: images x experiments x classes) that maximise the
    macro F1 of the blend's argmax; equal weights unless another point is strictly better."""
    experiments = probs.shape[1]
    if experiments == 1:
        return np.ones(1)
    best_w, best = None, -1.0
    for w in _simplex(experiments, 0.1 if experiments <= 3 else 0.2):
        f1 = macro_f1(y, np.einsum("nec,e->nc", probs, w).argmax(axis=1))
        if f1 > best:
            best_w, best = w, f1
    return best_w


@dataclass
class Tuned:
    experiment_weights: np.ndarray
    class_weights: np.ndarray

    def blend(self, probs: np.ndarray) -> np.ndarray:
        """images x experiments x classes -> images x classes."""
        return np.einsum("nec,e->nc", probs, self.experiment_weights)

    def predict(self, probs: np.ndarray) -> np.ndarray:
        return decide(self.blend(probs), self.class_weights)


def tune(probs: np.ndarray, y: np.ndarray) -> Tuned:
    """Experiment weights, then class weights on their blend (see the module docstring)."""
    experiment_weights = tune_experiment_weights(probs, y)
    blended = np.einsum("nec,e->nc", probs, experiment_weights)
    return Tuned(experiment_weights, tune_class_weights(blended, y))


def nested(probs: np.ndarray, y: np.ndarray, folds: np.ndarray) -> dict:
    """Tune on every fold but one, decide that one; the pooled and per-fold figures.

    ``argmax`` is the plain argmax of the equal-weight blend of the same rows, so ``gain`` is
    what tuning adds on rows it never saw."""
    uniform = np.full(probs.shape[1], 1 / probs.shape[1])
    plain = np.einsum("nec,e->nc", probs, uniform).argmax(axis=1)
    decided = np.empty_like(y)
    per_fold = {}
    for fold in sorted(set(folds.tolist())):
        held = folds == fold
        tuned = tune(probs[~held], y[~held])
        decided[held] = tuned.predict(probs[held])
        per_fold[int(fold)] = {"argmax": macro_f1(y[held], plain[held]), "tuned": macro_f1(y[held], decided[held]),
                               "rows": int(held.sum())}
    argmax_f1, tuned_f1 = macro_f1(y, plain), macro_f1(y, decided)
    return {"argmax": argmax_f1, "tuned": tuned_f1, "gain": tuned_f1 - argmax_f1, "folds": per_fold}


# --- the decisions file ---------------------------------------------------------------------

FILE = "decisions.json"
FORMAT = "maskdist-decisions"
FORMAT_VERSION = 2  # 2: each member's weights and OOF file keyed by sha256 (1: by best epoch)
READABLE_VERSIONS = (1, 2)
CHOICES = ("tuned", "argmax")  # predict's --decisions, besides a file path


def default_path(experiments: Sequence[Path]) -> Path:
    """Where ``oof --tune`` writes and ``predict`` looks: ``decisions.json`` of the (first)
    experiment; ``decisions-with-<B>-<C>.json`` there when experiments B, C vote with it."""
    first = Path(experiments[0])
    others = [Path(e).name for e in experiments[1:]]
    return first / (FILE if not others else f"decisions-with-{'-'.join(others)}.json")


def _member(run, base: Path) -> dict:
    """A fold model as a decisions file names it: by the content of its weights (and of the
    OOF file tuned on), so a retrained, resumed or replaced fold is told apart even when it
    stopped at the same epoch."""
    oof = run.run_dir / OOF
    return {"experiment": os.path.relpath(run.experiment.resolve(), base.resolve()), "fold": run.fold,
            "epoch": int(run.card.get("epoch", -1)), "macro_f1": float(run.card.get("metrics", {}).get("macro_f1", 0.0)),
            "weights_sha256": run.weights_sha256,
            "oof_sha256": sha256_file(oof) if oof.is_file() else None}


def _identity(member: dict, by_content: bool) -> tuple:
    if by_content:
        return member["experiment"], str(member["fold"]), member["weights_sha256"], member["oof_sha256"]
    return member["experiment"], str(member["fold"]), member["epoch"]


def record(path: Path, runs, experiments: Sequence[Path], tuned: Tuned, oof: dict, nested_figures: dict,
           unfinished: Sequence[str]) -> dict:
    """The decisions file's content; experiments are named relative to its folder (the
    experiment and its decisions move together)."""
    base = Path(path).parent
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "experiments": [os.path.relpath(Path(e).resolve(), base.resolve()) for e in experiments],
        "members": [_member(r, base) for r in runs],
        "experiment_weights": [float(v) for v in tuned.experiment_weights],
        "class_weights": [float(v) for v in tuned.class_weights],
        "oof": oof, "nested": nested_figures, "unfinished": list(unfinished),
        "method": {"rounds": ROUNDS, "candidates": CANDIDATES, "spans": list(SPAN[:ROUNDS]), "simplex_step": 0.1 if len(experiments) <= 3 else 0.2},
    }


@dataclass
class Applied:
    """The decisions a prediction uses: ``name`` is ``argmax`` or the file's path."""

    name: str
    class_weights: np.ndarray | None = None
    experiment_weights: np.ndarray | None = None
    note: str = ""


def read(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MaskdistError(f"{path} cannot be read as a decisions file ({err}): re-run maskdist oof RUNS --tune") from None
    if data.get("format") != FORMAT or data.get("format_version") not in READABLE_VERSIONS or len(data.get("class_weights", [])) != C:
        raise MaskdistError(f"{path} is not a maskdist decisions file of version {FORMAT_VERSION}: re-run maskdist oof RUNS --tune")
    return data


def resolve(choice: str, runs, experiments: Sequence[Path]) -> Applied:
    """The decisions for ``choice`` (``tuned``, ``argmax`` or a file) and these fold runs.

    ``tuned`` uses :func:`default_path` when it exists, else the argmax. A file tuned for
    other experiments or on other fold models (a fold retrained since) is refused when named,
    and passed over with a note (the argmax decides) when found by default."""
    if choice == "argmax":
        return Applied("argmax")
    path = default_path(experiments) if choice == "tuned" else Path(choice)
    if not path.is_file():
        if choice == "tuned":
            return Applied("argmax", note="")
        raise MaskdistError(f"{path} not found: pass --decisions tuned, argmax, or a file written by maskdist oof RUNS --tune")
    data = read(path)
    base = path.parent
    wanted = sorted(os.path.relpath(Path(e).resolve(), base.resolve()) for e in experiments)
    if sorted(data["experiments"]) != wanted:
        why = f"{path} was tuned for {', '.join(data['experiments'])}, not for {', '.join(wanted)}"
        if choice == "tuned":
            return Applied("argmax", note=f"{why}: deciding by argmax")
        raise MaskdistError(f"{why}: re-run maskdist oof with these experiments --tune, or pass --decisions argmax")
    # the full-data model has no OOF rows to tune on: it votes under its folds' decisions
    by_content = data["format_version"] >= 2
    members = [_member(r, base) for r in runs if not r.full_data]
    have = sorted(_identity(m, by_content) for m in members)
    tuned_on = sorted(_identity(m, by_content) for m in data["members"])
    if have and have != tuned_on:
        changed = _changed_folds(members, data["members"], by_content)
        why = (f"{path} was tuned on other fold models than these ({changed}: retrained, resumed or replaced since; or a"
               f" different set of folds)")
        if choice == "tuned":  # stale: not "present" (a kfold that retrained folds still predicts)
            return Applied("argmax", note=f"{why}: deciding by argmax; re-run maskdist oof RUNS --tune")
        raise MaskdistError(f"{why}: re-run maskdist oof RUNS --tune, or pass --decisions argmax")
    order = [data["experiments"].index(os.path.relpath(Path(e).resolve(), base.resolve())) for e in experiments]
    return Applied(str(path), np.asarray(data["class_weights"], dtype=np.float64),
                   np.asarray(data["experiment_weights"], dtype=np.float64)[order])


def _changed_folds(members: list[dict], tuned_on: list[dict], by_content: bool) -> str:
    """The folds whose model is not the one tuned on, as paths from the decisions file's folder."""
    before = {(m["experiment"], str(m["fold"])): _identity(m, by_content) for m in tuned_on}
    changed = [os.path.normpath(os.path.join(m["experiment"], f"fold{m['fold']}")) for m in members
               if before.get((m["experiment"], str(m["fold"]))) != _identity(m, by_content)]
    return ", ".join(changed) if changed else "the set of folds differs"
