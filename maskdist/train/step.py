"""One training step: normalise on the device, mix, forward under autocast, backward, and on
the last micro-batch of an accumulation window set the lr, clip, step and update the EMA.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator

from maskdist import config as config_mod
from maskdist.data import transforms
from maskdist.errors import MaskdistError
from maskdist.model.ema import Ema
from maskdist.model.factory import plain_module
from maskdist.model.mixing import Mixer


class NonFiniteLoss(MaskdistError):
    """A training step's loss is inf or NaN (on any rank); its update was not made."""


def _loss_is_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (one flag summed over ranks: they all agree).
    It reads the flag on the host, so a CUDA step waits for its forward here: the price of
    stopping before the update instead of after NaN weights."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return not bool(bad.item())


def make_optimizer(cfg: config_mod.TrainConfig, model: torch.nn.Module, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; no weight decay on biases and norm parameters
    (1-d tensors), as timm does. ``fused`` (CUDA): one kernel for the whole update, and fp16's
    GradScaler then unscales and skips inside it instead of reading ``found_inf`` on the
    host every step."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **kwargs)
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients, on their device (no host synchronisation)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def train_step(accelerator: Accelerator, model, optimizer, loss_fn, batch: dict, mean, std, channels_last: bool,
               lr: float, clip_grad: float = 0.0, mixer: Mixer | None = None, ema: Ema | None = None,
               optimizer_step: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch: normalise on the device, mix (mixup/cutmix, soft targets), forward
    under autocast, backward; on the last micro-batch of an accumulation window set the lr,
    clip, step, and fold the new weights into the EMA (``optimizer_step``: steps done after it).

    Raises :class:`NonFiniteLoss` before the backward when the loss is not finite on any rank.
    Returns the loss and, on optimiser steps, the gradient norm before clipping (what
    clipping returns, or computed the same way when clipping is off), both still on the
    device so that no step waits for the host.
    """
    x = transforms.to_device(batch["image"], accelerator.device, mean, std, channels_last)
    y = batch["label"].to(accelerator.device, non_blocking=True)
    if mixer is not None:
        x, y = mixer(x, y)
    grad_norm = None
    module = plain_module(model)  # the EMA follows the plain weights (not a DDP or compiled wrapper)
    # The forward folds its batch into the BatchNorm statistics: kept to undo a diverged one.
    buffers = list(module.buffers())
    before = [b.detach().clone() for b in buffers]
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(x)
        loss = loss_fn(logits, y)
        # The loss is unscaled, so fp16's GradScaler never makes it inf: a non-finite loss is
        # a diverged run. (Gradients that overflow under fp16's scaling are the scaler's: it
        # skips that update and lowers the scale.)
        if not _loss_is_finite(accelerator, loss):
            optimizer.zero_grad(set_to_none=True)  # the window's earlier gradients go too
            with torch.no_grad():
                for buffer, value in zip(buffers, before):
                    buffer.copy_(value)
            raise NonFiniteLoss(f"the training loss is {float(loss.detach())}")
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            for group in optimizer.param_groups:
                group["lr"] = lr
            if clip_grad:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            else:
                accelerator.unscale_gradients(optimizer)  # fp16: the norm of the true gradients
                grad_norm = _grad_norm(model)
        optimizer.step()  # a no-op inside an accumulation window (accelerate's wrapper)
        optimizer.zero_grad(set_to_none=True)
        if ema is not None and accelerator.sync_gradients:
            # every rank holds the same weights after a DDP step, so every rank's EMA is the same
            ema.update(module, optimizer_step)
    return loss.detach(), grad_norm
