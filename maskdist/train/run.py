"""A fold's training set-up: the accelerator, shard set, model, loss, optimiser, schedule and
both loaders, made once by :func:`setup` into a :class:`Run`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from maskdist import config as config_mod, streams
from maskdist.data import transforms
from maskdist.errors import MaskdistError
from maskdist.model import losses
from maskdist.model.ema import Ema
from maskdist.model.factory import create_model, normalisation, plain_module, prepare_for_device
from maskdist.model.mixing import Mixer
from maskdist.model.weights import Weights, resolve
from maskdist.shards import crop as face_crop
from maskdist.shards.manifest import open_shard_set
from maskdist.shards.opener import RetryPolicy
from maskdist.system import distributed
from maskdist.train import checkpoint
from maskdist.train.schedule import WarmRestarts, scaled_lr
from maskdist.train.step import make_optimizer

BATCH_LOG = "batches"  # OUT/fold<K>/batches/rank<R>.txt with --log-batches
# Set to 1 by a driver that chose random weights itself and said so once (the offline demo):
# the folds then do not each warn about them.
RANDOM_INIT_CHOSEN = "MASKDIST_RANDOM_INIT_CHOSEN"


@dataclass
class Run:
    """Everything one fold's training needs, made once by :func:`setup`."""

    cfg: config_mod.TrainConfig
    accelerator: Accelerator
    shard_set: object
    train_folds: list[int]
    counts: list[int]
    model: torch.nn.Module  # what the step runs: DDP-prepared, then compiled with --compile
    module: torch.nn.Module  # the plain module under it: saved, averaged into the EMA, validated
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    schedule: WarmRestarts
    base_lr: float
    train_data: streams.StreamLoader
    val_loader: streams.StreamLoader | None  # None for the full-data model (--fold all): nothing is held out
    mean: tuple
    std: tuple
    channels_last: bool
    steps_per_epoch: int
    optimizer_steps_per_epoch: int
    mixer: Mixer | None = None  # mixup / cutmix, when on
    ema: Ema | None = None  # the EMA of the weights, when on
    writer: object = None  # TensorBoard's SummaryWriter, on the main process when logging
    batch_log: object = None
    pretrained: dict | None = None  # where the starting weights came from, for the model card

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
        if self.val_loader is not None:
            self.val_loader.close()


def make_train_loader(cfg: config_mod.TrainConfig, shard_set, train_folds: list[int], accelerator: Accelerator,
                      workers: int | None = None) -> tuple[streams.StreamLoader, int]:
    """This rank's class-balanced training loader as ``cfg`` describes it (``workers``
    overrides ``cfg.workers``) and its steps per epoch."""
    return streams.train_loader(
        shard_set, folds=train_folds, batch_size=cfg.batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, workers=cfg.workers if workers is None else workers, seed=cfg.seed,
        alpha=cfg.alpha, transform=transforms.build_transform(cfg.augment, cfg.resize, cfg.crop),
        shuffle_buffer=cfg.shuffle_buffer, max_skipped=cfg.max_skipped, pin_memory=accelerator.device.type == "cuda",
        channels_last=accelerator.device.type == "cuda",
    )


def make_accelerator(cfg: config_mod.TrainConfig, log_dir: Path | None = None) -> Accelerator:
    """The fold's accelerator; ``log_dir``: where TensorBoard logs go (trackers start in
    :func:`maskdist.train.loop.train`); None: no logging."""
    return distributed.make_accelerator(cfg.precision, cfg.timeout_s, cfg.grad_accum, log_dir=log_dir,
                                        static_graph=not cfg.compile)


def setup(cfg: config_mod.TrainConfig, log_dir: Path | None = None, accelerator: Accelerator | None = None) -> Run:
    """The shard set, model, loss, optimiser, schedule and both loaders of a fold, on
    ``accelerator`` (made from ``cfg`` when None, logging under ``log_dir``)."""
    accelerator = accelerator or make_accelerator(cfg, log_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    shard_set = open_shard_set(cfg.shards, RetryPolicy(cfg.read_tries, cfg.read_backoff_s))
    if cfg.resume and (cfg.run_dir() / checkpoint.MODEL_JSON).is_file():  # a resumed fold keeps the crop its model learned
        face_crop.check_same(face_crop.policy_of(checkpoint.read_card(cfg.run_dir())), face_crop.policy_of(shard_set.manifest),
                             f"{cfg.run_dir()} was trained on", cfg.shards, "start a new run (another --out)")
    train_folds = list(range(shard_set.folds)) if cfg.full_data else streams.folds_except(shard_set, cfg.fold_number, "--fold")
    counts = shard_set.class_counts(train_folds)

    set_seed(cfg.seed)  # same init on every rank; the streams seed per rank and worker themselves
    weights = pretrained_weights(cfg, accelerator)
    warn_random = accelerator.is_main_process and os.environ.get(RANDOM_INIT_CHOSEN) != "1"
    model = create_model(cfg.model, drop_rate=cfg.drop_rate, pretrained_file=weights.path,
                         warn_random=warn_random, drop_path_rate=cfg.drop_path, heads=cfg.heads)
    mean, std = normalisation(model)
    cuda = accelerator.device.type == "cuda"
    channels_last = cuda  # cuda: NHWC batches and weights (cuDNN's fast layout); pinned loader memory
    model = prepare_for_device(model, accelerator.device)
    loss_fn = losses.make_loss(cfg.loss, counts, cfg.class_weights, cfg.gamma, cfg.label_smoothing, f1_weight=cfg.f1_weight,
                               heads=cfg.heads).to(accelerator.device)
    mixer = Mixer(cfg.mixup, cfg.cutmix, cfg.label_smoothing)
    # timm's Mixup draws from numpy's global RNG: its own stream on each rank (accelerate's
    # saved state carries it across a resume)
    np.random.seed(streams.derive_seed(cfg.seed, 3, rank) % 2**32)

    eval_tf = transforms.build_transform("none", cfg.resize, cfg.crop)
    train_data, train_steps = make_train_loader(cfg, shard_set, train_folds, accelerator)
    steps_per_epoch = min(cfg.max_steps, train_steps) if cfg.max_steps else train_steps
    # Validation workers start for each pass and exit after it: idle all epoch otherwise.
    val_loader = None if cfg.full_data else streams.eval_loader(
        shard_set, fold=cfg.fold_number, batch_size=cfg.batch_size, rank=rank, world_size=world, workers=cfg.validation_workers(),
        transform=eval_tf, pin_memory=cuda, channels_last=channels_last, persistent=False)

    # Before any worker starts: the batches of every local process must fit in /dev/shm.
    streams.check_shared_memory([loader for loader in (train_data, val_loader) if loader is not None],
                                processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

    base_lr = scaled_lr(cfg.lr, cfg.batch_size * world * cfg.grad_accum, cfg.base_batch)
    optimizer = make_optimizer(cfg, model, base_lr, fused=accelerator.device.type == "cuda")
    schedule = WarmRestarts(base_lr, cfg.epochs, cfg.warmup_epochs, cfg.restart_epochs, cfg.restart_mult, cfg.min_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    module = plain_module(model)
    ema = Ema(module, cfg.ema_decay, warmup=True) if cfg.ema_decay else None
    if cfg.compile:  # after prepare: DDP's all-reduce then overlaps the compiled backward
        model = torch.compile(model)
    return Run(cfg, accelerator, shard_set, train_folds, counts, model, module, optimizer, loss_fn, schedule, base_lr,
               train_data, val_loader, mean, std, channels_last, steps_per_epoch, max(1, steps_per_epoch // cfg.grad_accum),
               mixer if mixer.enabled else None, ema, pretrained=weights.record)


def pretrained_weights(cfg: config_mod.TrainConfig, accelerator: Accelerator) -> Weights:
    """``--pretrained`` as a local file. One download per node: the local main process
    resolves it first (downloading into the cache if need be) while the others wait, then they
    read the cache only. A failure of the first still reaches the barrier, so no rank hangs."""
    if not accelerator.is_local_main_process:
        accelerator.wait_for_everyone()
        try:
            return resolve(cfg.pretrained, cfg.model, local_only=True, verify=False)
        except MaskdistError:
            raise MaskdistError(f"rank {accelerator.process_index}: --pretrained {cfg.pretrained} is not in the cache after"
                                " the node's first process resolved it: see that process's error") from None
    try:
        return resolve(cfg.pretrained, cfg.model)
    finally:
        accelerator.wait_for_everyone()


def open_batch_log(run_dir: Path, rank: int):
    folder = run_dir / BATCH_LOG
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"rank{rank}.txt", "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed in train)
