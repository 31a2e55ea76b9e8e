"""A fold run's per-epoch figures read back from its TensorBoard event files (``tb/``):
training loss, validation macro F1, data-wait share and images/s of each epoch.

The per-epoch scalars are logged at each epoch's last step (docs/monitoring.md), so the
epochs are the sorted steps of ``val/macro_f1``. A resumed run may log a step twice: the
value written last counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from maskdist.train.checkpoint import TENSORBOARD

TAGS = {"loss": "train/epoch_loss", "macro_f1": "val/macro_f1", "data_wait": "train/epoch_data_wait_frac",
        "images_per_s": "train/epoch_images_per_s"}


@dataclass
class Curves:
    """One value per epoch and figure (NaN where an epoch lacks it); ``note`` says why empty."""

    epochs: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in TAGS})
    note: str = ""

    def mean(self, name: str) -> float:
        present = [v for v in self.values[name] if not math.isnan(v)]
        return sum(present) / len(present) if present else math.nan


def read_scalars(tb_dir: Path, tags) -> dict[str, dict[int, float]]:
    """tag -> step -> value over every event file under ``tb_dir`` (the latest write wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, tuple[float, float]]] = {tag: {} for tag in tags}
    for path in sorted(Path(tb_dir).rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1})
        events.Reload()
        for tag in set(events.Tags()["scalars"]) & set(tags):
            for e in events.Scalars(tag):
                if e.step not in found[tag] or e.wall_time >= found[tag][e.step][0]:
                    found[tag][e.step] = (e.wall_time, e.value)
    return {tag: {step: value for step, (_t, value) in steps.items()} for tag, steps in found.items()}


def fold_curves(run_dir: Path) -> Curves:
    tb_dir = Path(run_dir) / TENSORBOARD
    if not tb_dir.is_dir():
        return Curves(note=f"{tb_dir} not found: no curves (the run wrote no TensorBoard events)")
    scalars = read_scalars(tb_dir, TAGS.values())
    steps = sorted(scalars[TAGS["macro_f1"]])
    if not steps:
        return Curves(note=f"{tb_dir} holds no {TAGS['macro_f1']} scalars: no curves")
    return Curves(list(range(len(steps))),
                  {name: [scalars[tag].get(s, math.nan) for s in steps] for name, tag in TAGS.items()})
