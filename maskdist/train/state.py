"""The resumable state of a fold (``state/``): save it atomically, load it back, and say
whether a fold has one or has finished its schedule.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from maskdist import config as config_mod
from maskdist.errors import MaskdistError
from maskdist.model.ema import Ema
from maskdist.system.fileio import atomic_write_json, dir_exists, recover_dir, replace_dir
from maskdist.train.checkpoint import CONFIG, MODEL_JSON, STATE, TRAINER_STATE

if TYPE_CHECKING:  # the run is passed in; state sits below it
    from maskdist.train.run import Run


def load_trainer_state(run_dir: Path) -> dict | None:
    state_dir = recover_dir(run_dir / STATE)
    if state_dir is None or not (state_dir / TRAINER_STATE).is_file():
        return None
    return json.loads((state_dir / TRAINER_STATE).read_text())


def ema_file(rank: int) -> str:
    """The EMA weights of ``rank`` inside the state folder."""
    return f"ema-rank{rank}.safetensors"


def load_ema(run: Run, state_dir: Path) -> None:
    if run.ema is None:
        return
    path = state_dir / ema_file(run.accelerator.process_index)
    if not path.is_file():  # more ranks than the run had: the weights are the same on every rank
        path = state_dir / ema_file(0)
    if not path.is_file():
        raise MaskdistError(f"{state_dir} holds no EMA weights but this run keeps an EMA (--ema-decay"
                            f" {run.cfg.ema_decay}): resume with the options the run started with")
    run.ema.load_state_dict(load_file(str(path), device=str(run.accelerator.device)))


def has_state(run_dir: Path) -> bool:
    """The fold has a resumable state (``--resume`` continues it)."""
    return dir_exists(Path(run_dir) / STATE)


def epoch_done(trainer: dict) -> bool:
    # States written before mid-epoch saves existed hold finished epochs only.
    return bool(trainer.get("epoch_done", True))


def fold_finished(run_dir: Path) -> bool:
    """The fold trained every epoch of its saved configuration and has its best model."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_JSON).is_file() or not (run_dir / CONFIG).is_file():
        return False
    trainer = load_trainer_state(run_dir)
    epochs = config_mod.load(run_dir / CONFIG).epochs
    return trainer is not None and epoch_done(trainer) and trainer.get("epoch", -1) >= epochs - 1


def save_state(accelerator: Accelerator, run_dir: Path, trainer_state: dict, ema: Ema | None = None) -> float:
    """``accelerator.save_state`` (model, optimiser, scaler, every rank's RNG states) and the
    EMA weights (safetensors: loading runs no code) into a temporary folder, swapped in when
    complete (a kill during the save leaves the previous state); returns the seconds it took."""
    started = time.perf_counter()
    tmp = run_dir / (STATE + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if ema is not None:  # each rank's own (their BatchNorm statistics differ within an epoch)
        save_file(ema.state_dict(), str(tmp / ema_file(accelerator.process_index)))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / TRAINER_STATE, trainer_state)
        replace_dir(tmp, run_dir / STATE)
    accelerator.wait_for_everyone()
    return time.perf_counter() - started


def checksum(model: torch.nn.Module) -> float:
    """A sum over every floating-point weight and buffer (equal models, equal sums)."""
    return float(sum(t.double().sum() for t in model.state_dict().values() if t.is_floating_point()))
