"""Train every fold, then predict with the ensemble: one command on 1 CPU, N GPUs or a node.

Each fold is one ``accelerate launch -m maskdist train --config PLAN`` (a plain
``python -m maskdist train`` for one process without an accelerate config) where PLAN is the
fold's resolved :class:`~maskdist.config.TrainConfig` written as YAML (a fresh process group
per fold, so a failure is contained and ``--resume`` picks it up). Folds run one after
another on all processes, or side by side on disjoint GPU subsets (``parallel_folds``). Folds
that :func:`maskdist.train.fold_finished` reports finished are skipped, so a re-run continues
where the last one stopped.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maskdist import config as config_mod
from maskdist.config import TTAS, WEIGHTINGS
from maskdist.errors import MaskdistError
from maskdist.shards.manifest import open_shard_set
from maskdist.system import parallel
from maskdist.train.state import fold_finished, has_state

PLANS = "plans"  # OUT/plans/fold<K>.yaml: the configuration each fold was launched with


@dataclass
class KFoldPlan:
    shards: str
    out: Path
    train: config_mod.TrainConfig | None = None  # every fold's options (fold, out, shards set per fold); None: defaults
    processes: int = 1  # per fold
    cpu: bool = False  # CPU DDP (gloo) instead of GPUs
    parallel_folds: int = 1
    gpus: Sequence[str] = ()  # device ids to spread parallel folds over
    folds: Sequence[int] | None = None
    tta: str = "none"
    weighting: str = "uniform"
    accelerate_config: str | None = None
    submission: Path | None = None
    env: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.tta not in TTAS or self.weighting not in WEIGHTINGS:
            raise MaskdistError(f"kfold: tta {self.tta!r} / weights {self.weighting!r}: expected one of {TTAS} / {WEIGHTINGS}")

    def fold_config(self, fold: int) -> config_mod.TrainConfig:
        """The configuration fold ``fold`` trains with."""
        base = self.train or config_mod.load(None, {"shards": self.shards})
        run_dir = Path(self.out) / f"fold{fold}"
        return dataclasses.replace(base, shards=self.shards, out=str(self.out), fold=int(fold), resume=has_state(run_dir))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a launch's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(plan: KFoldPlan, processes: int, module_args: Sequence[str]) -> list[str]:
    """``accelerate launch`` of ``python -m maskdist ...`` for ``processes`` processes; one
    process without an accelerate config runs directly (the launcher would only start it,
    after seconds of its own start-up)."""
    if processes == 1 and not plan.accelerate_config:
        return [sys.executable, "-m", "maskdist", *module_args]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if plan.accelerate_config:
        cmd += ["--config_file", plan.accelerate_config]
    if processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(free_port())]
    else:
        cmd += ["--num_processes", "1", "--num_machines", "1"] + (["--cpu"] if plan.cpu else [])
    if not plan.accelerate_config:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ["-m", "maskdist", *module_args]


def launch_env(plan: KFoldPlan, devices: Sequence[str] | None = None) -> dict:
    env = dict(os.environ)
    env.update(plan.env)
    if plan.cpu:
        env["ACCELERATE_USE_CPU"] = "1"  # the only way accelerate starts CPU DDP with several processes
        env.setdefault("OMP_NUM_THREADS", "1")
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return env


def write_fold_plan(plan: KFoldPlan, fold: int) -> Path:
    """Write fold ``fold``'s configuration as YAML for its launch; returns the path."""
    path = Path(plan.out) / PLANS / f"fold{fold}.yaml"
    config_mod.save(plan.fold_config(fold), path)
    return path


def train_folds(plan: KFoldPlan, echo: Callable[[str], None] = print) -> list[int]:
    """Train the plan's folds (skipping finished ones); returns the folds trained now."""
    shard_set = open_shard_set(plan.shards)
    folds = list(plan.folds) if plan.folds is not None else list(range(shard_set.folds))
    todo = []
    for fold in folds:
        run_dir = Path(plan.out) / f"fold{fold}"
        if fold_finished(run_dir):
            echo(f"fold {fold}: finished earlier, reusing {run_dir}")
        else:
            todo.append(fold)
    slots = max(1, plan.parallel_folds)
    if slots > 1 and plan.gpus and len(plan.gpus) < slots * plan.processes:
        raise MaskdistError(f"--parallel-folds {slots} x --processes {plan.processes} needs {slots * plan.processes} GPUs; {len(plan.gpus)} given")
    running: list[tuple[int, subprocess.Popen, int]] = []
    failures = []

    def wait_one():
        fold, proc, slot = running.pop(0)
        if proc.wait() != 0:
            failures.append(fold)
        echo(f"fold {fold}: {'failed (exit ' + str(proc.returncode) + ')' if proc.returncode else 'done'}")
        return slot

    free_slots = list(range(slots))
    try:
        for fold in todo:
            if not free_slots:
                free_slots.append(wait_one())
            slot = free_slots.pop(0)
            fold_plan = write_fold_plan(plan, fold)
            devices = None
            if plan.gpus and slots > 1:
                devices = list(plan.gpus[slot * plan.processes:(slot + 1) * plan.processes])
            echo(f"fold {fold}: training on {plan.processes} process(es)" + (f", devices {','.join(devices)}" if devices else ""))
            proc = subprocess.Popen(launch_command(plan, plan.processes, ["train", "--config", str(fold_plan)]),
                                    env=launch_env(plan, devices), preexec_fn=parallel.die_with_parent())
            running.append((fold, proc, slot))
            if slots == 1:
                wait_one()
                free_slots.append(slot)
                if failures:
                    break
        while running:
            wait_one()
    finally:
        for _fold, proc, _slot in running:  # interrupted: the launches we started end with us
            proc.terminate()
    if failures:
        raise MaskdistError(f"fold(s) {', '.join(map(str, failures))} failed: see the output above; re-run the same command to resume")
    return todo


def run(plan: KFoldPlan, echo: Callable[[str], None] = print) -> Path:
    """Train all folds, then write the ensemble's submission with ``predict``."""
    train_folds(plan, echo)
    submission = plan.submission or Path(plan.out) / "submission.csv"
    args = ["predict", str(plan.out), "--shards", plan.shards, "--out", str(submission), "--tta", plan.tta, "--weights", plan.weighting]
    if plan.train is not None:
        args += ["--timeout-s", str(plan.train.timeout_s)]
    echo(f"predicting with the ensemble on {plan.processes} process(es)")
    result = subprocess.run(launch_command(plan, plan.processes, args), env=launch_env(plan), preexec_fn=parallel.die_with_parent())
    if result.returncode != 0:
        raise MaskdistError("prediction failed: see the output above")
    return submission
