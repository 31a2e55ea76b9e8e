"""The ensemble: fold models of one or more experiments, each fed its own input.

Models may differ in architecture, heads (single or parts), input size, normalisation and
face crop. They are grouped by input size and crop (:class:`InputGroup`): each group is one pass over the images
(decoded and resized once for the group), and inside a pass every model gets the batch
normalised with its own mean and std on the device. The vote is the weighted mean of the
models' 18-class probabilities: inside an experiment its folds weigh equally (or by their
validation F1), and experiments weigh equally unless tuned weights are given
(:mod:`maskdist.infer.decisions`). A full-data model named beside its experiment's folds
votes as one more fold, or with the share of the experiment's vote it is given.

Runs on any number of processes: each process predicts its own share of the images, then
``gather_object`` collects ``(key, probabilities)`` rows on every process and duplicates are
dropped by key, so each image is predicted once whatever the process count.

On CUDA (the only device-specific branches, marked ``cuda``): loaders pin their memory,
models are channels_last like their inputs, and one host copy is made per batch for all
models together.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from maskdist.config import TTAS, WEIGHTINGS
from maskdist.data import labels, transforms
from maskdist.data.images import ImageError, decode_rgb
from maskdist.errors import MaskdistError
from maskdist.infer.members import FoldRun, find_members
from maskdist.model import heads
from maskdist.shards import crop as face_crop
from maskdist.system import distributed, parallel
from maskdist.system.worker_death import WorkerDied, guarded
from maskdist.train import checkpoint

# What every model of one ensemble must share (input size and normalisation may differ).
SHARED_CARD_KEYS = ("num_classes", "classes", "metric_age_cut")


@dataclass
class Member:
    """One fold model of the ensemble."""

    run: FoldRun
    model: torch.nn.Module | None = None

    @property
    def card(self) -> dict:
        return self.run.card

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        norm = self.card["normalisation"]
        return tuple(norm["mean"]), tuple(norm["std"])


@dataclass
class InputGroup:
    """Models fed the same decoded images (same input size, same face crop or none): one
    pass over the eval set."""

    resize: int
    crop: int
    members: list[int]  # indices into Ensemble.members
    card: dict = field(default_factory=dict)  # the first member's model card (its crop policy)

    def transform(self) -> transforms.Transform:
        return transforms.build_transform("none", self.resize, self.crop)

    def folder_transform(self):
        """The transform of photos from files: behind the face crop the models were trained with."""
        return face_crop.folder_transform(self.transform(), self.card)


@dataclass
class Ensemble:
    members: list[Member]
    weights: np.ndarray  # one per member, summing to 1
    experiments: list[Path]  # in the order given
    experiment_weights: np.ndarray  # one per experiment, summing to 1
    groups: list[InputGroup] = field(default_factory=list)

    @property
    def folds(self) -> int:
        return len(self.members)

    def experiment_of(self, member: Member) -> int:
        return self.experiments.index(member.run.experiment)


def _within_experiment(runs: Sequence[FoldRun], weighting: str, full_weight: float | None = None) -> np.ndarray:
    """Weights of one experiment's models, summing to 1. Full-data models (no validation F1)
    share ``full_weight`` of it (default: as many folds' worth as they are models)."""
    full = np.array([r.full_data for r in runs])
    if full.any() and not full.all():
        share = full.mean() if full_weight is None else full_weight
        folds = _fold_weights([r for r in runs if not r.full_data], weighting)
        weights = np.zeros(len(runs))
        weights[full] = share / full.sum()
        weights[~full] = (1 - share) * folds
        return weights
    return _fold_weights(runs, weighting) if not full.any() else np.full(len(runs), 1 / len(runs))


def _fold_weights(runs: Sequence[FoldRun], weighting: str) -> np.ndarray:
    if weighting == "f1":
        f1 = np.array([float(r.card["metrics"]["macro_f1"]) for r in runs])
        if f1.sum() > 0:
            return f1 / f1.sum()
    return np.full(len(runs), 1 / len(runs))


def load_ensemble(sources: Sequence[str | os.PathLike | FoldRun], weighting: str = "uniform", device: torch.device | str = "cpu",
                  allow_unfinished: bool = False, experiment_weights: Sequence[float] | None = None,
                  full_weight: float | None = None) -> Ensemble:
    """Load the fold models of ``sources`` (folders, see :func:`maskdist.infer.members.find_members`,
    or the runs it found); refuse models that disagree on classes or the metric's age cut.
    ``full_weight``: the full-data models' share of their experiment's vote."""
    if weighting not in WEIGHTINGS:
        raise MaskdistError(f"unknown ensemble weighting {weighting!r}: choose {' or '.join(WEIGHTINGS)}")
    runs = list(sources) if sources and all(isinstance(s, FoldRun) for s in sources) else find_members(sources, allow_unfinished)
    check_full_weight(runs, full_weight)
    device = torch.device(device)
    members = []
    for run in runs:
        model, _card = checkpoint.load(run.run_dir, device)
        if device.type == "cuda":  # cuda: the inputs are channels_last there, so the weights are too
            model = model.to(memory_format=torch.channels_last)
        members.append(Member(run, model))
    first = members[0]
    for member in members[1:]:
        for key in SHARED_CARD_KEYS:
            if member.card.get(key) != first.card.get(key):
                raise MaskdistError(
                    f"{member.run_dir} disagrees with {first.run_dir} on {key} "
                    f"({member.card.get(key)} vs {first.card.get(key)}): ensemble models must share classes and the age cut"
                )
    experiments = list(dict.fromkeys(r.experiment for r in runs))
    if experiment_weights is None:
        between = np.full(len(experiments), 1 / len(experiments))
    else:
        between = np.asarray(experiment_weights, dtype=np.float64)
        if len(between) != len(experiments) or (between < 0).any() or between.sum() <= 0:
            raise MaskdistError(f"{len(between)} experiment weights {list(between)} for {len(experiments)} experiment(s):"
                                " give one non-negative weight per experiment")
        between = between / between.sum()
    weights = np.zeros(len(members))
    for e, experiment in enumerate(experiments):
        inside = [i for i, r in enumerate(runs) if r.experiment == experiment]
        weights[inside] = between[e] * _within_experiment([runs[i] for i in inside], weighting, full_weight)
    groups: dict[tuple, InputGroup] = {}
    for i, member in enumerate(members):
        size = (int(member.card["image"]["resize"]), int(member.card["image"]["crop"]))
        policy = json.dumps(face_crop.policy_of(member.card), sort_keys=True)
        groups.setdefault((*size, policy), InputGroup(*size, [], member.card)).members.append(i)
    return Ensemble(members, weights, experiments, between, list(groups.values()))


def check_full_weight(runs: Sequence[FoldRun], full_weight: float | None) -> None:
    """``--full-weight`` needs a full-data model beside folds of its experiment, and a share in (0, 1)."""
    if full_weight is None:
        return
    if not 0 < full_weight < 1:
        raise MaskdistError(f"--full-weight {full_weight}: give the full-data model's share of the vote, between 0 and 1")
    beside = {r.experiment for r in runs if r.full_data} & {r.experiment for r in runs if not r.full_data}
    if not beside:
        raise MaskdistError("--full-weight needs a full-data model beside its experiment's folds: pass RUNS and RUNS/all")


class FolderImages(Dataset):
    """Images from files, for a competition eval folder or outside images.

    Undecodable files do not stop the loader: they come back with ``ok`` False and the
    reason, for the caller to refuse (a submission) or skip and report (pseudo-labels).
    """

    def __init__(self, keys: Sequence[str], paths: Sequence[str], transform: transforms.Transform):
        self.keys, self.paths, self.transform = list(keys), list(paths), transform
        size = transform.output_size
        self._blank = np.zeros((3, *size), np.uint8)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            with open(path, "rb") as handle:
                rgb = decode_rgb(handle.read())
            return {"image": self.transform(rgb), "key": self.keys[index], "ok": True, "why": ""}
        except (ImageError, OSError) as err:
            return {"image": self._blank, "key": self.keys[index], "ok": False, "why": str(err)}


def _collate(items: list[dict]) -> dict:
    return {
        "image": torch.from_numpy(np.stack([i["image"] for i in items])),
        "key": [i["key"] for i in items],
        "ok": [i["ok"] for i in items],
        "why": [i["why"] for i in items],
    }


def pin_memory(device: torch.device | str) -> bool:
    """Loaders pin their batches on CUDA (the copy to the device then overlaps); not elsewhere."""
    return torch.device(device).type == "cuda"


def folder_loader(keys, paths, transform, batch_size: int, rank: int, world_size: int, workers: int,
                  pin: bool = False) -> DataLoader:
    """This rank's share (every world_size-th image) of a list of files."""
    share = slice(rank, None, world_size)
    dataset = FolderImages(list(keys)[share], list(paths)[share], transform)
    kwargs = dict(worker_init_fn=parallel.worker_init(), multiprocessing_context=parallel.context()) if workers else {}
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate, pin_memory=pin, **kwargs)


def group_probs(ensemble: Ensemble, group: InputGroup, loader, device, tta: str = "none",
                autocast=contextlib.nullcontext) -> tuple[list, list]:
    """This process's ``(key, probs of the group's models)`` rows (an array of models x
    classes per image) and failed ``(key, why)``; ``autocast`` is the accelerator's
    mixed-precision context."""
    if tta not in TTAS:
        raise MaskdistError(f"unknown TTA {tta!r}: choose {' or '.join(TTAS)}")
    device = torch.device(device)
    channels_last = device.type == "cuda"
    members = [ensemble.members[i] for i in group.members]
    rows, failed = [], []
    batches = loader  # StreamLoaders guard themselves against a dead worker; DataLoaders are guarded here
    if isinstance(loader, DataLoader):
        batches = guarded(loader, "prediction")
    elif isinstance(getattr(loader, "iterable", None), DataLoader):  # under a progress bar (tqdm)
        loader.iterable = guarded(loader.iterable, "prediction")
    with torch.no_grad():
        for batch in batches:
            images = batch["image"].to(device, non_blocking=True)  # once for every model of the group
            inputs: dict[tuple, list[torch.Tensor]] = {}
            out = torch.empty((len(images), len(members), labels.NUM_CLASSES), dtype=torch.float32, device=device)
            for j, member in enumerate(members):
                norm = member.normalisation
                if norm not in inputs:
                    x = transforms.to_device(images, device, *norm, channels_last)
                    inputs[norm] = [x, torch.flip(x, dims=[3])] if tta == "hflip" else [x]
                views = inputs[norm]
                probs = 0
                for view in views:
                    with autocast():
                        probs = probs + heads.probabilities(member.model(view), member.card.get("heads", "single"))
                out[:, j] = probs / len(views)
            host = out.cpu().numpy()  # one copy per batch for all models
            oks = batch.get("ok", [True] * len(batch["key"]))
            for i, key in enumerate(batch["key"]):
                if oks[i]:
                    rows.append((key, host[i]))
                else:
                    failed.append((key, batch["why"][i]))
    return rows, failed


@dataclass
class Votes:
    """Every model's probabilities per image, gathered from all processes."""

    probs: dict  # key -> models x classes, every model's output finite
    failed: list  # (key, why), one per image that could not be read
    nonfinite: dict = field(default_factory=dict)  # key -> models x classes, NaN where a model's output was not finite

    def stacked(self, keys: Sequence[str]) -> np.ndarray:
        """images x models x classes, in ``keys`` order (rows of ``nonfinite`` hold NaN for their failed models)."""
        return np.stack([self.probs[k] if k in self.probs else self.nonfinite[k] for k in keys])


def vote(ensemble: Ensemble, make_loader: Callable[[InputGroup], object], device, tta: str = "none",
         autocast=contextlib.nullcontext, accelerator=None) -> Votes:
    """Every model's probabilities on every image: one pass per input group, each over the
    loader ``make_loader(group)`` returns (closed afterwards when it can be)."""
    per_key: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for group in ensemble.groups:
        loader = make_loader(group)
        try:
            rows, bad = group_probs(ensemble, group, loader, device, tta, autocast)
        except WorkerDied as died:
            raise died.then("nothing was written: run the same command again") from None
        finally:
            if hasattr(loader, "close"):
                loader.close()
        seen = set()
        for key, probs in distributed.gather_rows(rows, accelerator):
            if key in seen:  # gathered rows may repeat a key
                continue
            seen.add(key)
            per_key.setdefault(key, np.full((ensemble.folds, labels.NUM_CLASSES), np.nan, np.float32))[group.members] = probs
        for key, why in distributed.gather_rows(bad, accelerator):
            failed.setdefault(key, why)
    read = {k: v for k, v in per_key.items() if k not in failed}
    # A model whose output is not finite (NaN or inf) on an image is kept apart, never dropped:
    # the caller names it (maskdist.infer.finite).
    finite = {k: v for k, v in read.items() if np.isfinite(v).all()}
    nonfinite = {k: np.where(np.isfinite(v).all(axis=1, keepdims=True), v, np.nan).astype(np.float32)
                 for k, v in read.items() if k not in finite}
    return Votes(finite, sorted(failed.items()), nonfinite)


def mix(ensemble: Ensemble, member_probs: np.ndarray) -> np.ndarray:
    """The ensemble's probabilities from images x models x classes. An image some models gave
    no finite output for is voted by the others, their weights scaled to sum to 1; by none: NaN."""
    finite = np.isfinite(member_probs).all(axis=2)
    if finite.all():
        return np.einsum("nmc,m->nc", member_probs, ensemble.weights).astype(np.float32)
    weights = finite * ensemble.weights[None, :]
    total = weights.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mixed = np.einsum("nmc,nm->nc", np.nan_to_num(member_probs, nan=0.0, posinf=0.0, neginf=0.0), weights) / total
    return np.where(total > 0, mixed, np.nan).astype(np.float32)
