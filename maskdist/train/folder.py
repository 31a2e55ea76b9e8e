"""The fold folder: who may write it, and what a new run does with what it already holds.

One writer per folder (:mod:`maskdist.system.lock`): rank 0 takes ``OUT/fold<K>``'s lock for
the whole launch and every rank checks that it sees that very lock, so a node-local
``--out`` (each machine its own folder) stops with one line instead of diverging. An
experiment lock held by another run (a ``kfold`` that is not this run's parent) is refused.

What the folder holds decides what the run does:

============== ===================== ================================ ====================
fold           ``--resume``          ``--overwrite``                  neither
============== ===================== ================================ ====================
new            starts (nothing to    starts                           starts
               resume, said so)
interrupted    continues, with the   starts again                     refused, naming
               same training                                          where it stopped
               settings
finished       nothing to do, exit 0 starts again                     refused
============== ===================== ================================ ====================

The experiment's plan (``OUT/experiment.yaml``) holds the training settings that every fold
shares (:func:`maskdist.config.training_settings`; the run-only ones may differ). The first
run writes it; a later one with other settings is refused, listing them, unless
``--replan`` makes its settings the plan. Every launch appends its full configuration to
``launches.jsonl``, so nothing a fold ran under is lost.

Deciding writes nothing: :meth:`FoldFolder.start` only checks, and :meth:`FoldFolder.begin`
writes the plan, ``config.yaml`` and the launch record (and clears the folder for
``--overwrite``) once the run has its data and model, so a run that cannot start (a fold
the shard set lacks, weights that cannot be had) leaves the experiment as it found it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from maskdist import config as config_mod
from maskdist.errors import MaskdistError
from maskdist.system import distributed
from maskdist.system.fileio import aside, atomic_write_text
from maskdist.system.lock import LOCK_NAME, FolderLock, check_free
from maskdist.train.checkpoint import CONFIG, STATE
from maskdist.train.state import choose_state, fold_status, load_trainer_state, read_config

PLAN = "experiment.yaml"  # OUT/experiment.yaml: the training settings every fold shares
LAUNCHES = "launches.jsonl"  # OUT/fold<K>/launches.jsonl: one line per launch, with its whole configuration
SHARED_CHECK_S = 10.0  # how long a rank looks for rank 0's lock before it calls --out unshared


@dataclass
class Start:
    """What :meth:`FoldFolder.start` decided (the same on every rank)."""

    state_dir: str | None = None  # resume from this state folder
    nothing_to_do: bool = False  # --resume on a finished fold
    best: dict | None = None
    message: str = ""  # what to tell the user (main process)
    clear: bool = False  # --overwrite: what the folder holds goes, once the run can start
    write_plan: bool = False  # this run's settings become the experiment's plan, once it can start


class FoldFolder:
    """The fold folder of ``cfg`` for one launch: its lock and what the run starts from."""

    def __init__(self, cfg: config_mod.TrainConfig, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.run_dir = cfg.run_dir()
        self.experiment = Path(cfg.out)
        self.lock: FolderLock | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[FoldFolder]:
        """Hold the fold's lock for the block: rank 0 takes it, every rank checks it sees it."""
        def take() -> str:
            check_free(self.experiment)
            self.lock = FolderLock(self.run_dir).acquire(wait_s=self.cfg.lock_wait_s)
            return self.lock.token

        token = distributed.on_main(self.accelerator, take)
        try:
            self._check_shared(token)
            yield self
        finally:
            if self.lock is not None:
                self.lock.release()

    def _check_shared(self, token: str) -> None:
        """Every rank must see rank 0's lock: ``--out`` is one folder for the whole launch."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return
        path = self.run_dir / LOCK_NAME
        seen, deadline = False, time.monotonic() + SHARED_CHECK_S
        while not seen:
            with contextlib.suppress(OSError, ValueError):
                os.listdir(self.run_dir)  # a directory read refreshes a network filesystem's view of it
                seen = json.loads(path.read_text()).get("token") == token
            if seen or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        unseen = [row for row in distributed.gather_rows([(accelerator.process_index, socket.gethostname(), seen)], accelerator)
                  if not row[2]]
        if unseen:
            ranks = ", ".join(f"rank {rank} on {host}" for rank, host, _ in unseen[:4])
            raise MaskdistError(f"--out {self.experiment} is not one folder for the whole launch: {ranks} cannot see the lock"
                                f" that rank 0 wrote in {self.run_dir}; put --out on a filesystem that every machine mounts"
                                " at the same path (NFS, Lustre, ...)")

    def start(self) -> Start:
        """Decide, on the main process, what the run starts from; the same on every rank."""
        return Start(**distributed.on_main(self.accelerator, self._decide))

    def begin(self, start: Start) -> None:
        """Write what the decided start needs (main process), once the run has its data and
        model: the folder cleared for --overwrite, the plan, config.yaml and the launch record."""
        def write() -> None:
            if start.write_plan:
                write_plan(self.experiment, self.cfg)
            if start.state_dir is not None:
                self._record(resumed=True)
                return
            if start.clear:
                self._clear()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config_mod.save(self.cfg, self.run_dir / CONFIG)
            self._record(resumed=False)

        distributed.on_main(self.accelerator, write)

    def _decide(self) -> dict:
        cfg, run_dir = self.cfg, self.run_dir
        status = fold_status(run_dir)
        where = f"fold {cfg.fold} in {run_dir} is {status.describe()}"
        if status.state == "interrupted" and cfg.resume and not cfg.overwrite:
            changed = config_mod.differences(read_config(run_dir / CONFIG), cfg)
            if changed:
                raise MaskdistError(f"fold {cfg.fold} in {run_dir} ({status.describe()}) was started with other settings, and"
                                    f" --resume would change them: {'; '.join(changed)}; resume with the"
                                    " settings it started with (config.yaml), or pass --overwrite to start it again")
        plan = dict(write_plan=self._check_plan())
        if status.state != "new" and cfg.overwrite:
            return dict(plan, clear=True, message=f"{where}: starting it again (--overwrite)")
        elif status.state == "new":
            message = f"nothing to resume in {run_dir}: training fold {cfg.fold} from the start" if cfg.resume else ""
        elif not cfg.resume:
            advice = "pass --resume to continue it, or" if status.state == "interrupted" else "pass"
            raise MaskdistError(f"{where}: {advice} --overwrite to train it again, or another --out")
        elif status.state == "finished":
            trainer = load_trainer_state(run_dir) or {}
            return dict(nothing_to_do=True, best=trainer.get("best"), message=f"{where}: nothing to resume")
        else:
            state_dir, _trainer, warning = choose_state(run_dir)
            return dict(plan, state_dir=str(state_dir), message=warning or "")
        return dict(plan, message=message)

    def _check_plan(self) -> bool:
        """The fold must train as the experiment's plan says; the full-data model too, but for
        its number of epochs (cross-validation chooses it). The plan comes from the folds:
        True when this run's settings are to become it."""
        cfg, path = self.cfg, self.experiment / PLAN
        if path.is_file() and not cfg.replan:
            changed = config_mod.differences(read_config(path), cfg, ignore=("epochs",) if cfg.full_data else ())
            if changed:
                raise MaskdistError(f"fold {cfg.fold} would train otherwise than the experiment's plan {path}: {'; '.join(changed)};"
                                    " use the plan's settings, or pass --replan to make these the plan")
        return not cfg.full_data and (not path.is_file() or cfg.replan)

    def _clear(self) -> None:
        """Everything of the fold folder but its lock, for --overwrite."""
        for child in list(self.run_dir.iterdir()) + [aside(self.run_dir / STATE)]:
            if child.name in (LOCK_NAME, LAUNCHES) or not child.exists():  # the launch history stays
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()

    def _record(self, resumed: bool) -> None:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                "processes": self.accelerator.num_processes, "resumed": resumed, "command": sys.argv,
                "config": self.cfg.to_dict()}
        with open(self.run_dir / LAUNCHES, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")


def write_plan(experiment: Path, cfg: config_mod.TrainConfig) -> Path:
    """Write the experiment's plan: ``cfg``'s training settings, and a note of what it is."""
    path = Path(experiment) / PLAN
    text = ("# The training settings every fold of this experiment shares (maskdist train/kfold check them;\n"
            "# run-only settings such as workers and logging may differ). Change them with --replan.\n"
            + yaml.safe_dump(config_mod.training_settings(cfg), sort_keys=False))
    atomic_write_text(path, text)
    return path


def read_plan(experiment: Path) -> dict | None:
    path = Path(experiment) / PLAN
    return read_config(path) if path.is_file() else None
