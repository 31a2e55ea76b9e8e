"""What the loop measures: the epoch's running figures (kept in the resumable state) and the
window between two logs (kept on the device, so measuring forces no host synchronisation).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator


@dataclass
class EpochTally:
    """Running figures of the current epoch, kept in the resumable state so that a resumed
    epoch reports what the uninterrupted one would have."""

    steps: int = 0
    images: int = 0  # this process's
    loss_sum: float = 0.0  # this process's, over its steps
    wait_s: float = 0.0  # time the loop waited for the loader
    busy_s: float = 0.0  # loop time in all (waits included)

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class WindowMeter:
    """What the loop measures between two logs, kept on the device where it comes from the
    device (loss, grad norm) so that measuring forces no host synchronisation per step."""

    device: torch.device
    steps: int = 0
    images: int = 0
    wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    grad_steps: int = 0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, images: int, wait_s: float) -> None:
        self.steps += 1
        self.images += images
        self.wait_s += wait_s
        self.loss = loss.float() if self.loss is None else self.loss + loss.float()
        if grad_norm is not None:
            grad_norm = grad_norm.float().to(self.device)
            self.grad_norm = grad_norm if self.grad_norm is None else self.grad_norm + grad_norm
            self.grad_steps += 1

    def start_reduce(self, accelerator: Accelerator) -> PendingFigures:
        """Start summing the window over ranks (one collective; every rank calls it at the same
        step) and return its figures, to be read with :meth:`PendingFigures.result`.

        The host's counts travel in one copy to the device and the sums in one copy back. On
        CUDA nothing here waits for the device: the all-reduce and the copy back (into pinned
        memory) are queued behind the step, and the figures are read one log window later,
        when they are long done, so logging never drains the pipeline. On a CPU the figures
        are ready at once.
        """
        wall = time.perf_counter() - self.started
        host = torch.tensor([float(self.grad_steps), float(self.steps), float(self.images), self.wait_s, wall],
                            dtype=torch.float64)
        zero = torch.zeros((), device=self.device)
        on_device = torch.stack([self.loss if self.loss is not None else zero,
                                 self.grad_norm if self.grad_norm is not None else zero]).double()
        cuda = self.device.type == "cuda"
        local = torch.cat([on_device, host.pin_memory().to(self.device, non_blocking=True) if cuda else host])
        total = accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local
        both = torch.stack([local, total])
        if cuda:
            out = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            out.copy_(both, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return PendingFigures(out, accelerator.num_processes, event)
        return PendingFigures(both, accelerator.num_processes)


@dataclass
class PendingFigures:
    """A log window's figures, summed over ranks, possibly still on their way from the device."""

    values: torch.Tensor  # (2, 7): this rank's window, then the sum over ranks
    world: int
    event: object = None  # a CUDA event recorded after the copy to the host

    def result(self) -> dict:
        if self.event is not None:
            self.event.synchronize()
        mine, total = self.values.tolist()
        loss, grad, grad_steps, steps, images, wait, walls = total
        return {"loss": loss / max(steps, 1), "grad_norm": grad / grad_steps if grad_steps else float("nan"),
                "images_per_s": images / max(walls / self.world, 1e-9), "images_per_s_per_process": images / max(walls, 1e-9),
                "data_wait_frac": min(1.0, wait / max(walls, 1e-9)), "step_s": walls / max(steps, 1), "local_loss_sum": mine[0]}


MEMORY_EVERY_S = 30.0  # memory is read at the first log window, then at most this often


def memory_scalars(device: torch.device, loader) -> dict:
    """Peak accelerator memory since the last reading (CUDA) and the RSS of the process and
    of each loader worker, in MB."""
    import psutil

    out = {}
    if device.type == "cuda":
        out["memory/peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    out["memory/main_rss_mb"] = psutil.Process().memory_info().rss / 2**20
    for i, pid in enumerate(loader.worker_pids()):
        with contextlib.suppress(psutil.Error):
            out[f"memory/loader_worker{i}_rss_mb"] = psutil.Process(pid).memory_info().rss / 2**20
    return out


def fold_window(window: WindowMeter, tally: EpochTally, accelerator: Accelerator) -> PendingFigures:
    """Start reducing a log window over ranks and add its counts to the epoch's tally; its
    loss goes into the tally when the figures are read (:func:`settle`)."""
    pending = window.start_reduce(accelerator)
    tally.steps += window.steps
    tally.images += window.images
    tally.wait_s += window.wait_s
    tally.busy_s += time.perf_counter() - window.started
    return pending


def settle(pending: PendingFigures, tally: EpochTally) -> dict:
    """Read a window's figures (waiting for the device if it must) and add its loss to the tally."""
    figures = pending.result()
    tally.loss_sum += figures["local_loss_sum"]
    return figures


def mean_over_ranks(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    return float(accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "mean"))
