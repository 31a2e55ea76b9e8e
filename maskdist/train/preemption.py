"""When a run saves its resumable state inside an epoch, and when it stops to be resumed.

Three things ask for a mid-epoch save: every ``checkpoint_every`` steps, every
``checkpoint_minutes`` of wall time, and a stop signal (``SIGTERM``, or ``SIGUSR1``, which
SLURM sends ahead of a preemption with ``--signal``). A signal asks for a save *and* a stop:
the trainer finishes its step, saves, and exits with :data:`PREEMPTED_EXIT`; ``--resume``
continues from the next batch. Ctrl-C (``SIGINT``) is a stop signal too; pressed again, it
stops the run at once.

Every rank must save and stop after the same step (saving runs collectives, and a rank that
stopped early would leave the others waiting in their next all-reduce). Step counts agree by
construction; a signal and the clock do not, since they reach each rank at a different moment.
So the ranks agree through a small all-reduce (MAX) of their flags on a separate gloo group,
started without waiting after each step and read after the next one: no rank waits for it and
no GPU work is synchronised, and every rank acts after the same step, one step after the
earliest flag. With one process the decision is immediate.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request, resumable; documented in docs/training.md
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Signals this soon after the first are the same request delivered twice (the scheduler
# signals every process of a job and the launcher forwards its own copy); a later one means
# "stop now". Ctrl-C reaches a rank from the terminal and, within milliseconds, again from
# the launcher; a person's second press comes later.
REPEAT_GRACE_S = 10.0
REPEAT_GRACE_SIGINT_S = 1.0


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
                 install_handlers: bool = True, timeout_s: float = 1800.0):
        self.world_size, self.rank = int(world_size), int(rank)
        self.checkpoint_every, self.checkpoint_s = int(checkpoint_every), float(checkpoint_minutes) * 60.0
        self.signal_name = ""  # set by the handler (the first stop signal received) or by request()
        self._asked_at = 0.0
        self.last_save = time.monotonic()
        self._previous: dict[int, object] = {}
        self._group = None
        self._pending = None  # (work, flags tensor) of the last step's agreement
        if self.world_size > 1:
            import datetime

            import torch.distributed as dist

            # CPU flags (no GPU synchronisation), under the run's collective timeout
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        if install_handlers and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.signal_name:
            grace = REPEAT_GRACE_SIGINT_S if signum == signal.SIGINT else REPEAT_GRACE_S
            if time.monotonic() - self._asked_at < grace:
                return  # the same request, delivered twice
            signal.signal(signum, signal.SIG_DFL)  # the user insists, or the run is stuck: go now
            os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        self.request(name, "Ctrl-C (SIGINT) received" if signum == signal.SIGINT else f"{name} received")

    def request(self, name: str, why: str) -> None:
        """Ask for a save and a stop after the current step (a signal, or the launcher's death)."""
        if self.signal_name:
            return
        self.signal_name, self._asked_at = name, time.monotonic()
        again = "Ctrl-C again stops at once" if name == "SIGINT" else \
            f"the same signal again more than {REPEAT_GRACE_S:.0f} s later stops at once"
        print(f"{why}: saving a resumable state after this step, then stopping ({again})", file=sys.stderr, flush=True)

    # --- decisions ------------------------------------------------------------------------

    def _count_save(self, step_done: int) -> bool:
        """A step-count save: every rank counts the same steps, so it needs no agreement."""
        return bool(self.checkpoint_every and step_done % self.checkpoint_every == 0)

    def _clock_save(self) -> bool:
        """The clock is rank 0's alone: ranks would otherwise disagree on when time is up. It
        restarts when it asks, since the save it asks for follows within a step or two."""
        now = time.monotonic()
        if self.rank == 0 and self.checkpoint_s and now - self.last_save >= self.checkpoint_s:
            self.last_save = now
            return True
        return False

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
        stop = 1 if self.signal_name else 0
        count_save, clock_save = self._count_save(step_done), self._clock_save()
        if self._group is None:
            return Decision(bool(count_save or clock_save or stop), bool(stop), self.signal_name)
        agreed = (0, 0)
        if self._pending is not None:
            work, tensor = self._pending
            work.wait()
            agreed = tuple(int(v) for v in tensor.tolist())
        self._pending = self._post((1 if clock_save or stop else 0, stop))
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
            with contextlib.suppress(Exception):  # a peer may be gone; nothing left to agree on
                self._pending[0].wait()
            self._pending = None
