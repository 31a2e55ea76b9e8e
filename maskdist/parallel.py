"""Worker processes that are safe to start from any process state.

Pools and DataLoader workers start through ``forkserver`` (``spawn`` where that is missing),
never a plain ``fork``: a forked child inherits OpenCV's (and OpenMP's) thread pool in
whatever state the parent's threads left it, and its first ``cv2`` call can then wait
forever. Each worker uses one OpenCV and one torch thread: the workers are the parallelism.
"""
from __future__ import annotations

import multiprocessing
import signal


def context():
    """The multiprocessing context for every worker maskdist starts."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def gather_rows(rows: list, accelerator=None) -> list:
    """Every process's Python ``rows`` concatenated, on every process (``gather_object``);
    the rows themselves when there is one process. Ranks may hold different counts."""
    if accelerator is None or accelerator.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return gather_object(rows)


def init_worker(*_args) -> None:
    """Worker start-up: one compute thread each; Ctrl-C is the parent's to handle."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
