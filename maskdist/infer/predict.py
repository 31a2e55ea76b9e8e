"""The k-fold ensemble: every fold model votes (mean of softmax probabilities) on every image.

Runs on any number of processes: each process predicts its own share of the images with all
fold models, then ``gather_object`` collects ``(key, probabilities)`` rows on every process
and duplicates are dropped by key, so each image is predicted once whatever the process
count. The main process writes the outputs, atomically.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from maskdist import streams
from maskdist.config import TTAS, WEIGHTINGS
from maskdist.data import layout, transforms
from maskdist.data.images import ImageError, decode_rgb
from maskdist.errors import MaskdistError
from maskdist.model import heads
from maskdist.shards import crop as face_crop
from maskdist.shards.format import eval_key
from maskdist.shards.manifest import open_shard_set
from maskdist.system import distributed, parallel
from maskdist.system.fileio import atomic_path
from maskdist.train import checkpoint


@dataclass
class Member:
    """One fold model of the ensemble."""

    run_dir: Path
    card: dict
    model: torch.nn.Module | None = None


@dataclass
class Ensemble:
    members: list[Member]
    weights: np.ndarray  # one per member, summing to 1
    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    folds: int = 0
    notes: list[str] = field(default_factory=list)


def find_members(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Fold run folders: every ``fold<K>`` of an experiment folder, or run folders given one by one.

    An experiment folder must hold every fold 0..k-1 of the k its models were trained with.
    """
    if len(sources) == 1 and not (Path(sources[0]) / checkpoint.MODEL_JSON).exists():
        root = Path(sources[0])
        if not root.is_dir():
            raise MaskdistError(f"{root} not found: pass the experiment folder that holds fold0, fold1, ...")
        runs = sorted((p for p in root.iterdir() if re.fullmatch(r"fold\d+", p.name)), key=lambda p: int(p.name[4:]))
        if not runs:
            raise MaskdistError(f"{root} holds no fold<K> folders: train the folds first (maskdist kfold / maskdist train)")
        cards = {}
        for run in runs:
            cards[run] = checkpoint.read_card(run)
            if not (run / checkpoint.WEIGHTS).is_file():
                raise MaskdistError(f"{run / checkpoint.WEIGHTS} not found: fold {run.name[4:]} did not finish training; resume it")
        k = {len(card.get("train_folds", [])) + 1 for card in cards.values()}
        if len(k) != 1:
            raise MaskdistError(f"{root}: the fold models were trained with different fold counts {sorted(k)}: retrain them on one shard set")
        expected = set(range(k.pop()))
        found = {card["fold"] for card in cards.values()}
        if found != expected:
            missing = sorted(expected - found)
            raise MaskdistError(f"{root}: fold(s) {', '.join(map(str, missing))} missing of {len(expected)}: train them,"
                                " or pass the run folders to use one by one")
        return runs
    runs = [Path(s) for s in sources]
    for run in runs:
        checkpoint.read_card(run)
    return runs


def load_ensemble(sources: Sequence[str | os.PathLike], weighting: str = "uniform", device: torch.device | str = "cpu") -> Ensemble:
    """Load the fold models; refuse models that disagree on classes, input size or normalisation."""
    if weighting not in WEIGHTINGS:
        raise MaskdistError(f"unknown ensemble weighting {weighting!r}: choose {' or '.join(WEIGHTINGS)}")
    runs = find_members(sources)
    members = []
    for run in runs:
        model, card = checkpoint.load(run, device)
        members.append(Member(run, card, model))
    first = members[0].card
    for member in members[1:]:
        for key in ("num_classes", "classes", "image", "normalisation", "metric_age_cut", "crop"):
            if member.card.get(key) != first.get(key):
                raise MaskdistError(
                    f"{member.run_dir} disagrees with {members[0].run_dir} on {key} "
                    f"({member.card.get(key)} vs {first.get(key)}): ensemble models must share classes and input"
                )
    folds = [m.card["fold"] for m in members]
    if len(set(folds)) != len(folds):
        raise MaskdistError(f"two models of the same fold ({folds}): pass each fold once")
    if weighting == "f1":
        f1 = np.array([float(m.card["metrics"]["macro_f1"]) for m in members])
        weights = f1 / f1.sum() if f1.sum() > 0 else np.full(len(members), 1 / len(members))
    else:
        weights = np.full(len(members), 1 / len(members))
    return Ensemble(members, weights, first["image"]["resize"], first["image"]["crop"],
                    tuple(first["normalisation"]["mean"]), tuple(first["normalisation"]["std"]), len(members))


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


def folder_loader(keys, paths, transform, batch_size: int, rank: int, world_size: int, workers: int) -> DataLoader:
    """This rank's share (every world_size-th image) of a list of files."""
    share = slice(rank, None, world_size)
    dataset = FolderImages(list(keys)[share], list(paths)[share], transform)
    kwargs = dict(worker_init_fn=parallel.worker_init(), multiprocessing_context=parallel.context()) if workers else {}
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate, **kwargs)


def ensemble_probs(ensemble: Ensemble, loader, device, tta: str = "none", autocast=contextlib.nullcontext) -> tuple[list, list]:
    """This process's ``(key, ensemble probs, per-fold probs)`` rows and failed ``(key, why)``;
    ``autocast`` is the accelerator's mixed-precision context."""
    if tta not in TTAS:
        raise MaskdistError(f"unknown TTA {tta!r}: choose {' or '.join(TTAS)}")
    rows, failed = [], []
    weights = torch.tensor(ensemble.weights, dtype=torch.float32)
    channels_last = torch.device(device).type == "cuda"
    with torch.no_grad():
        for batch in loader:
            x = transforms.to_device(batch["image"], device, ensemble.mean, ensemble.std, channels_last)
            views = [x, torch.flip(x, dims=[3])] if tta == "hflip" else [x]
            per_fold = []
            for member in ensemble.members:
                probs = 0
                for view in views:
                    with autocast():
                        probs = probs + heads.probabilities(member.model(view), member.card.get("heads", "single"))
                per_fold.append((probs / len(views)).cpu())
            stacked = torch.stack(per_fold, dim=1)  # N x folds x classes
            mixed = (stacked * weights.view(1, -1, 1)).sum(dim=1)
            oks = batch.get("ok", [True] * len(batch["key"]))
            for i, key in enumerate(batch["key"]):
                if oks[i]:
                    rows.append((key, mixed[i].numpy(), stacked[i].numpy()))
                else:
                    failed.append((key, batch["why"][i]))
    return rows, failed


def by_key(rows: list) -> dict:
    """``key -> (ensemble probs, per-fold probs)``, the first row of each key (gathered
    rows may repeat a key)."""
    out = {}
    for key, mixed, per_fold in rows:
        out.setdefault(key, (mixed, per_fold))
    return out


@dataclass
class EvalSet:
    """The eval images in submission order and how to load them on one rank."""

    info: pd.DataFrame  # info.csv as strings, in file order
    info_path: Path | None
    keys: list[str]  # one per info row: the key predictions are gathered by

    def loader(self, ensemble: Ensemble, batch_size: int, rank: int, world_size: int, workers: int):
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

    def loader(self, ensemble, batch_size, rank, world_size, workers):
        face_crop.check_same(face_crop.policy_of(ensemble.members[0].card), face_crop.policy_of(self.shard_set.manifest),
                             "the models were trained on", self.shard_set.location)
        tf = transforms.build_transform("none", ensemble.resize, ensemble.crop)
        return streams.eval_loader(self.shard_set, "eval", batch_size, rank=rank, world_size=world_size, workers=workers, transform=tf)


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

    def loader(self, ensemble, batch_size, rank, world_size, workers):
        tf = face_crop.folder_transform(transforms.build_transform("none", ensemble.resize, ensemble.crop), ensemble.members[0].card)
        return folder_loader(self.keys, self.paths, tf, batch_size, rank, world_size, workers)


def write_submission(info: pd.DataFrame, answers: Sequence[int], out: Path) -> None:
    """info.csv with ``ans`` filled: same header, row order and ImageID strings."""
    filled = info.copy()
    filled["ans"] = [str(int(a)) for a in answers]
    with atomic_path(out) as tmp:
        filled.to_csv(tmp, index=False)


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
    precision: str = "no",
    timeout_s: int = distributed.DEFAULT_TIMEOUT_S,
    accelerator=None,
) -> dict:
    """Write ``out`` (the submission) and ``out``'s ``.probs.npz``; return a summary."""
    import time

    if (shards is None) == (eval_dir is None):
        raise MaskdistError("pass either --shards (the shard set's eval part) or --eval-dir (a competition eval folder)")
    if accelerator is None:
        accelerator = distributed.make_accelerator(precision, timeout_s)
    ensemble = load_ensemble(sources, weighting, accelerator.device)
    eval_set = ShardEval(shards, info_csv) if shards is not None else FolderEval(eval_dir)
    loader = eval_set.loader(ensemble, batch_size, accelerator.process_index, accelerator.num_processes, workers)
    started = time.perf_counter()
    rows, failed = ensemble_probs(ensemble, loader, accelerator.device, tta, accelerator.autocast)
    seconds = time.perf_counter() - started
    predicted = by_key(distributed.gather_rows(rows, accelerator))
    failed = distributed.gather_rows(failed, accelerator)
    if failed:
        listed = "; ".join(f"{k}: {why}" for k, why in failed[:5])
        raise MaskdistError(f"{len(failed)} eval image(s) could not be read ({listed}): fix or replace them; no submission written")
    missing = [k for k in eval_set.keys if k not in predicted]
    if missing or len(predicted) != len(eval_set.keys):
        raise MaskdistError(f"{len(missing)} of {len(eval_set.keys)} eval images got no prediction (e.g. {missing[:3]}): no submission written")
    mixed = np.stack([predicted[k][0] for k in eval_set.keys])
    per_fold = np.stack([predicted[k][1] for k in eval_set.keys])
    out = Path(out)
    summary = {"images": len(eval_set.keys), "models": len(ensemble.members), "processes": accelerator.num_processes,
               "seconds": seconds, "images_per_s": len(eval_set.keys) / max(seconds, 1e-9),
               "out": str(out), "probs": str(probs_path(out))}
    if accelerator.is_main_process:
        write_submission(eval_set.info, mixed.argmax(axis=1), out)
        with atomic_path(probs_path(out)) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, image_id=np.array(eval_set.info["ImageID"], dtype=str), probs=mixed.astype(np.float32),
                                fold_probs=per_fold.astype(np.float32), weights=ensemble.weights.astype(np.float32),
                                folds=np.array([m.card["fold"] for m in ensemble.members]))
    accelerator.wait_for_everyone()
    return summary


def probs_path(submission: Path) -> Path:
    return submission.with_name(submission.stem + ".probs.npz")
