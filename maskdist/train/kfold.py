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
import shlex
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
from maskdist.system.lock import FolderLock, child_env
from maskdist.train.checkpoint import CONFIG
from maskdist.train.folder import PLAN, read_plan, write_plan
from maskdist.train.state import fold_finished, has_state, read_config

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
    full: bool = False  # also the full-data model (OUT/all), after the folds

    def __post_init__(self):
        if self.tta not in TTAS or self.weighting not in WEIGHTINGS:
            raise MaskdistError(f"kfold: tta {self.tta!r} / weights {self.weighting!r}: expected one of {TTAS} / {WEIGHTINGS}")

    def base_config(self) -> config_mod.TrainConfig:
        return self.train or config_mod.load(None, {"shards": self.shards})

    def fold_config(self, fold: int | str) -> config_mod.TrainConfig:
        """The configuration fold ``fold`` trains with: the plan's, resumed where a state is
        saved; with ``replan``, a fold trained otherwise than the new plan starts again. The
        full-data model (``"all"``) takes its epochs from the folds."""
        base = self.base_config()
        full = str(fold) == config_mod.FULL_DATA
        cfg = dataclasses.replace(base, shards=self.shards, out=str(self.out), fold=str(fold), replan=False,
                                  epochs_from=str(self.out) if full else "")
        run_dir = cfg.run_dir()
        overwrite = base.replan and (run_dir / CONFIG).is_file() and bool(
            config_mod.differences(read_config(run_dir / CONFIG), base, ignore=("epochs",) if full else ()))
        return dataclasses.replace(cfg, resume=has_state(run_dir) and not overwrite, overwrite=overwrite)


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
    env.update(launch_env_changes(plan, devices))
    return env


def launch_env_changes(plan: KFoldPlan, devices: Sequence[str] | None = None) -> dict:
    """What a launch sets in the environment on top of this process's."""
    env = dict(plan.env)
    if plan.cpu:
        env["ACCELERATE_USE_CPU"] = "1"  # the only way accelerate starts CPU DDP with several processes
        env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return env


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` as given (ids or UUIDs), or
    every device CUDA counts when it is unset."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def device_slots(plan: KFoldPlan, dry_run: bool = False) -> list[list[str] | None]:
    """The GPUs of each of the plan's parallel slots (None: the launch's own default).

    Each slot gets ``processes`` GPUs of its own, from ``--gpus`` or else from the visible
    devices, so parallel folds never pile onto GPU 0. Refuses, in one line, a plan the GPUs
    cannot hold, and GPU processes on a machine without GPUs (``--cpu`` is the answer);
    ``dry_run`` only notes the latter, so a plan can be checked on a machine without GPUs.
    """
    slots = max(1, plan.parallel_folds)
    if plan.cpu:
        return [None] * slots
    pool = list(plan.gpus) or visible_gpus()
    need = slots * plan.processes
    if not pool:
        if need > 1 and not dry_run:
            raise MaskdistError(f"--processes {plan.processes} x --parallel-folds {slots} asks for GPUs, and this machine has"
                                " none that CUDA can use: add --cpu to train on CPU processes (gloo)")
        return [None] * slots
    if len(pool) < need:
        raise MaskdistError(f"--parallel-folds {slots} x --processes {plan.processes} needs {need} GPUs; {len(pool)} available"
                            f" ({','.join(pool)}): lower --parallel-folds or --processes, or list more with --gpus")
    if slots == 1 and not plan.gpus:
        return [None]  # one fold at a time on the launch's own view of the devices
    return [pool[s * plan.processes:(s + 1) * plan.processes] for s in range(slots)]


def write_fold_plan(plan: KFoldPlan, fold: int) -> Path:
    """Write fold ``fold``'s configuration as YAML for its launch; returns the path."""
    path = fold_plan_path(plan, fold)
    config_mod.save(plan.fold_config(fold), path)
    return path


def fold_plan_path(plan: KFoldPlan, fold: int | str) -> Path:
    name = config_mod.FULL_DATA if str(fold) == config_mod.FULL_DATA else f"fold{fold}"
    return Path(plan.out) / PLANS / f"{name}.yaml"


def train_full(plan: KFoldPlan, echo: Callable[[str], None], lock: FolderLock) -> None:
    """Train the full-data model (``OUT/all``) for the median best epoch of the folds just
    trained; a finished one that matches the plan is reused."""
    cfg = plan.fold_config(config_mod.FULL_DATA)
    if fold_finished(cfg.run_dir()) and not cfg.overwrite:
        echo(f"full-data model: finished earlier, reusing {cfg.run_dir()}")
        return
    path = fold_plan_path(plan, config_mod.FULL_DATA)
    config_mod.save(cfg, path)
    echo(f"full-data model: training on every fold, {plan.processes} process(es)")
    result = subprocess.run(launch_command(plan, plan.processes, ["train", "--config", str(path)]),
                            env=child_env(launch_env(plan, device_slots(plan)[0]), lock), preexec_fn=parallel.die_with_parent())
    if result.returncode != 0:
        raise MaskdistError(f"the full-data model failed (exit {result.returncode}): see the output above; re-run the same"
                            " command to resume")


def check_plan(plan: KFoldPlan) -> None:
    """The experiment's plan and this kfold's training settings must agree (one line listing
    the differences), unless ``--replan`` is given; see :mod:`maskdist.train.folder`."""
    base = plan.base_config()
    saved = read_plan(plan.out)
    if saved is not None and not base.replan:
        changed = config_mod.differences(saved, base)
        if changed:
            raise MaskdistError(f"{plan.out} was planned with other training settings ({Path(plan.out) / PLAN}):"
                                f" {'; '.join(changed)}; use the plan's settings, or pass --replan to retrain the folds"
                                " that differ with these")


def folds_to_train(plan: KFoldPlan, echo: Callable[[str], None] = print) -> tuple[list[int], list[int]]:
    """(the plan's folds, those of them still to train); finished folds that match the plan
    are reused."""
    shard_set = open_shard_set(plan.shards)
    folds = list(plan.folds) if plan.folds is not None else list(range(shard_set.folds))
    for fold in folds:
        shard_set.check_fold(fold, "--folds")
    todo = []
    for fold in folds:
        run_dir = Path(plan.out) / f"fold{fold}"
        if fold_finished(run_dir) and not plan.fold_config(fold).overwrite:
            echo(f"fold {fold}: finished earlier, reusing {run_dir}")
        else:
            todo.append(fold)
    return folds, todo


def describe_launches(plan: KFoldPlan, echo: Callable[[str], None] = print) -> list[int]:
    """Print what :func:`train_folds` would launch, fold by fold (``kfold --dry-run``)."""
    _folds, todo = folds_to_train(plan, echo)
    slots = device_slots(plan, dry_run=True)
    if not plan.cpu and not visible_gpus() and not plan.gpus:
        echo("note: no GPU is visible here; on this machine the launches would need --cpu")
    if todo:
        echo(f"note: each launch reads its fold's configuration from {Path(plan.out) / PLANS}/fold<K>.yaml, which kfold writes"
             " as it starts that fold; a dry run writes nothing (train --print-config with these options shows one)")
    for i, fold in enumerate(todo):
        devices = slots[i % len(slots)]
        env = launch_env_changes(plan, devices)
        command = launch_command(plan, plan.processes, ["train", "--config", str(fold_plan_path(plan, fold))])
        prefix = " ".join(f"{k}={v}" for k, v in sorted(env.items()))
        echo(f"fold {fold}: {prefix + ' ' if prefix else ''}{shlex.join(command)}")
    return todo


def train_folds(plan: KFoldPlan, echo: Callable[[str], None] = print, lock: FolderLock | None = None) -> list[int]:
    """Train the plan's folds (skipping finished ones); returns the folds trained now.
    ``lock``: the experiment's, which the fold launches work under."""
    _folds, todo = folds_to_train(plan, echo)
    slot_devices = device_slots(plan)
    slots = len(slot_devices)
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
            devices = slot_devices[slot]
            echo(f"fold {fold}: training on {plan.processes} process(es)" + (f", devices {','.join(devices)}" if devices else ""))
            proc = subprocess.Popen(launch_command(plan, plan.processes, ["train", "--config", str(fold_plan)]),
                                    env=child_env(launch_env(plan, devices), *([lock] if lock else [])),
                                    preexec_fn=parallel.die_with_parent())
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


def unfinished_folds(plan: KFoldPlan) -> list[int]:
    """Folds of the shard set that have not finished training in ``plan.out``."""
    shard_set = open_shard_set(plan.shards)
    return [k for k in range(shard_set.folds) if not fold_finished(Path(plan.out) / f"fold{k}")]


def run(plan: KFoldPlan, echo: Callable[[str], None] = print) -> Path | None:
    """Train the plan's folds, then, once every fold of the set is finished, write the
    ensemble's submission with ``predict``; returns it, or None while folds are left (a
    ``--folds`` subset: the other folds may be training on other machines).

    The experiment's lock is held throughout (a ``train`` or another ``kfold`` into it is
    refused), and the plan is checked (or, with ``--replan``, rewritten) before any launch."""
    check_plan(plan)
    device_slots(plan)  # refuse a plan the machine cannot run before writing anything
    with FolderLock(plan.out).acquire(wait_s=plan.base_config().lock_wait_s) as lock:
        if read_plan(plan.out) is None or plan.base_config().replan:
            write_plan(plan.out, plan.base_config())
        return _train_then_predict(plan, echo, lock)


def _train_then_predict(plan: KFoldPlan, echo: Callable[[str], None], lock: FolderLock) -> Path | None:
    train_folds(plan, echo, lock)
    left = unfinished_folds(plan)
    if left:
        echo(f"fold(s) {', '.join(map(str, left))} of {plan.out} are still to train: the ensemble predicts once every fold"
             " is finished (train them with --folds, here or on other machines, then run kfold again)")
        return None
    if plan.full:
        train_full(plan, echo, lock)
    submission = plan.submission or Path(plan.out) / "submission.csv"
    # The full-data model votes in its own kfold's submission, as one more fold (predict's
    # default weight): training it and then leaving it out would waste it without a word.
    sources = [str(plan.out)] + ([str(Path(plan.out) / config_mod.FULL_DATA)] if plan.full else [])
    args = ["predict", *sources, "--shards", plan.shards, "--out", str(submission), "--tta", plan.tta, "--weights", plan.weighting]
    if plan.train is not None:  # predict as the folds trained: their precision, batch size and workers
        args += ["--timeout-s", str(plan.train.timeout_s), "--precision", plan.train.precision,
                 "--batch-size", str(plan.train.batch_size), "--workers", str(plan.train.workers)]
    voters = " (the folds, and the full-data model as one more fold)" if plan.full else ""
    echo(f"predicting with the ensemble{voters} on {plan.processes} process(es)")
    result = subprocess.run(launch_command(plan, plan.processes, args),
                            env=child_env(launch_env(plan, device_slots(plan)[0]), lock), preexec_fn=parallel.die_with_parent())
    if result.returncode != 0:
        raise MaskdistError("prediction failed: see the output above")
    return submission
