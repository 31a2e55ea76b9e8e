"""Pseudo-labelling: the fold ensemble labels outside images, for ``shards build --extra``.

The recipe's outside images were mostly unmasked older people with the age in the file
name, so the age can come from the name (``--age-from-filename``) while mask and gender come
from the ensemble. Unsure images (ensemble confidence below ``min_confidence``) and
unreadable files are dropped and counted; a model with non-finite output stops it unless
``--allow-nonfinite`` (:mod:`maskdist.infer.finite`), and the images it could not compute are named.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from maskdist.data import labels, layout
from maskdist.errors import MaskdistError
from maskdist.infer import finite
from maskdist.infer.decisions import decide
from maskdist.infer.ensemble import folder_loader, mix, pin_memory, vote
from maskdist.infer.predict import prepare
from maskdist.system import distributed
from maskdist.system.fileio import atomic_path
from maskdist.system.lock import check_free


@dataclass
class PseudoReport:
    images: int = 0
    labelled: int = 0
    low_confidence: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    age_from_name: int = 0
    age_not_in_name: int = 0
    low_part_confidence: dict = field(default_factory=dict)  # part -> images dropped below its threshold
    out: str = ""
    decisions: str = "argmax"
    notes: list = field(default_factory=list)
    nonfinite: finite.NonFinite = field(default_factory=finite.NonFinite)

    def describe(self) -> str:
        lines = [*self.notes, f"pseudo-labelled {self.labelled} of {self.images} images -> {self.out} (decisions: {self.decisions})",
                 f"  dropped below the confidence threshold: {self.low_confidence}"
                 + "".join(f"; below the {part} threshold: {n}" for part, n in self.low_part_confidence.items()),
                 f"  unreadable, skipped: {len(self.unreadable)}"]
        lines += [f"    {path}: {why}" for path, why in self.unreadable[:10]]
        if self.age_from_name or self.age_not_in_name:
            lines.append(f"  age from the file name: {self.age_from_name}; name without an age (model's age group kept): {self.age_not_in_name}")
        if self.nonfinite:
            lines.append(f"  no finite output from any model, not labelled: {len(self.nonfinite.unanswered)}")
            lines += finite.warning_lines(self.nonfinite, self.images, "the lines above", limit=len(self.nonfinite.rows))
        return "\n".join(lines)


PART_AXES = {"mask": 0, "gender": 1, "age": 2}  # axes of the (3, 2, 3) class probabilities


def _part_probability(probs: np.ndarray, part: str, value: int) -> float:
    """P(part = value) from (mask, gender, age group) class probabilities."""
    axis = PART_AXES[part]
    others = tuple(a for a in range(3) if a != axis)
    return float(probs.sum(axis=others)[value])


def parse_part_confidence(text: str | None, option: str = "--part-confidence",
                          example: str = "mask=0.5,gender=0.9,age=0.8") -> dict[str, float]:
    """``"mask=0.5,gender=0.9,age=0.8"`` -> {"mask": 0.5, ...} (also the audit's ``--min-evidence``)."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        part, _, value = item.partition("=")
        try:
            out[part.strip()] = float(value)
        except ValueError:
            raise MaskdistError(f"{option} {text!r}: expected name=value pairs, e.g. {example}") from None
    return out


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), without hidden and macOS junk entries."""
    if not folder.is_dir():
        raise MaskdistError(f"{folder} not found: pass the folder of outside images")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in layout.IMAGE_EXTENSIONS]
    return found


def pseudo_label(
    sources: Sequence[str | os.PathLike],
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    min_confidence: float = 0.0,
    age_from_filename: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    precision: str = "auto",
    timeout_s: int = distributed.DEFAULT_TIMEOUT_S,
    accelerator=None,
    part_confidence: dict[str, float] | None = None,
    decisions: str = "tuned",
    allow_unfinished: bool = False,
    allow_nonfinite: bool = False,
) -> PseudoReport:
    """Label the images of ``images_dir`` with the ensemble; write ``out`` (an extra-data CSV).

    An image is kept when the ensemble's confidence in its label is at least
    ``min_confidence`` and, for each part in ``part_confidence`` (``mask``, ``gender``,
    ``age``), the probability of the chosen part value (summed over the other parts) is at
    least that part's threshold; the age threshold does not apply to an age read from the
    file name. The label is the decisions' choice (``tuned``, ``argmax`` or a file, as for
    ``predict``); with the age from the file name, among the classes of that age group.
    """
    part_confidence = dict(part_confidence or {})
    unknown = set(part_confidence) - set(PART_AXES)
    if unknown or not all(0.0 <= v <= 1.0 for v in part_confidence.values()) or not 0.0 <= min_confidence <= 1.0:
        raise MaskdistError(f"confidence thresholds {dict(part_confidence, all=min_confidence)}: each must be between 0 and 1,"
                            f" for parts {', '.join(PART_AXES)}")
    pattern = None
    if age_from_filename:
        try:
            pattern = re.compile(age_from_filename)
        except re.error as err:
            raise MaskdistError(f"--age-from-filename {age_from_filename!r} is not a regular expression ({err})") from None
        if pattern.groups < 1:
            raise MaskdistError(f"--age-from-filename {age_from_filename!r} needs a group around the age, e.g. '_(\\d+)\\.'")
    out = Path(out)
    check_free(out.parent)  # not into a folder a live run writes
    images = list_images(Path(images_dir))
    if not images:
        raise MaskdistError(f"{images_dir} holds no .jpg/.jpeg/.png images")
    ensemble, applied, accelerator, notes = prepare(sources, "uniform", decisions, precision, timeout_s, allow_unfinished, accelerator)
    keys = [str(p) for p in images]
    pin = pin_memory(accelerator.device)
    votes = vote(ensemble, lambda group: folder_loader(keys, keys, group.folder_transform(), batch_size, accelerator.process_index,
                                                       accelerator.num_processes, workers, pin),
                 accelerator.device, "none", accelerator.autocast, accelerator)
    nonfinite = finite.find(ensemble, votes)
    finite.check(nonfinite, len(images), allow_nonfinite)
    unanswered = set(nonfinite.unanswered)  # named in the report, not labelled
    predicted = {k: mix(ensemble, v[None])[0] for k, v in (votes.probs | votes.nonfinite).items() if k not in unanswered}
    report = PseudoReport(images=len(images), unreadable=votes.failed, out=str(out), decisions=applied.name, notes=notes,
                          nonfinite=nonfinite)
    weights = applied.class_weights if applied.class_weights is not None else np.ones(labels.NUM_CLASSES)

    records = []
    for path in images:
        if str(path) not in predicted:
            continue
        flat = predicted[str(path)]
        probs = flat.reshape(3, 2, 3)  # mask x gender x age group
        age = ""
        match = pattern.search(path.name) if pattern else None
        if match:
            age = int(match.group(1))
            # the decision among the classes of the named age group, on P(mask, gender)
            by_part = probs.sum(axis=2)
            choice = (by_part * weights.reshape(3, 2, 3)[:, :, labels.age_group(age)]).argmax()
            mask, gender = np.unravel_index(choice, (3, 2))
            confidence = float(by_part[mask, gender])
            report.age_from_name += 1
        else:
            mask, gender, group = np.unravel_index(int(decide(flat[None], weights)[0]), (3, 2, 3))
            confidence = float(probs[mask, gender, group])
            report.age_not_in_name += pattern is not None
        if confidence < min_confidence:
            report.low_confidence += 1
            continue
        chosen = {"mask": int(mask), "gender": int(gender), "age": None if match else int(group)}
        low = [part for part, threshold in part_confidence.items()
               if chosen[part] is not None and _part_probability(probs, part, chosen[part]) < threshold]
        if low:
            for part in low:
                report.low_part_confidence[part] = report.low_part_confidence.get(part, 0) + 1
            continue
        label = labels.label_of(int(mask), int(gender), age) if age != "" else labels.encode(int(mask), int(gender), int(group))
        records.append({"path": os.path.relpath(path.resolve(), out.resolve().parent), "mask": int(mask),
                        "gender": int(gender), "age": age, "label": label, "confidence": round(confidence, 6)})
    report.labelled = len(records)
    if accelerator.is_main_process:
        with atomic_path(out) as tmp:
            pd.DataFrame(records, columns=["path", "mask", "gender", "age", "label", "confidence"]).to_csv(tmp, index=False)
    accelerator.wait_for_everyone()
    return report
