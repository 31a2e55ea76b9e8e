"""When a run saves its resumable state inside an epoch, and when it stops to be resumed.

Three things ask for a mid-epoch save: every ``checkpoint_every`` steps, every
``checkpoint_minutes`` of wall time, and a stop signal (``SIGTERM``, or ``SIGUSR1``, which
SLURM sends ahead of a preemption with ``--signal``). A signal asks for a save *and* a stop:
the trainer finishes its step, saves, and exits with :data:`PREEMPTED_EXIT`; ``--resume``
continues from the next batch.

Every rank must save and stop after the same step (saving runs collectives, and a rank that
stopped early would leave the others waiting in their next all-reduce). Step counts agree by
construction; a signal and the clock do not, since they reach each rank at a different moment.
So the ranks agree through a small all-reduce (MAX) of their flags on a separate gloo group,
started without waiting after each step and read after the next one: no rank waits for it and
no GPU work is synchronised, and every rank acts after the same step, one step after the
earliest flag. With one process the decision is immediate.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request, resumable; documented in docs/training.md
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run saved its state and stopped on a signal; exit with PREEMPTED_EXIT."""

    exit_code = PREEMPTED_EXIT


@dataclass(frozen=True)
class Decision:
    save: bool = False
    stop: bool = False
    signal_name: str = ""


class Preemption:
    """Signal handling and the agreed save/stop decision of one process (see the module docstring).

    ``world_size > 1`` needs an initialised default process group. Call :meth:`after_step`
    once after every training step on every rank, :meth:`at_epoch_end` at the end of each
    epoch, and :meth:`close` when training ends.
    """

    def __init__(self, world_size: int = 1, rank: int = 0, checkpoint_every: int = 0, checkpoint_minutes: float = 0.0,
                 install_handlers: bool = True):
        self.world_size, self.rank = int(world_size), int(rank)
        self.checkpoint_every, self.checkpoint_s = int(checkpoint_every), float(checkpoint_minutes) * 60.0
        self.signal_name = ""  # set by the handler: the first stop signal received
        self.last_save = time.monotonic()
        self._previous: dict[int, object] = {}
        self._group = None
        self._pending = None  # (work, flags tensor) of the last step's agreement
        if self.world_size > 1:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # CPU flags: no GPU synchronisation
        if install_handlers and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.signal_name:  # a second signal: the user insists, or the run is stuck; go now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal_name = signal.Signals(signum).name
        print(f"{self.signal_name} received: saving a resumable state after this step, then stopping"
              " (send it again to stop at once)", file=sys.stderr, flush=True)

    # --- decisions ------------------------------------------------------------------------

    def _local(self, step_done: int) -> tuple[int, int]:
        """This rank's (save, stop) wishes after ``step_done`` steps of the run."""
        stop = 1 if self.signal_name else 0
        save = stop
        if self.checkpoint_every and step_done % self.checkpoint_every == 0:
            save = 1
        # The clock is rank 0's alone: ranks would otherwise disagree on when time is up. It
        # restarts when it asks, since the save it asks for follows within a step.
        now = time.monotonic()
        if self.rank == 0 and self.checkpoint_s and now - self.last_save >= self.checkpoint_s:
            save, self.last_save = 1, now
        return save, stop

    def _post(self, flags: tuple[int, int]):
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(flags, dtype=torch.int64)
        return dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._group, async_op=True), tensor

    def after_step(self, step_done: int) -> Decision:
        """Whether to save (and stop) now, after ``step_done`` steps of the run (1-based count).

        With several processes the answer concerns the flags posted after the previous step,
        so all ranks act on the same step; step-count saves are exact on every rank anyway.
        """
        save, stop = self._local(step_done)
        if self._group is None:
            return Decision(bool(save), bool(stop), self.signal_name)
        agreed = (0, 0)
        if self._pending is not None:
            work, tensor = self._pending
            work.wait()
            agreed = tuple(int(v) for v in tensor.tolist())
        # Step-count saves need no agreement: every rank counts the same steps.
        count_save = bool(self.checkpoint_every and step_done % self.checkpoint_every == 0)
        clock_or_signal = (1 if (save and not count_save) or stop else 0, stop)
        self._pending = self._post(clock_or_signal)
        return Decision(count_save or bool(agreed[0]), bool(agreed[1]), self.signal_name or ("SIGNAL" if agreed[1] else ""))

    def at_epoch_end(self) -> Decision:
        """Whether any rank was asked to stop, agreed now (a blocking all-reduce)."""
        stop = 1 if self.signal_name else 0
        if self._group is None:
            return Decision(bool(stop), bool(stop), self.signal_name)
        if self._pending is not None:
            work, tensor = self._pending
            work.wait()
            stop = max(stop, int(tensor[1]))
            self._pending = None
        work, tensor = self._post((stop, stop))
        work.wait()
        stop = int(tensor[1])
        return Decision(bool(stop), bool(stop), self.signal_name or ("SIGNAL" if stop else ""))

    def saved(self) -> None:
        """Restart the clock of time-based saves (after any save)."""
        self.last_save = time.monotonic()

    def close(self, restore_handlers: bool = True) -> None:
        """Stop agreeing. ``restore_handlers=False`` (the run is ending on an error) keeps the
        handlers, so a SIGTERM arriving now (a launcher stopping the other ranks) does not
        kill the process before its one-line error is out."""
        if restore_handlers:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous.clear()
        if self._pending is not None:
            try:
                self._pending[0].wait()
            except Exception:  # noqa: BLE001 (a peer may be gone; nothing left to agree on)
                pass
            self._pending = None
