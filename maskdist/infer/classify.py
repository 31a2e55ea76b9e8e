"""``maskdist classify``: the ensemble on photos outside the competition layout.

Photos and folders (searched recursively) go through the same ensemble, input groups,
resize/crop and face crop as ``predict``'s eval folder (:mod:`maskdist.infer.ensemble`),
batched on the device the accelerator picks (the GPU when there is one), and the decisions
``predict`` would take (``tuned`` or the argmax). Unreadable files are named and skipped;
the CSV holds one row per photo read: path, class, the mask / gender / age names, the
probability of the class and a note. A model with non-finite output stops it
(:mod:`maskdist.infer.finite`) unless ``--allow-nonfinite``: then such photos are voted by the
other models, or kept without a class, and the note says why.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from maskdist.data import labels
from maskdist.errors import MaskdistError, rate
from maskdist.infer import finite
from maskdist.infer.decisions import decide
from maskdist.infer.ensemble import folder_loader, mix, pin_memory, vote
from maskdist.infer.predict import prepare
from maskdist.infer.pseudo import list_images
from maskdist.system import distributed
from maskdist.system.fileio import atomic_path

COLUMNS = ["path", "class", "mask", "gender", "age", "probability", "note"]


@dataclass
class Classified:
    rows: pd.DataFrame  # COLUMNS, in the order the photos were given (folders sorted)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    images: int = 0
    seconds: float = 0.0
    models: int = 0
    decisions: str = "argmax"
    device: str = "cpu"
    notes: list = field(default_factory=list)
    nonfinite: finite.NonFinite = field(default_factory=finite.NonFinite)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def describe(self, out: Path | None) -> str:
        lines = [f"note: {n}" for n in self.notes]
        lines += [f"{int(self.rows['class'].notna().sum())} of {self.images} photo(s) classified by {self.models} model(s) on {self.device}"
                  f" ({rate(self.images, self.seconds)}; decisions {self.decisions})" + (f": {out}" if out else "")]
        lines += [f"unreadable, skipped: {path} ({why})" for path, why in self.unreadable]
        if self.unreadable:
            lines.append(f"{len(self.unreadable)} unreadable file(s) skipped")
        lines += finite.warning_lines(self.nonfinite, self.images, "the CSV's note column" if out else "the note column",
                                      "photo(s)")
        return "\n".join(lines)


def photos(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The photos ``inputs`` name: files as given, folders' images (recursively), each once."""
    found: dict[str, Path] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.update((str(p), p) for p in list_images(path))
        elif path.exists():
            found[str(path)] = path
        else:
            raise MaskdistError(f"{path} not found: pass photos or folders of photos")
    if not found:
        raise MaskdistError(f"no .jpg/.jpeg/.png photos in {', '.join(map(str, inputs))}")
    return list(found.values())


def _progress(loader, total: int, show: bool):
    """A progress bar over the batches, on a terminal only (logs stay clean)."""
    if not show:
        return loader
    from tqdm import tqdm

    return tqdm(loader, total=total, unit="batch", desc="classify", file=sys.stderr, leave=False)


def classify(
    sources: Sequence[str | os.PathLike],
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    tta: str = "none",
    weighting: str = "uniform",
    decisions: str = "tuned",
    batch_size: int = 64,
    workers: int = 2,
    precision: str = "auto",
    timeout_s: int = distributed.DEFAULT_TIMEOUT_S,
    allow_unfinished: bool = False,
    progress: bool | None = None,
    accelerator=None,
    allow_nonfinite: bool = False,
) -> Classified:
    """Classify the photos of ``inputs``; write ``out`` (a CSV, atomically) when given.
    ``progress`` None: a bar when stderr is a terminal. Nothing readable, or a model with
    non-finite output (unless ``allow_nonfinite``), stops it with nothing written."""
    images = photos(inputs)
    ensemble, applied, accelerator, notes = prepare(sources, weighting, decisions, precision, timeout_s, allow_unfinished, accelerator)
    keys = [str(p) for p in images]
    pin = pin_memory(accelerator.device)
    show = (sys.stderr.isatty() if progress is None else progress) and accelerator.is_main_process

    def make_loader(group):
        loader = folder_loader(keys, keys, group.folder_transform(), batch_size, accelerator.process_index,
                               accelerator.num_processes, workers, pin)
        return _progress(loader, len(loader), show)

    started = time.perf_counter()
    votes = vote(ensemble, make_loader, accelerator.device, tta, accelerator.autocast, accelerator)
    seconds = time.perf_counter() - started
    if votes.failed and len(votes.failed) == len(keys):
        path, why = votes.failed[0]
        raise MaskdistError(f"none of the {len(keys)} photo(s) could be read (e.g. {path}: {why}): pass JPEG or PNG photos;"
                            " nothing classified")
    nonfinite = finite.find(ensemble, votes)
    finite.check(nonfinite, len(keys), allow_nonfinite, "photo(s)")
    why = dict(nonfinite.rows)
    read = [k for k in keys if k in votes.probs or k in votes.nonfinite]
    records = []
    if read:
        mixed = mix(ensemble, votes.stacked(read))
        answered = np.isfinite(mixed).all(axis=1)
        chosen = decide(np.nan_to_num(mixed, nan=0.0), applied.class_weights)
        for key, label, probs, ok in zip(read, chosen, mixed, answered):
            if not ok:
                records.append({"path": key, "note": why[key]})
                continue
            mask, gender, age = labels.decode(int(label))
            records.append({"path": key, "class": int(label), "mask": labels.MASK_NAMES[mask], "gender": labels.GENDER_NAMES[gender],
                            "age": labels.AGE_NAMES[age], "probability": round(float(probs[label]), 6), "note": why.get(key, "")})
    rows = pd.DataFrame(records, columns=COLUMNS).astype({"class": "Int64"})
    if out is not None and accelerator.is_main_process:
        with atomic_path(Path(out)) as tmp:
            rows.to_csv(tmp, index=False)
    accelerator.wait_for_everyone()
    return Classified(rows, votes.failed, len(keys), seconds, len(ensemble.members), applied.name,
                      str(accelerator.device), notes, nonfinite)
