"""The resumable state of a fold (``state/``): save it atomically, load it back, and say
whether a fold has one or has finished its schedule.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from maskdist.errors import MaskdistError, plural
from maskdist.model.ema import Ema
from maskdist.system import distributed, fileio
from maskdist.system.fileio import DiskFull, aside, atomic_write_json, dir_exists, disk_full, free_bytes, is_disk_full, recover_dir, rotate_dir
from maskdist.train.checkpoint import CONFIG, MODEL_JSON, STATE, TRAINER_STATE, WEIGHTS

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


@dataclass(frozen=True)
class FoldStatus:
    state: str  # "new", "interrupted" or "finished"
    epoch: int = -1  # the last epoch with a saved state (interrupted: the one it stopped in)
    step: int = 0
    epochs: int = 0
    epoch_done: bool = True

    def describe(self) -> str:
        if self.state == "finished":
            return "finished" + (f" ({plural(self.epochs, 'epoch')})" if self.epochs else "")
        if self.state == "interrupted":
            where = f"after epoch {self.epoch}" if self.epoch_done else f"at epoch {self.epoch} step {self.step}"
            return f"interrupted {where} of {plural(self.epochs, 'epoch')}"
        return "not trained"


def read_config(path: Path) -> dict:
    """A saved configuration as a plain dict (unknown to this version: kept, not refused)."""
    return yaml.safe_load(Path(path).read_text()) or {}


def fold_status(run_dir: Path) -> FoldStatus:
    """What a fold folder holds: nothing, an interrupted run or a finished one."""
    run_dir = Path(run_dir)
    card_path = run_dir / MODEL_JSON
    card = json.loads(card_path.read_text()) if card_path.is_file() else None
    trainer = _readable_trainer_state(run_dir) if dir_exists(run_dir / STATE) else None
    epochs = int(read_config(run_dir / CONFIG).get("epochs", 0)) if (run_dir / CONFIG).is_file() else 0
    if trainer is None:
        # A card without a state: a fold from before resumable states; it has its model.
        return FoldStatus("finished", epochs=epochs) if card is not None else FoldStatus("new")
    epoch, step, done = int(trainer.get("epoch", -1)), int(trainer.get("step", 0)), bool(trainer.get("epoch_done", True))
    finished = card.get("finished") if card is not None and "finished" in card else (
        card is not None and done and epoch >= epochs - 1)
    return FoldStatus("finished" if finished else "interrupted", epoch, step, epochs, done)


def _readable_trainer_state(run_dir: Path) -> dict:
    """The trainer state, from ``state.old`` when ``state/trainer.json`` does not read; ``{}``
    (an interrupted fold, position unknown) when neither does."""
    try:
        return load_trainer_state(run_dir)
    except (OSError, ValueError):
        try:
            return choose_state(run_dir)[1]
        except MaskdistError:
            return {}


def fold_finished(run_dir: Path) -> bool:
    """The fold trained every epoch of its schedule and has its best model."""
    run_dir = Path(run_dir)
    return fold_status(run_dir).state == "finished" and (run_dir / WEIGHTS).is_file()


def state_files(state_dir: Path) -> dict[str, dict]:
    """Size and sha256 of every file of a state folder but ``trainer.json`` (which records them)."""
    return {path.name: {"bytes": path.stat().st_size, "sha256": fileio.sha256_file(path)}
            for path in sorted(p for p in Path(state_dir).iterdir() if p.is_file() and p.name != TRAINER_STATE)}


def state_problem(state_dir: Path) -> str | None:
    """Why a state folder cannot be trusted (a missing, truncated or changed file), or None.
    States written before sizes and hashes were recorded are checked as far as they can be:
    their ``trainer.json`` must read."""
    trainer_path = Path(state_dir) / TRAINER_STATE
    try:
        trainer = json.loads(trainer_path.read_text())
    except FileNotFoundError:
        return f"{trainer_path} is missing"
    except (OSError, ValueError) as err:
        return f"{trainer_path} does not read ({type(err).__name__})"
    for name, expected in (trainer.get("files") or {}).items():
        path = Path(state_dir) / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the save wrote {expected['bytes']}"
        if fileio.sha256_file(path) != expected["sha256"]:
            return f"{path} differs from what the save wrote (sha256)"
    return None


def choose_state(run_dir: Path) -> tuple[Path, dict, str | None]:
    """The newest trustworthy resumable state of a fold: ``state/``, else the one before it
    (``state.old``); returns (its folder, its trainer state, a warning when ``state/`` was
    damaged). Raises MaskdistError naming the files when neither can be trusted."""
    run_dir = Path(run_dir)
    recover_dir(run_dir / STATE)
    problems = []
    for candidate in (run_dir / STATE, aside(run_dir / STATE)):
        if not candidate.is_dir():
            continue
        problem = state_problem(candidate)
        if problem is None:
            warning = f"warning: {problems[0]}; resuming from the state before it ({candidate})" if problems else None
            return candidate, json.loads((candidate / TRAINER_STATE).read_text()), warning
        problems.append(problem)
    raise MaskdistError(f"no resumable state of {run_dir} can be trusted ({'; '.join(problems) or 'none saved'}): start the fold"
                        " again with --overwrite")


def state_bytes(state_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(state_dir).iterdir() if p.is_file())


def save_state(accelerator: Accelerator, run_dir: Path, trainer_state: dict, ema: Ema | None = None,
               expected_bytes: int = 0) -> tuple[float, int]:
    """``accelerator.save_state`` (model, optimiser, scaler, every rank's RNG states) and the
    EMA weights (safetensors: loading runs no code) into a temporary folder, swapped in when
    complete: a kill during the save leaves the previous state, and the one before the new
    state is kept as ``state.old``. ``trainer.json`` records every file's size and sha256,
    so a damaged copy is found when it is loaded (:func:`choose_state`).

    When the free space is less than ``expected_bytes`` (the last save's size), nothing is
    written: the run stops with one line, the last state still loadable. A full disk during
    the save gives the same line on every rank (no rank is left waiting), and the partial
    copy is removed. Returns (seconds, bytes of the new state).
    """
    started = time.perf_counter()
    tmp = run_dir / (STATE + ".tmp")
    where = _where(trainer_state)
    problem = None
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        free = free_bytes(run_dir)
        if expected_bytes and free < expected_bytes * 1.05 + (1 << 20):
            problem = str(disk_full(run_dir / STATE, int(expected_bytes * 1.05),
                                    f"the resumable state of {where} was not saved, the last saved state stays loadable;"
                                    " after freeing space, --resume continues from it"))
    distributed.raise_everywhere(accelerator, problem, DiskFull)
    problem = _disk_full_problem(lambda: _write_state(accelerator, tmp, ema), tmp, where)
    problems = [p for p in distributed.gather_rows([problem], accelerator) if p]
    if problems:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFull(problems[0])
    size = 0
    if accelerator.is_main_process:
        def finish():
            trainer_state["files"] = state_files(tmp)
            atomic_write_json(tmp / TRAINER_STATE, trainer_state)
            fileio.give_plain_modes(tmp)  # a teammate resumes from a shared filesystem
            rotate_dir(tmp, run_dir / STATE)
        problem = _disk_full_problem(finish, tmp, where)
        if problem:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            size = state_bytes(run_dir / STATE)
    distributed.raise_everywhere(accelerator, problem, DiskFull)
    return time.perf_counter() - started, size


def _write_state(accelerator: Accelerator, tmp: Path, ema: Ema | None) -> None:
    accelerator.save_state(str(tmp))
    if ema is not None:  # each rank's own (their BatchNorm statistics differ within an epoch)
        save_file(ema.state_dict(), str(tmp / ema_file(accelerator.process_index)))


def _disk_full_problem(write, tmp: Path, where: str) -> str | None:
    """Run ``write``; a full disk becomes its one-line message (other errors propagate)."""
    try:
        write()
    except Exception as err:
        if not is_disk_full(err, tmp):
            raise
        return str(disk_full(tmp.with_name(STATE), what=f"the resumable state of {where} was not saved, the last saved state"
                             " stays loadable; after freeing space, --resume continues from it"))
    return None


def _where(trainer_state: dict) -> str:
    epoch, step = trainer_state.get("epoch", "?"), trainer_state.get("step", "?")
    return f"the end of epoch {epoch}" if trainer_state.get("epoch_done") else f"epoch {epoch} step {step}"


def checksum(model: torch.nn.Module) -> float:
    """A sum over every floating-point weight and buffer (equal models, equal sums)."""
    return float(sum(t.double().sum() for t in model.state_dict().values() if t.is_floating_point()))
