"""The training loop: one fold, any number of processes, under ``accelerate launch``.

Top to bottom: set up Accelerate and the run folder; read the shard manifest; build the
class-balanced training stream and the held-out fold's evaluation stream (not passed
through ``accelerator.prepare``: they split work by rank themselves); model, loss and
optimiser; per epoch, train with accumulation and clipping under the per-step lr schedule,
evaluate exactly once per sample (gathered by key), keep the best model by macro F1 on the
true labels, and save the resumable state. TensorBoard and the console show progress, the
loop's own speed (data-wait share, step time, images/s) and memory.

The resumable state (``state/``) is saved at every epoch end and, inside an epoch, every
``--checkpoint-every`` steps, every ``--checkpoint-minutes`` and on SIGTERM/SIGUSR1
(:mod:`maskdist.preemption`). It holds the model, optimiser, grad scaler, every process's
RNG states and where the run stands (epoch, step, best, the epoch's running figures); the
streams regenerate every batch from (seed, rank, worker, epoch), so ``--resume`` continues
at the next batch: the batches, and on CPU the weights, are those of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from maskdist import checkpoint, config as config_mod, distributed, heads, labels, losses, metrics, monitor, parallel, stream, transforms
from maskdist.checkpoint import CONFIG, MODEL_JSON, OOF, STATE, TENSORBOARD, TRAINER_STATE
from maskdist.errors import MaskdistError
from maskdist.fileio import atomic_path, atomic_write_json, dir_exists, recover_dir, replace_dir
from maskdist.ema import Ema
from maskdist.mixing import Mixer
from maskdist.model import create_model, normalisation, prepare_for_device
from maskdist.preemption import Decision, Preempted, Preemption
from maskdist.schedule import WarmRestarts, scaled_lr
from maskdist.shards.manifest import open_shard_set
from maskdist.shards.opener import RetryPolicy

BATCH_LOG = "batches"  # OUT/fold<K>/batches/rank<R>.txt with --log-batches


def make_optimizer(cfg: config_mod.TrainConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-d tensors), as timm does.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def evaluate(accelerator: Accelerator, model, loader, mean, std, channels_last: bool, head_kind: str = "single") -> pd.DataFrame:
    """Probabilities of every sample of ``loader`` exactly once, gathered from all ranks by key.

    Each rank predicts its own share with the unwrapped model (ranks may hold different
    counts, so no collective runs inside the loop), then ``gather_object`` collects the
    (key, probabilities, labels) rows and duplicates are dropped by key. ``head_kind``: the
    model's heads (18-class probabilities either way, :func:`maskdist.heads.probabilities`).
    """
    model.eval()
    rows = []
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            x = transforms.to_device(batch["image"], accelerator.device, mean, std, channels_last)
            probs = heads.probabilities(model(x), head_kind).cpu().numpy()
            for i, key in enumerate(batch["key"]):
                rows.append((key, int(batch["label"][i]), int(batch["label_true"][i]), probs[i].astype(np.float32)))
    gathered = distributed.gather_rows(rows, accelerator)
    frame = pd.DataFrame(gathered, columns=["key", "label", "label_true", "probs"])
    return frame.drop_duplicates("key").sort_values("key").reset_index(drop=True)


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

    Returns the loss and, on optimiser steps, the gradient norm before clipping (what
    clipping returns, or computed the same way when clipping is off), both still on the
    device so that no step waits for the host.
    """
    x = transforms.to_device(batch["image"], accelerator.device, mean, std, channels_last)
    y = batch["label"].to(accelerator.device, non_blocking=True)
    if mixer is not None:
        x, y = mixer(x, y)
    grad_norm = None
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(x)
        loss = loss_fn(logits, y)
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
            ema.update(accelerator.unwrap_model(model), optimizer_step)
    return loss.detach(), grad_norm


def oof_frame(predictions: pd.DataFrame, fold: int) -> pd.DataFrame:
    probs = np.stack(predictions["probs"].to_numpy()) if len(predictions) else np.zeros((0, labels.NUM_CLASSES))
    out = pd.DataFrame({"key": predictions["key"], "fold": fold, "label_true": predictions["label_true"],
                        "label": predictions["label"], "pred": probs.argmax(axis=1) if len(probs) else []})
    for c in range(labels.NUM_CLASSES):
        out[f"p{c:02d}"] = probs[:, c] if len(probs) else []
    return out


# --- the run folder's resumable state ------------------------------------------------------


def _load_trainer_state(run_dir: Path) -> dict | None:
    state_dir = recover_dir(run_dir / STATE)
    if state_dir is None or not (state_dir / TRAINER_STATE).is_file():
        return None
    return json.loads((state_dir / TRAINER_STATE).read_text())


def ema_file(rank: int) -> str:
    """The EMA weights of ``rank`` inside the state folder."""
    return f"ema-rank{rank}.safetensors"


def _load_ema(run: "Run", state_dir: Path) -> None:
    if run.ema is None:
        return
    path = state_dir / ema_file(run.accelerator.process_index)
    if not path.is_file():  # more ranks than the run had: the weights are the same on every rank
        path = state_dir / ema_file(0)
    if not path.is_file():
        raise MaskdistError(f"{state_dir} holds no EMA weights but this run keeps an EMA (--ema-decay"
                            f" {run.cfg.ema_decay}): resume with the options the run started with")
    run.ema.load_state_dict(load_file(str(path), device=str(run.accelerator.device)))


def has_state(run_dir: Path) -> bool:
    """The fold has a resumable state (``--resume`` continues it)."""
    return dir_exists(Path(run_dir) / STATE)


def _epoch_done(trainer: dict) -> bool:
    # States written before mid-epoch saves existed hold finished epochs only.
    return bool(trainer.get("epoch_done", True))


def fold_finished(run_dir: Path) -> bool:
    """The fold trained every epoch of its saved configuration and has its best model."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_JSON).is_file() or not (run_dir / CONFIG).is_file():
        return False
    trainer = _load_trainer_state(run_dir)
    epochs = config_mod.load(run_dir / CONFIG).epochs
    return trainer is not None and _epoch_done(trainer) and trainer.get("epoch", -1) >= epochs - 1


def _save_state(accelerator: Accelerator, run_dir: Path, trainer_state: dict, ema: Ema | None = None) -> float:
    """``accelerator.save_state`` (model, optimiser, scaler, every rank's RNG states) and the
    EMA weights (safetensors: loading runs no code) into a temporary folder, swapped in when
    complete (a kill during the save leaves the previous state); returns the seconds it took."""
    started = time.perf_counter()
    tmp = run_dir / (STATE + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if ema is not None:  # each rank's own (their BatchNorm statistics differ within an epoch)
        save_file(ema.state_dict(), str(tmp / ema_file(accelerator.process_index)))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / TRAINER_STATE, trainer_state)
        replace_dir(tmp, run_dir / STATE)
    accelerator.wait_for_everyone()
    return time.perf_counter() - started


# --- what one epoch measures -----------------------------------------------------------------


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


def _memory_scalars(device: torch.device, loader) -> dict:
    """Peak accelerator memory of the window (CUDA) or the process's RSS (CPU), and the RSS
    of each loader worker, in MB."""
    import psutil

    out = {}
    if device.type == "cuda":
        out["memory/peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    out["memory/main_rss_mb"] = psutil.Process().memory_info().rss / 2**20
    for i, pid in enumerate(loader.worker_pids()):
        try:
            out[f"memory/loader_worker{i}_rss_mb"] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            pass
    return out


LAUNCHER_GRACE_S = 120  # what a rank whose launcher died has to save before it exits anyway


def _follow_launcher(preemption: Preemption) -> None:
    """A rank started by ``accelerate launch``/torchrun ends with its launcher: when the
    launcher dies (killed, or stopped by SIGTERM, which accelerate's one-process launcher does
    not pass on), the rank saves after its step and stops, or exits after LAUNCHER_GRACE_S."""
    import psutil

    try:
        parent = " ".join(psutil.Process(os.getppid()).cmdline())
    except psutil.Error:
        return
    if not any(name in parent for name in ("accelerate", "torchrun", "torch.distributed.run")):
        return

    def launcher_gone():
        preemption.request("LAUNCHER_EXIT", "the launcher exited")
        timer = threading.Timer(LAUNCHER_GRACE_S, os._exit, (1,))
        timer.daemon = True
        timer.start()

    parallel.watch(os.getppid(), on_exit=launcher_gone)


# --- the loop ----------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one fold's training needs, made once by :func:`setup`."""

    cfg: config_mod.TrainConfig
    accelerator: Accelerator
    shard_set: object
    train_folds: list[int]
    counts: list[int]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    schedule: WarmRestarts
    base_lr: float
    train_data: stream.StreamLoader
    val_loader: stream.StreamLoader
    mean: tuple
    std: tuple
    channels_last: bool
    steps_per_epoch: int
    optimizer_steps_per_epoch: int
    mixer: Mixer | None = None  # mixup / cutmix, when on
    ema: Ema | None = None  # the EMA of the weights, when on
    writer: object = None  # TensorBoard's SummaryWriter, on the main process when logging
    batch_log: object = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir()

    def optimizer_step(self, epoch: int, step: int) -> int:
        """Optimiser steps done once training step ``step`` (0-based) of ``epoch`` is done."""
        return epoch * self.optimizer_steps_per_epoch + (step + 1) // self.cfg.grad_accum

    def lr(self, epoch: int, step: int) -> float:
        """The schedule's lr for training step ``step`` (0-based) of ``epoch``."""
        return self.schedule.lr(self.optimizer_step(epoch, step) / self.optimizer_steps_per_epoch)

    def close(self) -> None:
        if self.batch_log is not None:
            self.batch_log.close()
        self.train_data.close()
        self.val_loader.close()


def make_train_loader(cfg: config_mod.TrainConfig, shard_set, train_folds: list[int], accelerator: Accelerator,
                      workers: int | None = None) -> tuple[stream.StreamLoader, int]:
    """This rank's class-balanced training loader as ``cfg`` describes it (``workers``
    overrides ``cfg.workers``) and its steps per epoch."""
    return stream.train_loader(
        shard_set, folds=train_folds, batch_size=cfg.batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, workers=cfg.workers if workers is None else workers, seed=cfg.seed,
        alpha=cfg.alpha, transform=transforms.build_transform(cfg.augment, cfg.resize, cfg.crop),
        shuffle_buffer=cfg.shuffle_buffer, max_skipped=cfg.max_skipped, pin_memory=accelerator.device.type == "cuda",
    )


def setup(cfg: config_mod.TrainConfig, log_dir: Path | None = None) -> Run:
    """The accelerator, shard set, model, loss, optimiser, schedule and both loaders of a fold.

    ``log_dir``: where TensorBoard logs go (trackers start in :func:`train`); None: no logging.
    """
    accelerator = distributed.make_accelerator(cfg.precision, cfg.timeout_s, cfg.grad_accum, log_dir=log_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    shard_set = open_shard_set(cfg.shards, RetryPolicy(cfg.read_tries, cfg.read_backoff_s))
    train_folds = stream.folds_except(shard_set, cfg.fold, "--fold")
    counts = shard_set.class_counts(train_folds)

    set_seed(cfg.seed)  # same init on every rank; the streams seed per rank and worker themselves
    model = create_model(cfg.model, drop_rate=cfg.drop_rate, pretrained_file=cfg.pretrained or None,
                         warn_random=accelerator.is_main_process, drop_path_rate=cfg.drop_path, heads=cfg.heads)
    mean, std = normalisation(model)
    channels_last = accelerator.device.type == "cuda"
    model = prepare_for_device(model, accelerator.device, cfg.compile)
    loss_fn = losses.make_loss(cfg.loss, counts, cfg.class_weights, cfg.gamma, cfg.label_smoothing, f1_weight=cfg.f1_weight,
                               heads=cfg.heads).to(accelerator.device)
    mixer = Mixer(cfg.mixup, cfg.cutmix, cfg.label_smoothing)
    # timm's Mixup draws from numpy's global RNG: its own stream on each rank (accelerate's
    # saved state carries it across a resume)
    np.random.seed(stream.derive_seed(cfg.seed, 3, rank) % 2**32)

    eval_tf = transforms.build_transform("none", cfg.resize, cfg.crop)
    train_data, train_steps = make_train_loader(cfg, shard_set, train_folds, accelerator)
    steps_per_epoch = min(cfg.max_steps, train_steps) if cfg.max_steps else train_steps
    val_loader = stream.eval_loader(shard_set, fold=cfg.fold, batch_size=cfg.batch_size, rank=rank, world_size=world,
                                    workers=cfg.workers, transform=eval_tf, pin_memory=accelerator.device.type == "cuda")

    base_lr = scaled_lr(cfg.lr, cfg.batch_size * world * cfg.grad_accum, cfg.base_batch)
    optimizer = make_optimizer(cfg, model, base_lr)
    schedule = WarmRestarts(base_lr, cfg.epochs, cfg.warmup_epochs, cfg.restart_epochs, cfg.restart_mult, cfg.min_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = Ema(accelerator.unwrap_model(model, keep_torch_compile=False), cfg.ema_decay, warmup=True) if cfg.ema_decay else None
    return Run(cfg, accelerator, shard_set, train_folds, counts, model, optimizer, loss_fn, schedule, base_lr,
               train_data, val_loader, mean, std, channels_last, steps_per_epoch, max(1, steps_per_epoch // cfg.grad_accum),
               mixer if mixer.enabled else None, ema)


def _fold_window(window: WindowMeter, tally: EpochTally, accelerator: Accelerator) -> dict:
    """Reduce a log window over ranks and add it to the epoch's tally; returns its figures."""
    figures = window.reduce(accelerator)
    tally.steps += window.steps
    tally.images += window.images
    tally.loss_sum += figures["local_loss_sum"]
    tally.wait_s += window.wait_s
    tally.busy_s += time.perf_counter() - window.started
    return figures


def train_epoch(run: Run, epoch: int, tally: EpochTally, first_step: int = 0, preemption: Preemption | None = None,
                save: Callable[[int, int, str], None] | None = None) -> EpochTally:
    """Train ``epoch`` from step ``first_step`` to its end, measuring the loop as it goes.

    Logs every ``log_every`` steps (loss, lr, images/s, the data-wait share, step time,
    gradient norm, memory); ``save(epoch, step, why)`` is called when ``preemption`` asks for
    a mid-epoch save; raises Preempted after the save when it asks to stop.
    """
    cfg, accelerator, steps = run.cfg, run.accelerator, run.steps_per_epoch
    run.model.train()
    run.train_data.set_epoch(epoch, first_step)
    window = WindowMeter(accelerator.device)
    bar = tqdm(total=steps, initial=first_step, desc=f"epoch {epoch}", disable=None if run.main else True,
               dynamic_ncols=True, leave=False)
    batches = iter(run.train_data)
    step, wanted = first_step, None  # wanted: a save (or stop) decided, waiting for its step
    try:
        while step < steps:
            waited = time.perf_counter()
            batch = next(batches)
            wait_s = time.perf_counter() - waited
            global_step = epoch * steps + step  # the x axis of every TensorBoard tag
            if epoch == 0 and step == 0 and run.writer is not None:
                run.writer.add_image("train/augmented_batch", monitor.image_grid(batch["image"]), global_step, dataformats="HWC")
            if run.batch_log is not None:
                run.batch_log.write(f"{epoch} {step} {' '.join(batch['key'])}\n")
            loss, grad_norm = train_step(accelerator, run.model, run.optimizer, run.loss_fn, batch, run.mean, run.std,
                                         run.channels_last, run.lr(epoch, step), cfg.clip_grad, run.mixer, run.ema,
                                         run.optimizer_step(epoch, step))
            window.add(loss, grad_norm, batch["image"].shape[0], wait_s)
            step += 1
            # Every rank reaches the same steps (equal step counts), so the reduce cannot hang.
            if (global_step + 1) % cfg.log_every == 0 or step == steps:
                figures = _fold_window(window, tally, accelerator)
                window = WindowMeter(accelerator.device)
                if run.main and run.writer is not None:
                    accelerator.log(monitor.scalars({
                        "train/loss": figures["loss"], "train/lr": run.optimizer.param_groups[0]["lr"],
                        "train/images_per_s": figures["images_per_s"],
                        "train/images_per_s_per_process": figures["images_per_s_per_process"],
                        "train/data_wait_frac": figures["data_wait_frac"], "train/step_s": figures["step_s"],
                        "train/grad_norm": figures["grad_norm"],
                    } | _memory_scalars(accelerator.device, run.train_data)), step=global_step + 1)
                if run.main:
                    bar.set_postfix(loss=f"{figures['loss']:.3f}", img_s=f"{figures['images_per_s']:.0f}",
                                    wait=f"{100 * figures['data_wait_frac']:.0f}%")
            bar.update(1)
            if preemption is not None:
                wanted = _merge(wanted, preemption.after_step(global_step + 1))
            # A save waits for the end of an accumulation window: the state holds no gradients.
            # (Every rank counts the same steps, so every rank acts on the same one.)
            if wanted is not None and step % cfg.grad_accum == 0:
                if window.steps:  # the open window goes into the tally the state keeps
                    _fold_window(window, tally, accelerator)
                    window = WindowMeter(accelerator.device)
                save(epoch, step, f"on {wanted.signal_name}" if wanted.stop else "periodic")
                if wanted.stop:
                    raise Preempted(f"stopped on {wanted.signal_name} at epoch {epoch} step {step} with its state saved:"
                                    " `--resume` continues from the next batch")
                wanted = None
    finally:
        bar.close()
    return tally


def _merge(wanted: Decision | None, decision: Decision) -> Decision | None:
    if not (decision.save or decision.stop):
        return wanted
    if wanted is None:
        return decision
    return Decision(True, wanted.stop or decision.stop, wanted.signal_name or decision.signal_name)


def sync_ema_buffers(run: Run) -> None:
    """Average the EMA's buffers (BatchNorm statistics) over ranks, as timm's distribute_bn
    does at each epoch's end. The EMA's weights are equal on every rank (DDP keeps the live
    weights equal); its buffers follow each rank's own batches within an epoch."""
    if run.ema is None or run.accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for buffer in run.ema.module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer /= run.accelerator.num_processes


def validate(run: Run, epoch: int) -> dict[str, tuple[pd.DataFrame, metrics.Scores]]:
    """Every validation sample once (gathered by key) and its scores on the true labels, for
    the live weights (``"live"``) and, when kept, the EMA weights (``"ema"``)."""
    models = {"live": run.accelerator.unwrap_model(run.model)}
    if run.ema is not None:
        models["ema"] = run.ema.module
    out = {}
    for name, model in models.items():
        predictions = evaluate(run.accelerator, model, run.val_loader, run.mean, run.std, run.channels_last, run.cfg.heads)
        if not len(predictions):
            raise MaskdistError(f"fold {run.cfg.fold} of {run.cfg.shards} has no validation samples: rebuild the shards with"
                                " more people per fold")
        out[name] = predictions, metrics.score(predictions["label_true"], np.stack(predictions["probs"].to_numpy()).argmax(axis=1))
    run.model.train()
    return out


def train(cfg: config_mod.TrainConfig) -> dict:
    """Train one fold; returns the best epoch's metrics (on every process).

    Raises :class:`~maskdist.preemption.Preempted` after saving when a stop signal arrives,
    and MaskdistError (one line) when another process of the run is lost.
    """
    try:
        return _train(cfg)
    except (torch.distributed.DistError, RuntimeError) as err:
        if not _is_collective_failure(err):
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise MaskdistError(f"lost contact with another process of the run ({first}): it stopped or died;"
                            " `--resume` continues from the last saved state") from err


# What a collective says when a peer is gone (gloo and NCCL, through DistError or RuntimeError).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted")


def _is_collective_failure(err: BaseException) -> bool:
    return isinstance(err, (torch.distributed.DistNetworkError, torch.distributed.DistBackendError)) \
        or any(s in str(err) for s in _PEER_LOST)


def _train(cfg: config_mod.TrainConfig) -> dict:
    run_dir = cfg.run_dir()
    run = setup(cfg, log_dir=run_dir)
    accelerator, main = run.accelerator, run.main
    rank, world, steps = accelerator.process_index, accelerator.num_processes, run.steps_per_epoch
    try:
        if cfg.resume and main:
            recover_dir(run_dir / STATE)  # once, before any rank reads it
        accelerator.wait_for_everyone()
        resumed = _load_trainer_state(run_dir) if cfg.resume else None
        problem = None
        if main and not cfg.resume and (run_dir / MODEL_JSON).exists():
            problem = f"{run_dir} already holds a trained fold: pass --resume to continue it, or another --out"
        distributed.raise_everywhere(accelerator, problem)
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            config_mod.save(cfg, run_dir / CONFIG)
        accelerator.wait_for_everyone()

        start_epoch, start_step, best = 0, 0, {"macro_f1": -1.0, "epoch": -1}
        tally, skipped_history = EpochTally(), {}
        if resumed is not None:
            accelerator.load_state(str(run_dir / STATE))
            _load_ema(run, run_dir / STATE)
            best, skipped_history = resumed["best"], resumed.get("skipped", {})
            if _epoch_done(resumed):
                start_epoch = resumed["epoch"] + 1
            elif (resumed.get("steps_per_epoch"), resumed.get("world_size")) == (steps, world):
                start_epoch, start_step = resumed["epoch"], int(resumed["step"])
                tally = EpochTally(**resumed["tallies"][rank])
                run.train_data.resume_skipped(start_epoch, resumed.get("epoch_skipped", [{}] * world)[rank])
            else:  # the batches of that epoch cannot be mapped onto another split: redo it
                start_epoch = resumed["epoch"]
                if main:
                    accelerator.print(f"warning: the state was saved inside epoch {start_epoch} with {resumed.get('world_size')}"
                                      f" process(es) and {resumed.get('steps_per_epoch')} steps per epoch; this run has {world}"
                                      f" and {steps}, so epoch {start_epoch} starts again from its first step")
        if main:
            # purge_step: TensorBoard drops what an interrupted run logged after its last save,
            # so no step is shown twice.
            purge = {"tensorboard": {"purge_step": start_epoch * steps + start_step + 1}} if resumed is not None else {}
            accelerator.init_trackers(TENSORBOARD, init_kwargs=purge)
            run.writer = accelerator.get_tracker("tensorboard", unwrap=True)
            accelerator.print(
                f"fold {cfg.fold}: {world} process(es) on {accelerator.device}, {sum(run.counts)} training samples, "
                f"{steps} steps/epoch of {cfg.batch_size}x{world}, lr {run.base_lr:.4g}, "
                + (f"resuming at epoch {start_epoch} step {start_step}, " if resumed is not None else "")
                + f"epochs {start_epoch}..{cfg.epochs - 1}"
            )
        run.batch_log = _open_batch_log(run_dir, rank) if cfg.log_batches else None
        preemption = Preemption(world, rank, cfg.checkpoint_every, cfg.checkpoint_minutes, timeout_s=cfg.timeout_s)
        _follow_launcher(preemption)
    except BaseException:
        run.close()
        raise

    def trainer_state(epoch: int, step: int, epoch_done: bool) -> dict:
        # Each rank's running figures of the epoch (a collective: every rank saves together).
        tallies = distributed.gather_rows([tally.to_dict()], accelerator)
        state = {"epoch": epoch, "step": step, "epoch_done": epoch_done, "steps_per_epoch": steps,
                 "world_size": world, "best": best, "tallies": tallies, "skipped": skipped_history}
        if not epoch_done:  # the shards each rank skipped so far in this epoch stay skipped after a resume
            state["epoch_skipped"] = distributed.gather_rows([dict(run.train_data.skipped)], accelerator)
        if run.ema is not None:  # one sum per rank: the EMA must be the same on every rank
            state["ema_checksums"] = distributed.gather_rows([_checksum(run.ema.module)], accelerator)
        return state

    def save_mid_epoch(epoch: int, step: int, why: str) -> None:
        seconds = _save_state(accelerator, run_dir, trainer_state(epoch, step, False), run.ema)
        preemption.saved()
        if main:
            accelerator.log({"checkpoint/save_s": seconds}, step=epoch * steps + step)
            accelerator.print(f"saved a resumable state at epoch {epoch} step {step} ({why}) in {seconds:.2f} s")

    try:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                tally = EpochTally()
            train_epoch(run, epoch, tally, first, preemption, save_mid_epoch)
            epoch_end_step = (epoch + 1) * steps
            epoch_loss = _mean_over_ranks(accelerator, tally.loss_sum / max(tally.steps, 1))
            epoch_wait = _mean_over_ranks(accelerator, tally.wait_s / max(tally.busy_s, 1e-9))
            rate = _mean_over_ranks(accelerator, tally.images / max(tally.busy_s, 1e-9)) * world
            skipped = _gather_skipped(accelerator, run.train_data.skipped)
            for path, (reason, samples) in skipped.items():
                skipped_history.setdefault(path, {"reason": reason, "samples": samples, "epochs": []})["epochs"].append(epoch)

            sync_ema_buffers(run)
            validated = validate(run, epoch)
            # The better of the live and the EMA weights is this epoch's candidate for best.
            weights = max(validated, key=lambda name: validated[name][1].macro_f1)
            predictions, scores = validated[weights]
            improved = scores.macro_f1 > best["macro_f1"]
            skipped_samples = sum(samples for _reason, samples in skipped.values())
            if main:
                live = validated["live"][1]
                logged = monitor.score_scalars(live) | monitor.scalars({
                    "train/epoch_loss": epoch_loss, "train/epoch_images_per_s": rate, "train/epoch_data_wait_frac": epoch_wait,
                    "data/skipped_shards": len(skipped), "data/skipped_samples": skipped_samples})
                if "ema" in validated:
                    logged |= monitor.score_scalars(validated["ema"][1], prefix="val_ema")
                accelerator.log(logged, step=epoch_end_step)
                run.writer.add_image("val/confusion", monitor.confusion_image(scores.confusion), epoch_end_step, dataformats="HWC")
                accelerator.print(
                    f"epoch {epoch}: loss {epoch_loss:.4f}, {rate:.0f} img/s, data wait {100 * epoch_wait:.1f}%, "
                    f"val macro F1 {live.macro_f1:.4f} "
                    f"(mask {live.part_f1['mask']:.3f}, gender {live.part_f1['gender']:.3f}, age {live.part_f1['age']:.3f})"
                    + (f", EMA {validated['ema'][1].macro_f1:.4f}" if "ema" in validated else "")
                    + (f", skipped {len(skipped)} shard(s) ({skipped_samples} samples)" if skipped else "")
                    + (f" *best* ({weights})" if improved and run.ema is not None else " *best*" if improved else "")
                )
                if improved:
                    best = {"macro_f1": scores.macro_f1, "epoch": epoch, "weights": weights, "part_f1": scores.part_f1,
                            "per_class_f1": scores.per_class_f1, "accuracy": scores.accuracy, "samples": scores.samples}
                    card = checkpoint.model_card(cfg.model, cfg.resize, cfg.crop, run.mean, run.std, run.shard_set.age_cut,
                                                 cfg.fold, epoch, best, cfg.drop_rate, heads=cfg.heads)
                    card["weights"] = weights  # live or ema: which weights best.safetensors holds
                    card["confusion"] = scores.confusion
                    card["train_folds"] = run.train_folds
                    card["data"] = _data_summary(skipped_history)
                    model = run.ema.module if weights == "ema" else accelerator.unwrap_model(run.model)
                    checkpoint.save(run_dir, model, card)
                    with atomic_path(run_dir / OOF) as tmp:
                        oof_frame(predictions, cfg.fold).to_csv(tmp, index=False, float_format="%.6g")
            best = distributed.gather_rows([best], accelerator)[0]  # every rank agrees on the best (rank 0's)
            tally = EpochTally()
            _save_state(accelerator, run_dir, trainer_state(epoch, steps, True), run.ema)
            preemption.saved()
            decision = preemption.at_epoch_end()
            if decision.stop and epoch < cfg.epochs - 1:
                raise Preempted(f"stopped on {decision.signal_name} after epoch {epoch} with its state saved:"
                                " `--resume` continues with the next epoch")
    finally:
        preemption.close(restore_handlers=sys.exc_info()[0] is None)
        run.close()

    if main:
        checkpoint.update_card(run_dir, {"data": _data_summary(skipped_history)})
        # hparams beside the metrics they produced, in the run's own folder (accelerate's
        # init_trackers(config=...) writes them to a separate run without metrics).
        run.writer.add_hparams(monitor.hparams(cfg.to_dict()), {"hparams/best_macro_f1": best["macro_f1"],
                                                                "hparams/best_epoch": best["epoch"]}, run_name=".")
        accelerator.print(f"fold {cfg.fold}: best macro F1 {best['macro_f1']:.4f} at epoch {best['epoch']}; run folder {run_dir}")
    accelerator.end_training()
    return best


def _checksum(model: torch.nn.Module) -> float:
    """A sum over every floating-point weight and buffer (equal models, equal sums)."""
    return float(sum(t.double().sum() for t in model.state_dict().values() if t.is_floating_point()))


def _mean_over_ranks(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    return float(accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "mean"))


def _gather_skipped(accelerator: Accelerator, skipped: dict) -> dict:
    """The union over ranks of the shards skipped this epoch: path -> (reason, samples)."""
    merged: dict = {}
    for rows in distributed.gather_rows([dict(skipped)], accelerator):
        for path, value in rows.items():
            merged.setdefault(path, tuple(value))
    return merged


def _data_summary(skipped_history: dict) -> dict:
    """What ``model.json`` says about skipped shards: per shard its reason, samples and epochs."""
    return {"skipped_shards": len(skipped_history),
            "skipped_samples": sum(v["samples"] * len(v["epochs"]) for v in skipped_history.values()),
            "skipped": skipped_history}


def _open_batch_log(run_dir: Path, rank: int):
    folder = run_dir / BATCH_LOG
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"rank{rank}.txt", "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed in train)
