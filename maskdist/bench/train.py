"""``maskdist bench train``: maskdist's training step against a bare PyTorch loop.

Both run the same model, loss, optimiser and precision on the same synthetic in-memory
uint8 batches (no data loading, so the figure isolates the step): maskdist's step goes
through Accelerate (autocast, accumulation context, the lr set per step, device-side
normalisation) and the training loop's own measurements (gradient norm, loss and timings
kept on the device, :class:`maskdist.train.WindowMeter`); the bare loop is the textbook ``forward / backward / step`` on the same uint8 batch moved
to the device and normalised there. Rounds
alternate between the two so drift in machine load hits both alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from maskdist.model import losses
from maskdist.model.factory import create_model, normalisation


@dataclass
class TrainBench:
    model: str
    device: str
    precision: str
    batch_size: int
    crop: int
    steps: int
    maskdist_step_s: float
    bare_step_s: float
    peak_memory_mb: float | None = None  # CUDA: the allocator's peak over both loops

    @property
    def ratio(self) -> float:
        """maskdist speed / bare speed (1.0 = no overhead)."""
        return self.bare_step_s / self.maskdist_step_s

    def describe(self) -> str:
        rate = lambda s: self.batch_size / s  # noqa: E731
        return "\n".join([
            f"training step, {self.model}, batch {self.batch_size} x {self.crop}x{self.crop}, {self.device}, precision {self.precision}, "
            f"{self.steps} timed steps each:",
            f"  maskdist (accelerate) : {1 / self.maskdist_step_s:8.2f} steps/s {rate(self.maskdist_step_s):9.1f} img/s",
            f"  bare PyTorch loop     : {1 / self.bare_step_s:8.2f} steps/s {rate(self.bare_step_s):9.1f} img/s",
            f"  ratio maskdist / bare : {self.ratio:.3f}",
        ] + ([f"  peak memory           : {self.peak_memory_mb:.0f} MB"] if self.peak_memory_mb is not None else []))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model_name: str = "efficientnet_b3", batch_size: int = 32, crop: int = 150, steps: int = 20, warmup: int = 3,
        rounds: int = 3, precision: str = "no", compile_model: bool = False) -> TrainBench:
    from maskdist.system import distributed
    from maskdist.train.meters import WindowMeter
    from maskdist.train.step import train_step

    accelerator = distributed.make_accelerator(precision)
    device = accelerator.device
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, crop, crop), dtype=torch.uint8)
    targets = torch.randint(0, 18, (batch_size,))
    batch = {"image": images, "label": targets}
    counts = [100] * 18

    def fresh(fused: bool = False):
        model = create_model(model_name, warn_random=False).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if compile_model:
            model = torch.compile(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, **({"fused": True} if fused else {}))
        return model, optimizer, losses.make_loss("focal", counts).to(device)

    # maskdist's side as training runs it: a fused optimiser and NHWC batches on CUDA
    model, optimizer, loss_fn = fresh(fused=device.type == "cuda")
    if device.type == "cuda":
        batch["image"] = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    mean, std = normalisation(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    channels_last = device.type == "cuda"

    bare_model, bare_opt, bare_loss = fresh()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

    meter = WindowMeter(device)

    def maskdist_step():
        waited = time.perf_counter()
        loss, grad_norm = train_step(accelerator, model, optimizer, loss_fn, batch, mean, std, channels_last, 0.01)
        meter.add(loss, grad_norm, batch_size, time.perf_counter() - waited)

    def bare_step():  # the same input work: uint8 batch to the device, normalised there
        x_bare = (images.to(device).float() / 255 - mean_t) / std_t
        y_bare = targets.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = bare_model(x_bare)
        loss = bare_loss(logits, y_bare)
        bare_opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(bare_opt)
        scaler.update()

    def timed(step, n):
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            step()
        _sync(device)
        return time.perf_counter() - start

    for step in (maskdist_step, bare_step):
        timed(step, warmup)
    totals = {"maskdist": 0.0, "bare": 0.0}
    for _ in range(rounds):
        totals["maskdist"] += timed(maskdist_step, steps)
        totals["bare"] += timed(bare_step, steps)
    n = steps * rounds
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return TrainBench(model_name, str(device), precision, batch_size, crop, n, totals["maskdist"] / n, totals["bare"] / n, peak)
