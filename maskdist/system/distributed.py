"""The process group: one way to make the Accelerator, refuse launches that would silently run
alone, and move Python objects between ranks.

Train, predict, pseudo-label and the benchmarks all start here, so precision, the collective
timeout and the launch check behave the same in every command.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

from maskdist.errors import MaskdistError

DEFAULT_TIMEOUT_S = 1800  # one machine: a hung rank becomes an error after 30 minutes
MULTI_NODE_TIMEOUT_S = 600  # across machines a lost node is likelier, and NCCL's survivors wait out the whole timeout
AUTO_TIMEOUT = 0


def is_multi_node() -> bool:
    """The launch spans machines: more processes in all than on this one (torchrun's and
    accelerate's environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return world > local


def collective_timeout(requested: int = AUTO_TIMEOUT) -> int:
    """The collective timeout in seconds: ``requested``, or for 0 (auto) 1800 s on one machine
    and 600 s across machines. With NCCL a dead rank leaves the others blocked inside a
    collective until this timeout, when the watchdog aborts them (docs/training.md)."""
    if int(requested) < 0:
        raise MaskdistError(f"--timeout-s {requested} must be 0 (auto) or a number of seconds")
    if int(requested):
        return int(requested)
    return MULTI_NODE_TIMEOUT_S if is_multi_node() else DEFAULT_TIMEOUT_S


def make_accelerator(precision: str = "no", timeout_s: int = AUTO_TIMEOUT, grad_accum: int = 1,
                     log_dir: str | Path | None = None, static_graph: bool = False):
    """An ``Accelerator`` with the collective timeout (a hung rank becomes an error after
    ``timeout_s``), mixed precision, accumulation, and TensorBoard logging under ``log_dir``
    when given. Raises when the launch started lone processes (see :func:`check_launch`).

    DDP buckets its gradients in place (``gradient_as_bucket_view``: no copy into the buckets,
    less memory) and, with ``static_graph`` (the same parameters take part in every step,
    which holds for maskdist's models unless they are compiled), skips the per-step search
    for unused parameters. On CUDA, :func:`maskdist.system.cuda.tune` sets cuDNN and TF32.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from maskdist.system import cuda

    timeout_s = collective_timeout(timeout_s)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        log_with="tensorboard" if log_dir is not None else None,
        project_dir=str(log_dir) if log_dir is not None else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=int(timeout_s))),
                         DistributedDataParallelKwargs(gradient_as_bucket_view=True, static_graph=bool(static_graph))],
    )
    check_launch(accelerator)
    cuda.tune(accelerator.device)
    return accelerator


def check_launch(accelerator) -> None:
    """accelerate's multi-GPU launcher on a machine without CUDA starts processes that each
    believe they are alone: they would all do the same work, silently. Refuse that."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise MaskdistError(
            f"{launched} processes were launched but each runs alone ({accelerator.distributed_type}): "
            "on CPUs set ACCELERATE_USE_CPU=1 (see launch/cpu_ddp.yaml)"
        )


def gather_rows(rows: list, accelerator=None) -> list:
    """Every process's Python ``rows`` concatenated, on every process (``gather_object``);
    the rows themselves when there is one process. Ranks may hold different counts."""
    if accelerator is None or accelerator.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return gather_object(rows)


def broadcast(accelerator, value):
    """The main process's ``value`` (any picklable object) on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def on_main(accelerator, work):
    """``work()`` on the main process only; its result on every process. When it fails, every
    process raises (the main process its own error, the others one line saying so), so none
    is left waiting in the next collective."""
    result, problem, error = None, None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 (re-raised below, after the others are told)
            error = err
            problem = str(err) if isinstance(err, MaskdistError) else \
                f"the main process failed ({type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''})"
    problem = broadcast(accelerator, problem)
    if problem:
        if error is not None:
            raise error
        raise MaskdistError(problem)
    return broadcast(accelerator, result)


def raise_everywhere(accelerator, problem: str | None, error: type[MaskdistError] = MaskdistError) -> None:
    """Raise the main process's error on every rank, so none is left waiting in a collective."""
    problem = broadcast(accelerator, problem)
    if problem:
        raise error(problem)
