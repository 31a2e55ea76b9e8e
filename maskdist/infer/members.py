"""The fold models an ensemble is made of: the fold runs of one or more experiments (or run
folders given one by one), whether each finished its schedule, and the precision each was
trained with.

An experiment folder holds ``fold<K>`` run folders, one per fold 0..k-1 of the k its models
were trained with (:func:`experiment_runs` lists them; further kinds of run folder inside an
experiment would be added there). A fold that did not finish its schedule is refused, naming
where it stopped, unless the caller allows it; the ensemble then records it.

The full-data model (``all/``, trained on every fold) votes only when its folder is named:
it has no out-of-fold rows, so an experiment folder means its folds alone.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from maskdist import config as config_mod
from maskdist.errors import MaskdistError
from maskdist.system.fileio import sha256_file
from maskdist.train import checkpoint
from maskdist.train.folder import PLAN, read_plan
from maskdist.train.run_folder import experiment_runs
from maskdist.train.state import fold_finished, fold_status

FULL_DATA = config_mod.FULL_DATA  # the full-data model's fold name and run folder (train --fold all)


@dataclass
class FoldRun:
    """One fold model's run folder and its model card."""

    run_dir: Path
    card: dict
    experiment: Path  # the experiment folder (a run folder given alone: its parent)
    stopped: str = ""  # where an unfinished fold stopped; "" when it finished

    @functools.cached_property
    def weights_sha256(self) -> str:
        """The sha256 of the fold's best weights: what names this fold model in everything
        derived from it (decisions, a submission's record, exports), so that a fold retrained,
        resumed or replaced since is told apart even at the same best epoch."""
        return sha256_file(self.run_dir / checkpoint.WEIGHTS)

    @property
    def full_data(self) -> bool:
        return self.card["fold"] == FULL_DATA

    @property
    def fold(self) -> int | str:
        """The held-out fold, or ``"all"`` for the full-data model."""
        return FULL_DATA if self.full_data else int(self.card["fold"])

    @property
    def name(self) -> str:
        return f"{self.experiment.name}/{FULL_DATA if self.full_data else f'fold{self.fold}'}"


def stop_point(run_dir: Path) -> str:
    """Where an unfinished fold stopped (``interrupted at epoch e step s of E epochs``,
    ``interrupted after epoch e ...``, or ``not trained``): :class:`FoldStatus`'s words."""
    return fold_status(Path(run_dir)).describe()


def _experiment(root: Path) -> list[FoldRun]:
    runs, not_trained = [], []
    for run in experiment_runs(root):
        if not (run / checkpoint.MODEL_JSON).is_file() or not (run / checkpoint.WEIGHTS).is_file():
            not_trained.append(f"fold {run.name[4:]}: not trained")
            continue
        runs.append(FoldRun(run, checkpoint.read_card(run), root))
    if not_trained:
        raise MaskdistError(f"{root}: {'; '.join(not_trained)}: train or resume them (maskdist kfold / maskdist train --resume)")
    k = {len(r.card.get("train_folds", [])) + 1 for r in runs}
    if len(k) != 1:
        raise MaskdistError(f"{root}: the fold models were trained with different fold counts {sorted(k)}: retrain them on one shard set")
    expected = set(range(k.pop()))
    found = {r.fold for r in runs}
    if found != expected:
        missing = sorted(expected - found)
        raise MaskdistError(f"{root}: fold(s) {', '.join(map(str, missing))} missing of {len(expected)}: train them,"
                            " or pass the run folders to use one by one")
    return runs


def find_members(sources: Sequence[str | os.PathLike], allow_unfinished: bool = False) -> list[FoldRun]:
    """The fold runs of ``sources``: each an experiment folder (every ``fold<K>`` in it) or
    one run folder (``model.json`` in it). Unfinished folds are refused in one line naming
    where each stopped, unless ``allow_unfinished`` (then ``FoldRun.stopped`` says it)."""
    if not sources:
        raise MaskdistError("pass an experiment folder (or fold run folders)")
    runs: list[FoldRun] = []
    for source in map(Path, sources):
        if (source / checkpoint.MODEL_JSON).exists():
            runs.append(FoldRun(source, checkpoint.read_card(source), source.resolve().parent))
            if not (source / checkpoint.WEIGHTS).is_file():
                raise MaskdistError(f"{source / checkpoint.WEIGHTS} not found: fold {runs[-1].fold} did not finish training; resume it")
        else:
            runs.extend(_experiment(source))
    same_experiment: dict[Path, Path] = {}
    for run in runs:  # RUNS and RUNS/all are of one experiment however each was spelt
        run.experiment = same_experiment.setdefault(run.experiment.resolve(), run.experiment)
    seen: dict[Path, Path] = {}
    for run in runs:
        key = run.run_dir.resolve()
        if key in seen:
            raise MaskdistError(f"{run.run_dir} is given twice (also as {seen[key]}): pass each fold run once")
        seen[key] = run.run_dir
    unfinished = []
    for run in runs:
        if not fold_finished(run.run_dir):
            run.stopped = stop_point(run.run_dir)
            unfinished.append(f"{run.run_dir} (fold {run.fold}): {run.stopped}")
    if unfinished and not allow_unfinished:
        raise MaskdistError(f"unfinished fold(s): {'; '.join(unfinished)}: resume them (maskdist kfold, or train --resume),"
                            " or pass --allow-unfinished to use them as they are")
    return runs


def unnamed_full_data(sources: Sequence[str | os.PathLike], runs: Sequence[FoldRun], left_out: str = "does not vote") -> list[str]:
    """Notes on experiments given whose full-data model exists but was not named (so is
    ``left_out``: does not vote, is not exported)."""
    named = {r.run_dir.resolve() for r in runs if r.full_data}
    notes = []
    for source in map(Path, sources):
        full = source / FULL_DATA
        if not (source / checkpoint.MODEL_JSON).exists() and (full / checkpoint.WEIGHTS).is_file() and full.resolve() not in named:
            notes.append(f"{full} (the full-data model) {left_out}: name it too to add it ({source} {full})")
    return notes


def unfinished(runs: Sequence[FoldRun]) -> list[str]:
    """``name: where it stopped`` of each unfinished run (what the outputs record)."""
    return [f"{r.name}: {r.stopped}" for r in runs if r.stopped]


def trained_precision(runs: Sequence[FoldRun]) -> tuple[str, str]:
    """The mixed precision the folds were trained with (their ``config.yaml``), and a note
    when they disagree (then ``no``: full precision)."""
    found: dict[str, list[str]] = {}
    for run in runs:
        try:
            precision = config_mod.load(run.run_dir / checkpoint.CONFIG).precision
        except MaskdistError:  # a run folder without its configuration: full precision
            precision = "no"
        found.setdefault(precision, []).append(run.name)
    if len(found) == 1:
        return next(iter(found)), ""
    listed = "; ".join(f"{p}: {', '.join(names)}" for p, names in sorted(found.items()))
    return "no", f"the folds were trained with different precisions ({listed}): predicting in full precision; pass --precision to choose"


def mixed_plans(runs: Sequence[FoldRun]) -> list[str]:
    """One line per experiment whose folds were trained under different plans (a fold
    retrained with ``--replan``): the folds that differ from the experiment's plan and how.
    Their OOF figures and votes mix models that are not the same experiment."""
    lines = []
    for experiment in dict.fromkeys(r.experiment for r in runs):
        folds: dict[str, dict] = {}
        for run in runs:
            path = run.run_dir / checkpoint.CONFIG
            if run.experiment == experiment and not run.full_data and path.is_file():  # all/: its epochs come from its folds
                folds[str(run.fold)] = config_mod.training_settings(yaml.safe_load(path.read_text()) or {})
        plans = {tuple(sorted((k, repr(v)) for k, v in settings.items())) for settings in folds.values()}
        if len(plans) < 2:
            continue
        plan = read_plan(experiment)
        reference = config_mod.training_settings(plan) if plan is not None else next(iter(folds.values()))
        odd = {fold: config_mod.differences(reference, settings) for fold, settings in folds.items()
               if config_mod.differences(reference, settings)}
        described = "; ".join(f"fold {fold} ({', '.join(changes)})" for fold, changes in odd.items())
        lines.append(f"{experiment}: its folds were trained under {len(plans)} different plans: against the plan"
                     f" {experiment / PLAN}, {described}; the figures and votes mix them: retrain those folds under the plan"
                     f" (maskdist train --config {experiment / PLAN} --fold K --overwrite --shards SHARDS --out {experiment})")
    return lines
