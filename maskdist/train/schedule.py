"""Learning-rate schedule: linear warm-up, then cosine annealing with warm restarts (SGDR).

Evaluated per optimiser step from the fractional epoch, so it is the same on any number of
processes and needs no scheduler object in ``accelerator.prepare`` (which would step it once
per process). Matches ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` stepped with
fractional epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmRestarts:
    base_lr: float
    total_epochs: float
    warmup_epochs: float = 0.0
    restart_epochs: float = 0.0  # T_0 in epochs; 0: one cosine from the end of warm-up to the end
    restart_mult: int = 1
    min_lr: float = 0.0

    def lr(self, epoch: float) -> float:
        """Learning rate at a fractional epoch (``step / steps_per_epoch``)."""
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            return self.base_lr * (epoch + 1e-8) / self.warmup_epochs
        t = epoch - self.warmup_epochs
        period = self.restart_epochs or max(self.total_epochs - self.warmup_epochs, 1e-8)
        if not self.restart_epochs:  # one cosine: it ends at min_lr, it does not restart
            t = min(t, period)
            return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t / period)) / 2
        if self.restart_mult == 1:
            t_cur, t_i = math.fmod(t, period), period
        else:
            n = int(math.log(t / period * (self.restart_mult - 1) + 1, self.restart_mult))
            t_cur = t - period * (self.restart_mult**n - 1) / (self.restart_mult - 1)
            t_i = period * self.restart_mult**n
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


def scaled_lr(lr: float, global_batch: int, base_batch: int) -> float:
    """Linear scaling: ``lr`` applies at ``base_batch``; a larger global batch gets more."""
    return lr * global_batch / base_batch
