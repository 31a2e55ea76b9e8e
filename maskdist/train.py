"""The training loop: one fold, any number of processes, under ``accelerate launch``.

Top to bottom: set up Accelerate and the run folder; read the shard manifest; build the
class-balanced training stream and the held-out fold's evaluation stream (not passed
through ``accelerator.prepare``: they split work by rank themselves); model, loss and
optimiser; per epoch, train with accumulation and clipping under the per-step lr schedule,
evaluate exactly once per sample (gathered by key), keep the best model by macro F1 on the
true labels, and save the resumable state. TensorBoard and the console show progress.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from maskdist import checkpoint, config as config_mod, labels, losses, metrics, monitor, parallel, stream, transforms
from maskdist.errors import MaskdistError
from maskdist.fileio import atomic_path, atomic_write_json, recover_dir, replace_dir
from maskdist.manifest import open_shard_set
from maskdist.model import create_model, normalisation, prepare_for_device
from maskdist.schedule import WarmRestarts, scaled_lr

STATE = "state"
TRAINER_STATE = "trainer.json"
OOF = "oof.csv"


def make_accelerator(cfg: config_mod.TrainConfig, run_dir: Path, log: bool = True) -> Accelerator:
    return Accelerator(
        mixed_precision=cfg.precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard" if log else None,
        project_dir=str(run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.timeout_s))],
    )


def make_optimizer(cfg: config_mod.TrainConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-d tensors), as timm does.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def evaluate(accelerator: Accelerator, model, loader, mean, std, channels_last: bool) -> pd.DataFrame:
    """Probabilities of every sample of ``loader`` exactly once, gathered from all ranks by key.

    Each rank predicts its own share with the unwrapped model (ranks may hold different
    counts, so no collective runs inside the loop), then ``gather_object`` collects the
    (key, probabilities, labels) rows and duplicates are dropped by key.
    """
    model.eval()
    rows = []
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            x = transforms.to_device(batch["image"], accelerator.device, mean, std, channels_last)
            probs = torch.softmax(model(x).float(), dim=1).cpu().numpy()
            for i, key in enumerate(batch["key"]):
                rows.append((key, int(batch["label"][i]), int(batch["label_true"][i]), probs[i].astype(np.float32)))
    gathered = parallel.gather_rows(rows, accelerator)
    frame = pd.DataFrame(gathered, columns=["key", "label", "label_true", "probs"])
    return frame.drop_duplicates("key").sort_values("key").reset_index(drop=True)


def train_step(accelerator: Accelerator, model, optimizer, loss_fn, batch: dict, mean, std, channels_last: bool,
               lr: float, clip_grad: float = 0.0) -> torch.Tensor:
    """One micro-batch: normalise on the device, forward under autocast, backward; on the
    last micro-batch of an accumulation window set the lr, clip and step."""
    x = transforms.to_device(batch["image"], accelerator.device, mean, std, channels_last)
    y = batch["label"].to(accelerator.device, non_blocking=True)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(x)
        loss = loss_fn(logits, y)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            for group in optimizer.param_groups:
                group["lr"] = lr
            if clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()  # a no-op inside an accumulation window (accelerate's wrapper)
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def oof_frame(predictions: pd.DataFrame, fold: int) -> pd.DataFrame:
    probs = np.stack(predictions["probs"].to_numpy()) if len(predictions) else np.zeros((0, labels.NUM_CLASSES))
    out = pd.DataFrame({"key": predictions["key"], "fold": fold, "label_true": predictions["label_true"],
                        "label": predictions["label"], "pred": probs.argmax(axis=1) if len(probs) else []})
    for c in range(labels.NUM_CLASSES):
        out[f"p{c:02d}"] = probs[:, c] if len(probs) else []
    return out


def _load_trainer_state(run_dir: Path) -> dict | None:
    state_dir = recover_dir(run_dir / STATE)
    if state_dir is None or not (state_dir / TRAINER_STATE).is_file():
        return None
    return json.loads((state_dir / TRAINER_STATE).read_text())


def _save_state(accelerator: Accelerator, run_dir: Path, trainer_state: dict) -> None:
    """``accelerator.save_state`` into a temporary folder, swapped in when complete."""
    tmp = run_dir / (STATE + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / TRAINER_STATE, trainer_state)
        replace_dir(tmp, run_dir / STATE)
    accelerator.wait_for_everyone()


def _raise_everywhere(accelerator: Accelerator, problem: str | None) -> None:
    """Raise the main process's error on every rank, so none is left waiting in a collective."""
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise MaskdistError(problem)


def train(cfg: config_mod.TrainConfig) -> dict:
    """Train one fold; returns the best epoch's metrics (on every process)."""
    run_dir = cfg.run_dir()
    accelerator = make_accelerator(cfg, run_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        # accelerate's multi-GPU launcher on a machine without CUDA starts processes that
        # each believe they are alone: they would all train the same model, silently.
        raise MaskdistError(
            f"{launched} processes were launched but each runs alone ({accelerator.distributed_type}): "
            "on CPUs set ACCELERATE_USE_CPU=1 (see launch/cpu_ddp.yaml)"
        )
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process

    shard_set = open_shard_set(cfg.shards)
    if not 0 <= cfg.fold < shard_set.folds:
        raise MaskdistError(f"--fold {cfg.fold} does not exist: the shard set has folds 0..{shard_set.folds - 1}")
    train_folds = [f for f in range(shard_set.folds) if f != cfg.fold]
    counts = shard_set.class_counts(train_folds)

    resumed = _load_trainer_state(run_dir) if cfg.resume else None
    problem = None
    if main and not cfg.resume and (run_dir / checkpoint.MODEL_JSON).exists():
        problem = f"{run_dir} already holds a trained fold: pass --resume to continue it, or another --out"
    _raise_everywhere(accelerator, problem)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()

    set_seed(cfg.seed)  # same init on every rank; the streams seed per rank and worker themselves
    model = create_model(cfg.model, drop_rate=cfg.drop_rate, pretrained_file=cfg.pretrained or None, warn_random=main)
    mean, std = normalisation(model)
    channels_last = accelerator.device.type == "cuda"
    model = prepare_for_device(model, accelerator.device, cfg.compile)
    loss_fn = losses.make_loss(cfg.loss, counts, cfg.class_weights, cfg.gamma, cfg.label_smoothing).to(accelerator.device)

    train_tf = transforms.build_transform(cfg.augment, cfg.resize, cfg.crop)
    eval_tf = transforms.build_transform("none", cfg.resize, cfg.crop)
    train_data, train_steps = stream.train_loader(
        shard_set, folds=train_folds, batch_size=cfg.batch_size, rank=rank, world_size=world,
        workers=cfg.workers, seed=cfg.seed, alpha=cfg.alpha, transform=train_tf, shuffle_buffer=cfg.shuffle_buffer,
    )
    steps_per_epoch = min(cfg.max_steps, train_steps) if cfg.max_steps else train_steps
    val_loader = stream.eval_loader(shard_set, fold=cfg.fold, batch_size=cfg.batch_size, rank=rank, world_size=world,
                                    workers=cfg.workers, transform=eval_tf)

    global_batch = cfg.batch_size * world * cfg.grad_accum
    base_lr = scaled_lr(cfg.lr, global_batch, cfg.base_batch)
    optimizer = make_optimizer(cfg, model, base_lr)
    optimizer_steps_per_epoch = max(1, steps_per_epoch // cfg.grad_accum)
    schedule = WarmRestarts(base_lr, cfg.epochs, cfg.warmup_epochs, cfg.restart_epochs, cfg.restart_mult, cfg.min_lr)
    model, optimizer = accelerator.prepare(model, optimizer)

    start_epoch, best = 0, {"macro_f1": -1.0, "epoch": -1}
    if resumed is not None:
        accelerator.load_state(str(run_dir / STATE))
        start_epoch, best = resumed["epoch"] + 1, resumed["best"]
    if main:
        accelerator.init_trackers("tb")
        accelerator.print(
            f"fold {cfg.fold}: {world} process(es) on {accelerator.device}, {sum(counts)} training samples, "
            f"{steps_per_epoch} steps/epoch of {cfg.batch_size}x{world}, lr {base_lr:.4g}, epochs {start_epoch}..{cfg.epochs - 1}"
        )
    writer = accelerator.get_tracker("tensorboard", unwrap=True) if main else None

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        train_data.set_epoch(epoch)
        steps_done, seen, started = 0, 0, time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)  # a device tensor: no host sync per step
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=None if main else True, dynamic_ncols=True, leave=False)
        for step, batch in enumerate(train_data):
            if step >= steps_per_epoch:
                break
            global_step = epoch * steps_per_epoch + step  # the x axis of every TensorBoard tag
            if epoch == 0 and step == 0 and writer is not None:
                writer.add_image("train/augmented_batch", monitor.image_grid(batch["image"]), global_step, dataformats="HWC")
            optimizer_step = epoch * optimizer_steps_per_epoch + (step + 1) // cfg.grad_accum
            loss = train_step(accelerator, model, optimizer, loss_fn, batch, mean, std, channels_last,
                              schedule.lr(optimizer_step / optimizer_steps_per_epoch), cfg.clip_grad)
            seen += batch["image"].shape[0]
            loss_sum = loss_sum + loss
            steps_done += 1
            # Every rank reaches the same steps (equal step counts), so the reduce cannot hang.
            if (global_step + 1) % cfg.log_every == 0 or steps_done == steps_per_epoch:
                mean_loss = float(accelerator.reduce(loss_sum, "mean")) / steps_done
                if main:
                    rate = seen * world / max(time.perf_counter() - started, 1e-9)
                    accelerator.log(monitor.scalars({"train/loss": mean_loss, "train/lr": optimizer.param_groups[0]["lr"],
                                                     "train/images_per_s": rate}), step=global_step + 1)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{rate:.0f}")
            bar.update(1)
        bar.close()
        train_seconds = time.perf_counter() - started
        epoch_loss = float(accelerator.reduce(loss_sum, "mean")) / max(steps_done, 1)
        epoch_end_step = (epoch + 1) * steps_per_epoch

        predictions = evaluate(accelerator, accelerator.unwrap_model(model), val_loader, mean, std, channels_last)
        scores = metrics.score(predictions["label_true"], np.stack(predictions["probs"].to_numpy()).argmax(axis=1)) if len(predictions) else None
        if scores is None:
            raise MaskdistError(f"fold {cfg.fold} of {cfg.shards} has no validation samples: rebuild the shards with more people per fold")
        improved = scores.macro_f1 > best["macro_f1"]
        if main:
            rate = seen * world / max(train_seconds, 1e-9)
            accelerator.log(monitor.score_scalars(scores) | monitor.scalars({"train/epoch_loss": epoch_loss, "train/epoch_images_per_s": rate}),
                            step=epoch_end_step)
            writer.add_image("val/confusion", monitor.confusion_image(scores.confusion), epoch_end_step, dataformats="HWC")
            accelerator.print(
                f"epoch {epoch}: loss {epoch_loss:.4f}, {rate:.0f} img/s, val macro F1 {scores.macro_f1:.4f} "
                f"(mask {scores.part_f1['mask']:.3f}, gender {scores.part_f1['gender']:.3f}, age {scores.part_f1['age']:.3f})"
                + (" *best*" if improved else "")
            )
            if improved:
                best = {"macro_f1": scores.macro_f1, "epoch": epoch, "part_f1": scores.part_f1,
                        "per_class_f1": scores.per_class_f1, "accuracy": scores.accuracy, "samples": scores.samples}
                card = checkpoint.model_card(cfg.model, cfg.resize, cfg.crop, mean, std, shard_set.age_cut, cfg.fold, epoch, best, cfg.drop_rate)
                card["confusion"] = scores.confusion
                card["train_folds"] = train_folds
                checkpoint.save(run_dir, accelerator.unwrap_model(model), card)
                with atomic_path(run_dir / OOF) as tmp:
                    oof_frame(predictions, cfg.fold).to_csv(tmp, index=False, float_format="%.6g")
        best = parallel.gather_rows([best], accelerator)[0]  # every rank agrees on the best (rank 0's)
        _save_state(accelerator, run_dir, {"epoch": epoch, "best": best, "steps_per_epoch": steps_per_epoch})

    if main:
        # hparams beside the metrics they produced, in the run's own folder (accelerate's
        # init_trackers(config=...) writes them to a separate run without metrics).
        writer.add_hparams(monitor.hparams(cfg.to_dict()), {"hparams/best_macro_f1": best["macro_f1"], "hparams/best_epoch": best["epoch"]},
                           run_name=".")
        accelerator.print(f"fold {cfg.fold}: best macro F1 {best['macro_f1']:.4f} at epoch {best['epoch']}; run folder {run_dir}")
    accelerator.end_training()
    return best
