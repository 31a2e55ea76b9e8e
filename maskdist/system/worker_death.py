"""A loader worker that dies from outside (the kernel's OOM killer, a bus error on a full
``/dev/shm``, a ``kill``) becomes one :class:`WorkerDied` error naming the loader, the pid
and the signal, instead of whatever the torch DataLoader happened to be doing when its peer
vanished (``EOFError``, which click reports as "Aborted!"; ``ConnectionRefusedError`` from
multiprocessing's resource sharer; "DataLoader worker (pid N) exited unexpectedly").

The exit status is :data:`WORKER_DIED_EXIT` (71, ``EX_OSERR`` of sysexits.h, "an operating
system error"): not 1 (a crash), 2 (a user's mistake) or 75 (preempted: resume as is), so a
scheduler can tell "the machine took a process away: resume with fewer workers or smaller
batches" from the others. It is not 128+9 either, which would say the command itself was
killed.
"""
from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator

from maskdist.errors import MaskdistError

WORKER_DIED_EXIT = 71  # EX_OSERR; documented in docs/troubleshooting.md
DEATH_WAIT_S = 2.0  # how long a failed read waits for a dying worker's exit status to arrive

_CAUSES = {
    signal.SIGKILL: "usually the kernel's out-of-memory killer: check `dmesg`, and lower --workers (each holds its"
                    " prefetched batches), --val-workers or --batch-size",
    signal.SIGBUS: "usually /dev/shm is full: give the container more shared memory (--shm-size) or lower --workers"
                   " or --batch-size",
}


class WorkerDied(MaskdistError):
    """A worker of ``loader`` (``training``, ``validation``, ``prediction``) ended mid-pass."""

    exit_code = WORKER_DIED_EXIT

    def __init__(self, loader: str, pid: int, exitcode: int | None, then: str = ""):
        self.loader, self.pid, self.exitcode = loader, pid, exitcode
        super().__init__(self.describe() + (f"; {then}" if then else ""))

    @property
    def how(self) -> str:
        if self.exitcode is not None and self.exitcode < 0:
            try:
                return f"was killed by {signal.Signals(-self.exitcode).name}"
            except ValueError:
                return f"was killed by signal {-self.exitcode}"
        return f"exited with status {self.exitcode}" if self.exitcode is not None else "ended"

    def describe(self) -> str:
        cause = _CAUSES.get(-(self.exitcode or 0), "")
        return f"a worker of the {self.loader} loader (pid {self.pid}) {self.how}" + (f", {cause}" if cause else "")

    def then(self, what: str) -> WorkerDied:
        """The same death, with what was done about it (saved, nothing written, how to go on)."""
        return WorkerDied(self.loader, self.pid, self.exitcode, what)


def dead_worker(iterator) -> tuple[int, int | None] | None:
    """(pid, exit code) of a worker of a torch DataLoader's ``iterator`` that has ended, waiting
    up to DEATH_WAIT_S for the exit status of a worker that is dying; None when all are alive."""
    from multiprocessing.connection import wait

    workers = list(getattr(iterator, "_workers", []))
    if not workers:
        return None
    ended = wait([w.sentinel for w in workers], timeout=DEATH_WAIT_S)
    for worker in workers:
        if worker.sentinel in ended:
            worker.join(timeout=DEATH_WAIT_S)  # reads the exit status the forkserver sent
            return worker.pid, worker.exitcode
    return None


def guarded(loader: Iterable, name: str) -> Iterator:
    """Iterate a torch DataLoader; any failure while one of its workers has died becomes
    :class:`WorkerDied` (other failures pass through unchanged)."""
    try:
        iterator = iter(loader)  # a persistent loader's next epoch starts here, asking its workers
    except Exception:
        _raise_if_dead(getattr(loader, "_iterator", None), name)
        raise
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except WorkerDied:
            raise
        except Exception:  # EOFError, ConnectionError, torch's RuntimeError, ...
            _raise_if_dead(iterator, name)  # (a loader without persistent workers holds none itself)
            raise
        yield batch


def _raise_if_dead(iterator, name: str) -> None:
    dead = dead_worker(iterator)
    if dead is not None:
        raise WorkerDied(name, *dead) from None
