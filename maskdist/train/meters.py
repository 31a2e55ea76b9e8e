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

    def reduce(self, accelerator: Accelerator) -> dict:
        """Sum the window over ranks (one collective, every rank calls it at the same step)."""
        wall = time.perf_counter() - self.started
        zero = torch.zeros((), device=self.device)
        local = torch.stack([
            self.loss if self.loss is not None else zero,
            self.grad_norm if self.grad_norm is not None else zero,
            torch.tensor(float(self.grad_steps), device=self.device), torch.tensor(float(self.steps), device=self.device),
            torch.tensor(float(self.images), device=self.device), torch.tensor(self.wait_s, device=self.device),
            torch.tensor(wall, device=self.device),
        ])
        total = accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local
        loss, grad, grad_steps, steps, images, wait, walls = (float(v) for v in total.cpu())
        world = accelerator.num_processes
        return {"loss": loss / max(steps, 1), "grad_norm": grad / grad_steps if grad_steps else float("nan"),
                "images_per_s": images / max(walls / world, 1e-9), "images_per_s_per_process": images / max(walls, 1e-9),
                "data_wait_frac": min(1.0, wait / max(walls, 1e-9)), "step_s": walls / max(steps, 1), "local_loss_sum": float(local[0])}


def memory_scalars(device: torch.device, loader) -> dict:
    """Peak accelerator memory of the window (CUDA) or the process's RSS (CPU), and the RSS
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


def fold_window(window: WindowMeter, tally: EpochTally, accelerator: Accelerator) -> dict:
    """Reduce a log window over ranks and add it to the epoch's tally; returns its figures."""
    figures = window.reduce(accelerator)
    tally.steps += window.steps
    tally.images += window.images
    tally.loss_sum += figures["local_loss_sum"]
    tally.wait_s += window.wait_s
    tally.busy_s += time.perf_counter() - window.started
    return figures


def mean_over_ranks(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    return float(accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "mean"))
