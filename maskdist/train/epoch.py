"""One training epoch from a given step to its end: steps, logging windows, and the mid-epoch
saves and stops that :mod:`maskdist.train.preemption` asks for.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from tqdm.auto import tqdm

from maskdist.system.worker_death import WorkerDied
from maskdist.train import monitor
from maskdist.train.meters import MEMORY_EVERY_S, EpochTally, PendingFigures, WindowMeter, fold_window, memory_scalars, settle
from maskdist.train.preemption import Decision, Preempted, Preemption
from maskdist.train.resume import stop_after_failure
from maskdist.train.run import Run
from maskdist.train.step import NonFiniteLoss, train_step


def train_epoch(run: Run, epoch: int, tally: EpochTally, first_step: int = 0, preemption: Preemption | None = None,
                save: Callable[..., None] | None = None) -> EpochTally:
    """Train ``epoch`` from step ``first_step`` to its end, measuring the loop as it goes.

    Logs every ``log_every`` steps (loss, lr, images/s, the data-wait share, step time,
    gradient norm, memory); ``save(epoch, step, why)`` is called when ``preemption`` asks for
    a mid-epoch save; raises Preempted after the save when it asks to stop. A dead loader
    worker (WorkerDied) or a non-finite loss (NonFiniteLoss) stops the epoch before the step
    it would spoil, saving the steps done before it where it can (:func:`stop_after_failure`).
    """
    cfg, accelerator, steps = run.cfg, run.accelerator, run.steps_per_epoch
    run.model.train()
    run.train_data.set_epoch(epoch, first_step)
    window = WindowMeter(accelerator.device)
    bar = tqdm(total=steps, initial=first_step, desc=f"epoch {epoch}", disable=None if run.main else True,
               dynamic_ncols=True, leave=False)
    log = _WindowLog(run, tally, bar)
    batches = iter(run.train_data)
    step, wanted = first_step, None  # wanted: a save (or stop) decided, waiting for its step

    def save_here(why: str, announce: bool = True) -> None:
        nonlocal window
        if window.steps:  # the open window goes into the tally the state keeps
            settle(fold_window(window, tally, accelerator), tally)
            window = WindowMeter(accelerator.device)
        log.flush()  # the tally the state keeps is complete
        save(epoch, step, why, announce)

    try:
        while step < steps:
            waited = time.perf_counter()
            try:
                batch = next(batches)
            except WorkerDied as died:  # only this rank knows: the others are in their next step
                raise died.then(stop_after_failure(run, epoch, step, save_here, "worker died", alone=True)) from None
            wait_s = time.perf_counter() - waited
            global_step = epoch * steps + step  # the x axis of every TensorBoard tag
            if epoch == 0 and step == 0 and run.writer is not None:
                run.writer.add_image("train/augmented_batch", monitor.image_grid(batch["image"]), global_step, dataformats="HWC")
            if run.batch_log is not None:
                run.batch_log.write(f"{epoch} {step} {' '.join(batch['key'])}\n")
            try:
                loss, grad_norm = train_step(accelerator, run.model, run.optimizer, run.loss_fn, batch, run.mean, run.std,
                                             run.channels_last, run.lr(epoch, step), cfg.clip_grad, run.mixer, run.ema,
                                             run.optimizer_step(epoch, step))
            except NonFiniteLoss as err:  # every rank agreed on it: they save together
                saved = stop_after_failure(run, epoch, step, save_here, "non-finite loss")
                raise NonFiniteLoss(f"{err} at epoch {epoch} step {step}: the run diverged (lower --lr, raise --warmup-epochs or"
                                    " --clip-grad, train in --precision bf16 or no rather than fp16, check the"
                                    f" --pretrained weights); {saved}") from None
            window.add(loss, grad_norm, batch["image"].shape[0], wait_s)
            step += 1
            # Every rank reaches the same steps (equal step counts), so the reduce cannot hang.
            if (global_step + 1) % cfg.log_every == 0 or step == steps:
                log.add(fold_window(window, tally, accelerator), global_step + 1)
                window = WindowMeter(accelerator.device)
            bar.update(1)
            if preemption is not None:
                wanted = _merge(wanted, preemption.after_step(global_step + 1))
            # A save waits for the end of an accumulation window: the state holds no gradients.
            # (Every rank counts the same steps, so every rank acts on the same one.)
            if wanted is not None and step % cfg.grad_accum == 0:
                save_here(f"on {wanted.signal_name}" if wanted.stop else "periodic")
                if wanted.stop:
                    raise Preempted(f"stopped on {wanted.signal_name} at epoch {epoch} step {step} with its state saved:"
                                    " `--resume` continues from the next batch")
                wanted = None
        log.flush()
    finally:
        bar.close()
    return tally


class _WindowLog:
    """Logs each window's figures once they have arrived: at once on a CPU, one window later
    on CUDA (see :meth:`WindowMeter.start_reduce`), and all of them at :meth:`flush`."""

    def __init__(self, run: Run, tally: EpochTally, bar):
        self.run, self.tally, self.bar = run, tally, bar
        self.pending: list[tuple[PendingFigures, int, float, dict]] = []
        self.memory_read = -float("inf")

    def add(self, pending: PendingFigures, step: int) -> None:
        run = self.run
        memory = {}
        if run.main and run.writer is not None and time.monotonic() - self.memory_read >= MEMORY_EVERY_S:
            memory, self.memory_read = memory_scalars(run.accelerator.device, run.train_data), time.monotonic()
        self.pending.append((pending, step, run.optimizer.param_groups[0]["lr"], memory))
        while len(self.pending) > 1 or (self.pending and self.pending[0][0].event is None):
            self._write(*self.pending.pop(0))

    def flush(self) -> None:
        while self.pending:
            self._write(*self.pending.pop(0))

    def _write(self, pending: PendingFigures, step: int, lr: float, memory: dict) -> None:
        run, figures = self.run, settle(pending, self.tally)
        if run.main and run.writer is not None:
            run.accelerator.log(monitor.scalars({
                "train/loss": figures["loss"], "train/lr": lr, "train/images_per_s": figures["images_per_s"],
                "train/images_per_s_per_process": figures["images_per_s_per_process"],
                "train/data_wait_frac": figures["data_wait_frac"], "train/step_s": figures["step_s"],
                "train/grad_norm": figures["grad_norm"],
            } | memory), step=step)
        if run.main:
            self.bar.set_postfix(loss=f"{figures['loss']:.3f}", img_s=f"{figures['images_per_s']:.0f}",
                                 wait=f"{100 * figures['data_wait_frac']:.0f}%")


def _merge(wanted: Decision | None, decision: Decision) -> Decision | None:
    if not (decision.save or decision.stop):
        return wanted
    if wanted is None:
        return decision
    return Decision(True, wanted.stop or decision.stop, wanted.signal_name or decision.signal_name)
