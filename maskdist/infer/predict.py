"""The submission: the ensemble (:mod:`maskdist.infer.ensemble`) votes on the eval images,
from the shard set's eval part or a competition eval folder, and the decisions
(:mod:`maskdist.infer.decisions`: tuned on the OOF predictions, or the argmax) pick each
image's class.

The main process writes the outputs, atomically: the submission, its ``.probs.npz`` (the
probabilities of the ensemble and of every model) and its ``.predict.json`` (what voted and
how: members, weights, decisions, precision, unfinished folds).
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from maskdist import streams
from maskdist.data import layout
from maskdist.errors import MaskdistError
from maskdist.infer import decisions as decisions_mod, finite
from maskdist.infer.ensemble import Ensemble, InputGroup, check_full_weight, folder_loader, load_ensemble, mix, pin_memory, vote
from maskdist.infer.members import FoldRun, find_members, mixed_plans, trained_precision, unfinished, unnamed_full_data
from maskdist.infer.scoring import FULL_DATA_FOLD
from maskdist.shards import crop as face_crop
from maskdist.shards.format import eval_key
from maskdist.shards.manifest import open_shard_set
from maskdist.system import distributed
from maskdist.system.fileio import atomic_path, atomic_write_json
from maskdist.system.lock import check_free

PRECISIONS = ("auto", "no", "bf16", "fp16")  # auto: the precision the folds were trained with


@dataclass
class EvalSet:
    """The eval images in submission order and how to load them on one rank."""

    info: pd.DataFrame  # info.csv as strings, in file order
    info_path: Path | None
    keys: list[str]  # one per info row: the key predictions are gathered by

    def loader(self, group: InputGroup, batch_size: int, rank: int, world_size: int, workers: int, pin: bool = False):
        """This rank's share of the images, as ``group``'s models take them."""
        raise NotImplementedError


class ShardEval(EvalSet):
    def __init__(self, shards: str, info_csv: str | os.PathLike | None):
        self.shard_set = open_shard_set(shards)
        eval_total = int(self.shard_set.manifest["totals"].get("eval", 0))
        if not eval_total:
            raise MaskdistError(f"{shards} has no eval shards: build it with --eval, or pass --eval-dir")
        info_path = Path(info_csv) if info_csv else None
        if info_path is None:
            built_from = self.shard_set.manifest["build"].get("eval_dir")
            candidate = Path(built_from) / "info.csv" if built_from else None
            info_path = candidate if candidate is not None and candidate.is_file() else None
        if info_path is None:
            raise MaskdistError(f"info.csv of {shards}'s eval set not found: pass --info PATH/info.csv")
        info = layout.read_csv(info_path, layout.EVAL_COLUMNS, "the eval folder")
        if len(info) != eval_total:
            raise MaskdistError(
                f"{info_path} has {len(info)} rows but the shard set holds {eval_total} eval images: "
                "rebuild the shards from this eval folder (skipped images are listed in its report.json)"
            )
        super().__init__(info, info_path, [eval_key(row) for row in range(len(info))])

    def loader(self, group, batch_size, rank, world_size, workers, pin=False):
        face_crop.check_same(face_crop.policy_of(group.card), face_crop.policy_of(self.shard_set.manifest),
                             "the models were trained on", self.shard_set.location)
        return streams.eval_loader(self.shard_set, "eval", batch_size, rank=rank, world_size=world_size, workers=workers,
                                   transform=group.transform(), pin_memory=pin)


class FolderEval(EvalSet):
    def __init__(self, eval_dir: str | os.PathLike):
        table, report = layout.read_eval(eval_dir)
        info_path = Path(eval_dir) / "info.csv"
        info = layout.read_csv(info_path, layout.EVAL_COLUMNS, "the eval folder")
        missing = [p for p in report.problems if p.kind in ("missing-image", "duplicate-row")]
        if missing or len(table) != len(info):
            listed = "; ".join(f"{p.where} ({p.why})" for p in missing[:5])
            raise MaskdistError(f"{info_path} lists {len(info)} images but {len(table)} can be read ({listed}): fix the eval folder")
        super().__init__(info, info_path, list(table["image_id"]))
        self.paths = list(table["path"])

    def loader(self, group, batch_size, rank, world_size, workers, pin=False):
        return folder_loader(self.keys, self.paths, group.folder_transform(), batch_size, rank, world_size, workers, pin)


def write_submission(info: pd.DataFrame, answers: Sequence[int], out: Path) -> None:
    """info.csv with ``ans`` filled: same header, row order and ImageID strings."""
    filled = info.copy()
    filled["ans"] = [str(int(a)) for a in answers]
    with atomic_path(out) as tmp:
        filled.to_csv(tmp, index=False)


def resolve_precision(precision: str, sources: Sequence[str | os.PathLike | FoldRun], allow_unfinished: bool = False) -> tuple[str, str]:
    """``auto``: the precision the folds were trained with (and a note when they disagree);
    any other value as given. ``sources``: folders, or the runs :func:`find_members` found."""
    if precision not in PRECISIONS:
        raise MaskdistError(f"unknown precision {precision!r}: choose {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision, ""
    runs = list(sources) if all(isinstance(s, FoldRun) for s in sources) else find_members(sources, allow_unfinished)
    return trained_precision(runs)


def prepare(sources, weighting: str, decisions: str, precision: str, timeout_s: int, allow_unfinished: bool,
            accelerator=None, full_weight: float | None = None) -> tuple[Ensemble, decisions_mod.Applied, object, list[str]]:
    """The accelerator (in the resolved precision), the ensemble (weighted by the decisions'
    experiment weights when they have them) and the decisions; notes for the user.
    ``full_weight``: a full-data model's share of its experiment's vote."""
    runs = find_members(sources, allow_unfinished)
    check_full_weight(runs, full_weight)
    notes = unnamed_full_data(sources, runs) + mixed_plans(runs)
    if accelerator is None:
        precision, note = resolve_precision(precision, runs)
        notes += [note] if note else []
        accelerator = distributed.make_accelerator(precision, timeout_s)
    experiments = list(dict.fromkeys(r.experiment for r in runs))
    applied = decisions_mod.resolve(decisions, runs, experiments)
    notes += [applied.note] if applied.note else []
    ensemble = load_ensemble(runs, weighting, accelerator.device, allow_unfinished, applied.experiment_weights, full_weight)
    stopped = unfinished([m.run for m in ensemble.members])
    if stopped:
        notes.append(f"voting with unfinished fold(s): {'; '.join(stopped)}")
    return ensemble, applied, accelerator, notes


def describe_ensemble(ensemble: Ensemble, applied: decisions_mod.Applied, precision: str) -> dict:
    """What voted and how (the ``.predict.json`` beside the submission)."""
    return {
        "members": [{"run": str(m.run_dir), "experiment": str(m.run.experiment), "fold": m.run.fold,
                     "architecture": m.card["architecture"], "heads": m.card.get("heads", "single"),
                     "image": m.card["image"], "normalisation": m.card["normalisation"], "weight": float(w),
                     "finished": not m.run.stopped, "stopped": m.run.stopped, "weights_sha256": m.run.weights_sha256}
                    for m, w in zip(ensemble.members, ensemble.weights)],
        "experiments": [str(e) for e in ensemble.experiments],
        "experiment_weights": [float(v) for v in ensemble.experiment_weights],
        "input_groups": [{"resize": g.resize, "crop": g.crop, "members": g.members} for g in ensemble.groups],
        "decisions": applied.name,
        "class_weights": None if applied.class_weights is None else [float(v) for v in applied.class_weights],
        "precision": precision,
        "unfinished": unfinished([m.run for m in ensemble.members]),
    }


def predict(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    shards: str | None = None,
    eval_dir: str | os.PathLike | None = None,
    info_csv: str | os.PathLike | None = None,
    weighting: str = "uniform",
    tta: str = "none",
    batch_size: int = 64,
    workers: int = 2,
    precision: str = "auto",
    timeout_s: int = distributed.DEFAULT_TIMEOUT_S,
    accelerator=None,
    decisions: str = "tuned",
    allow_unfinished: bool = False,
    full_weight: float | None = None,
    allow_nonfinite: bool = False,
) -> dict:
    """Write ``out`` (the submission), its ``.probs.npz`` and its ``.predict.json``; return a summary.
    A model with non-finite output stops it unless ``allow_nonfinite`` (then the images it could
    not compute are voted by the other models and listed in the record; see :mod:`maskdist.infer.finite`).

    ``decisions``: ``tuned`` (the experiment's tuned decisions when it has them, else the
    argmax), ``argmax``, or a decisions file. ``precision``: ``auto`` takes the folds'.
    ``full_weight``: the full-data model's share of its experiment's vote (default: one fold's)."""
    if (shards is None) == (eval_dir is None):
        raise MaskdistError("pass either --shards (the shard set's eval part) or --eval-dir (a competition eval folder)")
    check_free(Path(out).parent)  # not into a folder a live run writes (a fold's, or a kfold's experiment)
    ensemble, applied, accelerator, notes = prepare(sources, weighting, decisions, precision, timeout_s, allow_unfinished, accelerator,
                                                  full_weight)
    eval_set = ShardEval(shards, info_csv) if shards is not None else FolderEval(eval_dir)
    pin = pin_memory(accelerator.device)

    def make_loader(group: InputGroup):
        return eval_set.loader(group, batch_size, accelerator.process_index, accelerator.num_processes, workers, pin)

    started = time.perf_counter()
    votes = vote(ensemble, make_loader, accelerator.device, tta, accelerator.autocast, accelerator)
    seconds = time.perf_counter() - started
    if votes.failed:
        listed = "; ".join(f"{k}: {why}" for k, why in votes.failed[:5])
        raise MaskdistError(f"{len(votes.failed)} eval image(s) could not be read ({listed}): fix or replace them; no submission written")
    nonfinite = finite.find(ensemble, votes).renamed(dict(zip(eval_set.keys, eval_set.info["ImageID"])))
    finite.check(nonfinite, len(eval_set.keys), allow_nonfinite, "eval image(s)",
                 "these images voted by the other models and listed in the record")
    if nonfinite.unanswered:
        raise MaskdistError(f"{len(nonfinite.unanswered)} eval image(s) got no finite output from any model (e.g."
                            f" {nonfinite.unanswered[:3]}): a submission needs an answer for each; no submission written")
    missing = [k for k in eval_set.keys if k not in votes.probs and k not in votes.nonfinite]
    if missing or len(votes.probs) + len(votes.nonfinite) != len(eval_set.keys):
        raise MaskdistError(f"{len(missing)} of {len(eval_set.keys)} eval images got no prediction (e.g. {missing[:3]}): no submission written")
    per_fold = votes.stacked(eval_set.keys)
    mixed = mix(ensemble, per_fold)
    answers = decisions_mod.decide(mixed, applied.class_weights)
    out = Path(out)
    used_precision = accelerator.mixed_precision
    summary = {"images": len(eval_set.keys), "models": len(ensemble.members), "processes": accelerator.num_processes,
               "seconds": seconds, "images_per_s": len(eval_set.keys) / max(seconds, 1e-9), "out": str(out),
               "probs": str(probs_path(out)), "record": str(record_path(out)), "decisions": applied.name,
               "precision": used_precision, "notes": notes, "unfinished": unfinished([m.run for m in ensemble.members]),
               "nonfinite": nonfinite.to_dict(),
               "nonfinite_lines": finite.warning_lines(nonfinite, len(eval_set.keys), str(record_path(out)), "eval image(s)")}
    if accelerator.is_main_process:
        write_submission(eval_set.info, answers, out)
        class_weights = applied.class_weights if applied.class_weights is not None else np.ones(mixed.shape[1])
        with atomic_path(probs_path(out)) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, image_id=np.array(eval_set.info["ImageID"], dtype=str), probs=mixed,
                                fold_probs=per_fold.astype(np.float32), weights=ensemble.weights.astype(np.float32),
                                folds=np.array([FULL_DATA_FOLD if m.run.full_data else m.run.fold for m in ensemble.members]),
                                decisions=np.array(applied.name), class_weights=class_weights.astype(np.float32),
                                unfinished=np.array(summary["unfinished"], dtype=str))
        atomic_write_json(record_path(out), describe_ensemble(ensemble, applied, used_precision)
                          | {"tta": tta, "weighting": weighting, "images": len(eval_set.keys), "nonfinite": nonfinite.to_dict()})
    accelerator.wait_for_everyone()
    return summary


def probs_path(submission: Path) -> Path:
    return submission.with_name(submission.stem + ".probs.npz")


def record_path(submission: Path) -> Path:
    return submission.with_name(submission.stem + ".predict.json")
