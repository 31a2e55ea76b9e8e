"""The names in a fold's run folder, and which ``fold<K>`` folders count as folds: without
torch, so that commands check their arguments before it loads (:mod:`maskdist.cli.usage`)."""
from __future__ import annotations

import re
from pathlib import Path

from maskdist.errors import MaskdistError

WEIGHTS = "best.safetensors"
MODEL_JSON = "model.json"
OOF = "oof.csv"
CONFIG = "config.yaml"
STATE = "state"
TRAINER_STATE = "trainer.json"  # inside STATE: where the run stands (epoch, step, best, ...)
TENSORBOARD = "tb"
FOLD_DIR = re.compile(r"fold(\d+)")


def never_started(run_dir: Path) -> bool:
    """A fold folder that holds neither a configuration nor a model: a run refused before it
    began (older versions left such folders, with only a launch record); it is no fold."""
    return not (Path(run_dir) / CONFIG).is_file() and not (Path(run_dir) / MODEL_JSON).is_file()


def fold_folders(experiment: Path) -> list[Path]:
    """The fold run folders of an experiment folder that a run started in, by fold number."""
    found = (p for p in Path(experiment).iterdir() if p.is_dir() and FOLD_DIR.fullmatch(p.name) and not never_started(p))
    return sorted(found, key=lambda p: int(p.name[4:]))


def experiment_runs(root: Path) -> list[Path]:
    """The fold run folders of an experiment folder, by fold number; MaskdistError when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise MaskdistError(f"{root} not found: pass the experiment folder that holds fold0, fold1, ...")
    runs = fold_folders(root)
    if not runs:
        raise MaskdistError(f"{root} holds no fold<K> folders: train the folds first (maskdist kfold / maskdist train)")
    return runs


def check_sources(sources) -> None:
    """Each of ``sources`` is a run folder (its model card) or an experiment folder with folds."""
    for source in map(Path, sources):
        if not (source / MODEL_JSON).is_file():
            experiment_runs(source)
