"""Usage checks that need no torch: each command's arguments, checked before torch, timm and
the models load, so that a mistake is one line within a second instead of after them.

What is checked here: paths that must exist, the fold against the shard set's manifest,
options that go together, the configuration's ranges (:meth:`maskdist.config.TrainConfig.validate`),
trackers and the environment they need, and installed extras. The commands call these
first; the Python API checks the same things again where it meets them (these checks are
an early copy of no logic: each calls the function the API uses, or checks what only a
command line can get wrong).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from maskdist import config as config_mod
from maskdist.errors import MaskdistError


class LaunchMismatch(MaskdistError):
    """The launch asked for more GPUs than the machine has: every rank finds the same, so the
    first rank of each machine says it (:class:`maskdist.cli.base.Group`)."""

    once_per_machine = True


# The extras of setup.cfg and a module each provides.
EXTRAS = {"onnx": ("onnx", "onnxruntime"), "report": ("matplotlib",)}


def require_extra(extra: str, what: str) -> None:
    """``what`` needs the ``[extra]`` of setup.cfg: refused in one line when a module of it is missing."""
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MaskdistError(f"{what} needs the [{extra}] extra ({', '.join(missing)} not installed):"
                            f" pip install 'maskdist[{extra}]'")


def check_train(cfg: config_mod.TrainConfig) -> None:
    """What ``train`` (and each fold of ``kfold``) can know before torch: the shard set and
    its fold, --epochs-from, the starting weights file and the trackers."""
    from maskdist.model import weights
    from maskdist.train import trackers

    check_launch_devices()
    check_shard_set(cfg.shards, None if cfg.full_data else cfg.fold)
    if cfg.epochs_from and not Path(cfg.epochs_from).is_dir():
        raise MaskdistError(f"--epochs-from {cfg.epochs_from} not found: pass a k-fold experiment folder (holding fold0, fold1, ...)")
    weights.local_file(cfg.pretrained, cfg.model)
    trackers.check_names(cfg.log_with)


def check_shard_set(shards: str, fold: str | int | None = None) -> None:
    """A local shard set is one (its manifest reads) and has ``fold``; a URL or ``pipe:`` set
    is left to the run (reading it may take the network's time)."""
    from maskdist.shards.manifest import open_shard_set
    from maskdist.shards.opener import is_pipe, is_url

    if not shards or is_url(shards) or is_pipe(shards):
        return
    if not Path(shards).exists():
        raise MaskdistError(f"--shards {shards} not found: pass a shard set folder (see `maskdist shards build`)")
    shard_set = open_shard_set(shards)
    if fold is not None:
        shard_set.check_fold(fold, "--fold")


def check_runs(sources: Iterable[str | os.PathLike]) -> None:
    """Each experiment folder holds fold folders, each run folder its model card."""
    from maskdist.train.run_folder import check_sources

    check_sources(sources)


def check_inputs(paths: Iterable[str | os.PathLike], what: str = "input") -> None:
    """Every file or folder named exists."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise MaskdistError(f"{what} {', '.join(missing[:5])} not found" + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))


def check_eval_source(shards: str | None, eval_dir: str | os.PathLike | None) -> None:
    """Prediction reads the eval images from exactly one of --shards and --eval-dir."""
    if bool(shards) == bool(eval_dir):
        raise MaskdistError("pass either --shards (a shard set's eval part) or --eval-dir (a competition eval folder)"
                            + (", not both" if shards else ""))
    if shards:
        check_shard_set(shards)
    elif not Path(eval_dir).is_dir():
        raise MaskdistError(f"--eval-dir {eval_dir} not found: pass the competition eval folder (info.csv + images/)")


def check_launch_devices() -> None:
    """Under ``accelerate launch`` with a GPU config (not ``ACCELERATE_USE_CPU``), the machine has
    a GPU for each of its processes: counted from the NVIDIA driver, without torch. Elsewhere
    (one process, CPU launches, other GPU makers) nothing is checked here."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local <= 1 or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or Path("/dev/kfd").exists():
        return
    gpus = len(list(Path("/proc/driver/nvidia/gpus").glob("*"))) if Path("/proc/driver/nvidia/gpus").is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = min(gpus, len([d for d in visible.split(",") if d.strip()]))
    if gpus < local:
        raise LaunchMismatch(f"the launch starts {local} processes on this machine, one per GPU, but it has {gpus} GPU(s):"
                             " pass --num_processes to match them, or launch on CPUs with ACCELERATE_USE_CPU=1 and"
                             " --config_file launch/cpu_ddp.yaml")
