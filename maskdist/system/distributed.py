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

DEFAULT_TIMEOUT_S = 1800


def make_accelerator(precision: str = "no", timeout_s: int = DEFAULT_TIMEOUT_S, grad_accum: int = 1,
                     log_dir: str | Path | None = None):
    """An ``Accelerator`` with the collective timeout (a hung rank becomes an error after
    ``timeout_s``), mixed precision, accumulation, and TensorBoard logging under ``log_dir``
    when given. Raises when the launch started lone processes (see :func:`check_launch`)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if int(timeout_s) < 1:
        raise MaskdistError(f"--timeout-s {timeout_s} must be 1 or more seconds")
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        log_with="tensorboard" if log_dir is not None else None,
        project_dir=str(log_dir) if log_dir is not None else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=int(timeout_s)))],
    )
    check_launch(accelerator)
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


def raise_everywhere(accelerator, problem: str | None) -> None:
    """Raise the main process's error on every rank, so none is left waiting in a collective."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem:
        raise MaskdistError(problem)
