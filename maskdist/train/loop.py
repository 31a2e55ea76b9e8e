"""The training loop: one fold, any number of processes, under ``accelerate launch``.

Top to bottom: set up Accelerate and the run folder; read the shard manifest; build the
class-balanced training stream and the held-out fold's evaluation stream (not passed
through ``accelerator.prepare``: they split work by rank themselves); model, loss and
optimiser; per epoch, train with accumulation and clipping under the per-step lr schedule,
evaluate exactly once per sample (gathered by key), keep the best model by macro F1 on the
true labels, and save the resumable state. TensorBoard and the console show progress, the
loop's own speed (data-wait share, step time, images/s) and memory.

Before anything is built, the fold folder decides what the run does
(:mod:`maskdist.train.folder`: one writer per folder, start / resume / nothing to do /
refuse, the experiment's plan). The resumable state (``state/``) is saved at every epoch end and, inside an epoch, every
``--checkpoint-every`` steps, every ``--checkpoint-minutes`` and on SIGTERM/SIGUSR1
(:mod:`maskdist.train.preemption`). It holds the model, optimiser, grad scaler, every process's
RNG states and where the run stands (epoch, step, best, the epoch's running figures); the
streams regenerate every batch from (seed, rank, worker, epoch), so ``--resume`` continues
at the next batch: the batches, and on CPU the weights, are those of an uninterrupted run.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import sys
import threading
from pathlib import Path

import torch

from maskdist import config as config_mod
from maskdist.errors import MaskdistError, plural
from maskdist.system import distributed, parallel, writer_threads
from maskdist.system.fileio import disk_full, is_disk_full
from maskdist.system.worker_death import WorkerDied
from maskdist.train import checkpoint, monitor, trackers
from maskdist.train.checkpoint import TENSORBOARD, TRAINER_STATE
from maskdist.train.epoch import train_epoch
from maskdist.train.epoch_end import data_summary, finish_epoch
from maskdist.train.folder import FoldFolder
from maskdist.train.full import describe_source, finish_full_epoch, resolve_epochs
from maskdist.train.meters import EpochTally
from maskdist.train.preemption import Preempted, Preemption
from maskdist.train.resume import stop_after_failure
from maskdist.train.run import make_accelerator, open_batch_log, setup
from maskdist.train.state import checksum, epoch_done, load_ema, save_state
from maskdist.train.validation import nonfinite_stop

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

    Raises :class:`~maskdist.train.preemption.Preempted` after saving when a stop signal
    arrives, and MaskdistError (one line) when another process of the run is lost, when the
    disk fills up (the last saved state stays loadable) or when the fold folder refuses the run.
    """
    try:
        return _train(cfg)
    except MaskdistError:
        raise
    except Exception as err:
        if is_disk_full(err):
            where = getattr(err, "filename", None) or cfg.run_dir()
            raise disk_full(where, what="the last saved state stays loadable; after freeing space, --resume continues"
                            " from it") from err
        if isinstance(err, torch.distributed.DistError | RuntimeError) and _is_collective_failure(err):
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise MaskdistError(f"lost contact with another process of the run ({first}): it stopped or died;"
                                " `--resume` continues from the last saved state") from err
        raise


# What a collective says when a peer is gone (gloo and NCCL, through DistError or RuntimeError).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted")


def _is_collective_failure(err: BaseException) -> bool:
    return isinstance(err, (torch.distributed.DistNetworkError, torch.distributed.DistBackendError)) \
        or any(s in str(err) for s in _PEER_LOST)


def _train(cfg: config_mod.TrainConfig) -> dict:
    writer_threads.quiet_disk_full_in_writers()  # a full disk is told once, by train()'s one line
    cfg, epochs_source = resolve_epochs(cfg)  # --epochs-from: the folds' choice
    tracker_names = trackers.parse(cfg.log_with)  # on every rank, before any of them waits for another
    run_dir = cfg.run_dir()
    accelerator = make_accelerator(cfg, log_dir=run_dir)
    if epochs_source and accelerator.is_main_process:
        accelerator.print(describe_source(epochs_source))
    with FoldFolder(cfg, accelerator).held() as folder:
        start = folder.start()
        if start.message and accelerator.is_main_process:
            accelerator.print(start.message)
        if start.nothing_to_do:
            return start.best or {}
        return _train_in(cfg, accelerator, folder, start, epochs_source, tracker_names)


def lr_text(cfg: config_mod.TrainConfig, world: int, base_lr: float) -> str:
    """The lr a run trains with, and how it came from the plan's when scaled to the global batch."""
    batch = cfg.batch_size * world * cfg.grad_accum
    if batch == cfg.base_batch:
        return f"{base_lr:.4g}"
    return f"{base_lr:.4g} (--lr {cfg.lr:.4g} scaled to the global batch {batch} from --base-batch {cfg.base_batch})"


def _resume_point(run, trainer: dict) -> tuple[int, int, EpochTally]:
    """(epoch, step, the epoch's tally so far) that a resumed run starts from."""
    accelerator, steps = run.accelerator, run.steps_per_epoch
    world, rank = accelerator.num_processes, accelerator.process_index
    if epoch_done(trainer):
        return trainer["epoch"] + 1, 0, EpochTally()
    if (trainer.get("steps_per_epoch"), trainer.get("world_size")) == (steps, world):
        epoch = trainer["epoch"]
        run.train_data.resume_skipped(epoch, trainer.get("epoch_skipped", [{}] * world)[rank])
        return epoch, int(trainer["step"]), EpochTally(**trainer["tallies"][rank])
    # the batches of that epoch cannot be mapped onto another split: redo it
    if run.main:
        accelerator.print(f"warning: the state was saved inside epoch {trainer['epoch']} with {trainer.get('world_size')}"
                          f" process(es) and {trainer.get('steps_per_epoch')} steps per epoch; this run has {world}"
                          f" and {steps}, so epoch {trainer['epoch']} starts again from its first step")
    return trainer["epoch"], 0, EpochTally()


def _train_in(cfg: config_mod.TrainConfig, accelerator, folder: FoldFolder, start, epochs_source: dict | None = None,
              tracker_names: list[str] | None = None) -> dict:
    run_dir = cfg.run_dir()
    run = setup(cfg, accelerator=accelerator)
    main = run.main
    rank, world, steps = accelerator.process_index, accelerator.num_processes, run.steps_per_epoch
    try:
        folder.begin(start)  # the run has its data and model: only now does it write into the experiment
        start_epoch, start_step, best = 0, 0, {"macro_f1": -1.0, "epoch": -1}
        tally, skipped_history, resumed = EpochTally(), {}, None
        if start.state_dir is not None:
            accelerator.load_state(start.state_dir)
            load_ema(run, Path(start.state_dir))
            resumed = json.loads((Path(start.state_dir) / TRAINER_STATE).read_text())
            best, skipped_history = resumed["best"], resumed.get("skipped", {})
            start_epoch, start_step, tally = _resume_point(run, resumed)
        others = []  # the trackers beside TensorBoard (main process)
        if main:
            # purge_step: TensorBoard drops what an interrupted run logged after its last save,
            # so no step is shown twice.
            purge = {"tensorboard": {"purge_step": start_epoch * steps + start_step + 1}} if resumed is not None else {}
            accelerator.init_trackers(TENSORBOARD, init_kwargs=purge)
            run.writer = accelerator.get_tracker("tensorboard", unwrap=True)
            others = trackers.start(accelerator, tracker_names or [], Path(cfg.out).name, run_dir.name, run_dir,
                                    monitor.hparams(cfg.to_dict()))
            accelerator.print(
                f"fold {cfg.fold}: {world} process(es) on {accelerator.device}, {sum(run.counts)} training samples, "
                f"{steps} steps/epoch of {cfg.batch_size}x{world}, lr {lr_text(cfg, world, run.base_lr)}, "
                + (f"resuming at epoch {start_epoch} step {start_step}, " if resumed is not None else "")
                + f"epochs {start_epoch}..{cfg.epochs - 1}"
            )
        run.batch_log = open_batch_log(run_dir, rank) if cfg.log_batches else None
        preemption = Preemption(world, rank, cfg.checkpoint_every, cfg.checkpoint_minutes,
                                timeout_s=distributed.collective_timeout(cfg.timeout_s))
        _follow_launcher(preemption)
    except BaseException:
        run.close()
        raise
    last_save = {"bytes": 0}

    def trainer_state(epoch: int, step: int, epoch_done: bool) -> dict:
        # Each rank's running figures of the epoch (a collective: every rank saves together).
        tallies = distributed.gather_rows([tally.to_dict()], accelerator)
        state = {"epoch": epoch, "step": step, "epoch_done": epoch_done, "steps_per_epoch": steps,
                 "world_size": world, "best": best, "tallies": tallies, "skipped": skipped_history}
        if not epoch_done:  # the shards each rank skipped so far in this epoch stay skipped after a resume
            state["epoch_skipped"] = distributed.gather_rows([dict(run.train_data.skipped)], accelerator)
        # One sum per rank: the weights and, at an epoch's end, the BatchNorm statistics must be
        # the same on every rank.
        state["live_checksums"] = distributed.gather_rows([checksum(run.module)], accelerator)
        if run.ema is not None:
            state["ema_checksums"] = distributed.gather_rows([checksum(run.ema.module)], accelerator)
        return state

    def save(epoch: int, step: int, done: bool) -> float:
        seconds, size = save_state(accelerator, run_dir, trainer_state(epoch, step, done), run.ema,
                                   expected_bytes=last_save["bytes"])
        last_save["bytes"] = size
        preemption.saved()
        return seconds

    def save_mid_epoch(epoch: int, step: int, why: str, announce: bool = True) -> None:
        seconds = save(epoch, step, False)
        if main and announce:
            accelerator.log({"checkpoint/save_s": seconds}, step=epoch * steps + step)
            accelerator.print(f"saved a resumable state at epoch {epoch} step {step} ({why}) in {seconds:.2f} s")

    try:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                tally = EpochTally()
            train_epoch(run, epoch, tally, first, preemption, save_mid_epoch)
            if cfg.full_data:
                best = finish_full_epoch(run, epoch, tally, skipped_history, epochs_source)
            else:
                before = copy.deepcopy(skipped_history)
                try:
                    best = finish_epoch(run, epoch, tally, best, skipped_history)
                except WorkerDied as died:  # a validation worker: the epoch's steps are all done
                    skipped_history.clear()  # the resumed epoch end counts its skipped shards again
                    skipped_history.update(before)
                    raise died.then(stop_after_failure(
                        run, epoch, steps, functools.partial(save_mid_epoch, epoch, steps),
                        "worker died", alone=True)) from None
            tally = EpochTally()
            save(epoch, steps, True)
            decision = preemption.at_epoch_end()
            if decision.stop and epoch < cfg.epochs - 1:
                raise Preempted(f"stopped on {decision.signal_name} after epoch {epoch} with its state saved:"
                                " `--resume` continues with the next epoch")
        if not cfg.full_data and best["epoch"] < 0:  # no epoch gave finite validation logits
            raise MaskdistError(nonfinite_stop(cfg.fold))
    finally:
        preemption.close(restore_handlers=sys.exc_info()[0] is None)
        run.close()

    if main:
        checkpoint.update_card(run_dir, {"data": data_summary(skipped_history), "finished": True})
        # hparams beside the metrics they produced, in the run's own folder (accelerate's
        # init_trackers(config=...) writes them to a separate run without metrics).
        final = {"hparams/epochs": cfg.epochs} if cfg.full_data else {"hparams/best_macro_f1": best["macro_f1"],
                                                                        "hparams/best_epoch": best["epoch"]}
        trackers.log(others, final, cfg.epochs * steps)
        run.writer.add_hparams(monitor.hparams(cfg.to_dict()), final, run_name=".")
        if cfg.full_data:
            accelerator.print(f"full-data model: {plural(cfg.epochs, 'epoch')} on every fold, {best['weights']} weights of the last;"
                              f" run folder {run_dir}")
        else:
            accelerator.print(f"fold {cfg.fold}: best macro F1 {best['macro_f1']:.4f} at epoch {best['epoch']}; run folder {run_dir}")
    accelerator.end_training()
    return best
