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
(:mod:`maskdist.train.preemption`). It holds the model, optimiser, grad scaler, every process's
RNG states and where the run stands (epoch, step, best, the epoch's running figures); the
streams regenerate every batch from (seed, rank, worker, epoch), so ``--resume`` continues
at the next batch: the batches, and on CPU the weights, are those of an uninterrupted run.
"""
from __future__ import annotations

import os
import sys
import threading

import torch
from accelerate import Accelerator

from maskdist import config as config_mod
from maskdist.errors import MaskdistError
from maskdist.system import distributed, parallel
from maskdist.system.fileio import atomic_path, recover_dir
from maskdist.train import checkpoint, monitor
from maskdist.train.checkpoint import CONFIG, MODEL_JSON, OOF, STATE, TENSORBOARD
from maskdist.train.epoch import train_epoch
from maskdist.train.meters import EpochTally, mean_over_ranks
from maskdist.train.preemption import Preempted, Preemption
from maskdist.train.run import open_batch_log, setup
from maskdist.train.state import checksum, epoch_done, load_ema, load_trainer_state, save_state
from maskdist.train.validation import oof_frame, sync_ema_buffers, validate

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


def train(cfg: config_mod.TrainConfig) -> dict:
    """Train one fold; returns the best epoch's metrics (on every process).

    Raises :class:`~maskdist.train.preemption.Preempted` after saving when a stop signal arrives,
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
        resumed = load_trainer_state(run_dir) if cfg.resume else None
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
            load_ema(run, run_dir / STATE)
            best, skipped_history = resumed["best"], resumed.get("skipped", {})
            if epoch_done(resumed):
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
        run.batch_log = open_batch_log(run_dir, rank) if cfg.log_batches else None
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
            state["ema_checksums"] = distributed.gather_rows([checksum(run.ema.module)], accelerator)
        return state

    def save_mid_epoch(epoch: int, step: int, why: str) -> None:
        seconds = save_state(accelerator, run_dir, trainer_state(epoch, step, False), run.ema)
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
            epoch_loss = mean_over_ranks(accelerator, tally.loss_sum / max(tally.steps, 1))
            epoch_wait = mean_over_ranks(accelerator, tally.wait_s / max(tally.busy_s, 1e-9))
            rate = mean_over_ranks(accelerator, tally.images / max(tally.busy_s, 1e-9)) * world
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
            save_state(accelerator, run_dir, trainer_state(epoch, steps, True), run.ema)
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
