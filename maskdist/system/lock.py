"""One writer per folder: a lock file that names its holder, safe on shared filesystems.

The lock is ``FOLDER/.maskdist.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local
filesystems and on NFSv3+ and Lustre, where ``flock`` is emulated, local to one client, or
off unless the filesystem is mounted with it) and holding JSON: host, pid, the process's
start time, the command, a random token. The holder touches it every ``HEARTBEAT_S``
seconds. A lock is stale, and is taken over, when its holder is gone: on this host, its
pid no longer runs the process that took the lock; on another host, its heartbeat is older
than ``LEASE_S`` (clocks of the hosts are assumed to agree within a minute, as NTP keeps
them). A take-over goes through a second ``O_EXCL`` file, so two processes that both see a
stale lock cannot both take it.

Processes that belong to one holder (the ranks of a launch, or the folds of a ``kfold``)
do not take the lock again: the holder passes its token on (:data:`TOKENS_ENV` for child
processes; a broadcast between ranks), and :func:`check_free` accepts a lock whose token
is among those given.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from maskdist.errors import MaskdistError

LOCK_NAME = ".maskdist.lock"
HEARTBEAT_S = 30.0
LEASE_S = 120.0  # a holder on another host whose heartbeat is older than this is gone
TAKEOVER_LEASE_S = 30.0  # a take-over file left by a process that died during a take-over
TOKENS_ENV = "MASKDIST_LOCK_TOKENS"  # tokens of locks this process's parents hold (comma-separated)


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_started: float  # the process's start time, so a reused pid is not mistaken for the holder
    started: float
    command: str
    token: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} since {since} ({self.command[:160]})"


class LockHeld(MaskdistError):
    """Another live run holds the folder."""


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if it does not run."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return -1.0  # it runs, but we may not look at it: treat it as alive


def read_holder(path: Path) -> tuple[Holder | None, float]:
    """The lock file's holder (None while it is being written, or unreadable) and its mtime."""
    try:
        mtime = path.stat().st_mtime
        return Holder(**json.loads(path.read_text())), mtime
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError):
        return None, path.stat().st_mtime


def is_stale(holder: Holder | None, mtime: float, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if holder is None:  # half-written: its writer died within a moment of creating it, or is writing now
        return now - mtime > TAKEOVER_LEASE_S
    if holder.host == socket.gethostname():
        started = _process_started(holder.pid)
        return started is None or (started >= 0 and abs(started - holder.pid_started) > 1.0)
    return now - mtime > LEASE_S


def allowed_tokens() -> set[str]:
    return {t for t in os.environ.get(TOKENS_ENV, "").split(",") if t}


def check_free(folder: Path, allowed: set[str] | None = None) -> None:
    """Raise :class:`LockHeld` when a live process other than ours holds ``folder``."""
    path = Path(folder) / LOCK_NAME
    allowed = allowed_tokens() if allowed is None else allowed
    try:
        holder, mtime = read_holder(path)
    except FileNotFoundError:
        return
    if holder is not None and holder.token in allowed:
        return
    if not is_stale(holder, mtime):
        raise LockHeld(_held_message(folder, holder))


def _held_message(folder: Path, holder: Holder | None) -> str:
    who = holder.describe() if holder is not None else "a process that is writing its lock file now"
    return (f"{folder} is in use by {who}: wait for it to finish, or stop it; a lock whose holder died is taken over"
            f" by the next run (at once on the same host, after {LEASE_S:.0f} s without heartbeat from another host)")


class FolderLock:
    """The lock of one folder, held from :meth:`acquire` to :meth:`release` (or exit)."""

    def __init__(self, folder: str | os.PathLike, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.token = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: list[Path] = []

    def acquire(self, wait_s: float = 0.0, allowed: set[str] | None = None) -> FolderLock:
        """Take the lock, waiting up to ``wait_s`` seconds for a live holder to finish (a
        requeued job whose previous incarnation is still saving); raises :class:`LockHeld`.
        A lock held under one of the ``allowed`` tokens (our parent's) blocks nothing."""
        allowed = allowed_tokens() if allowed is None else allowed
        # the folders this lock creates (the fold's, and the experiment's when it is new), innermost first
        self._made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + max(0.0, float(wait_s))
        me = os.getpid()
        while True:
            holder = Holder(socket.gethostname(), me, _process_started(me) or 0.0, time.time(), self.command,
                            secrets.token_hex(8))
            if self._create(holder):
                self.token = holder.token
                self._thread = threading.Thread(target=self._heartbeat, name="maskdist-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            try:
                current, mtime = read_holder(self.path)
            except FileNotFoundError:
                continue  # released meanwhile: try again at once
            if current is not None and current.token in allowed:
                raise MaskdistError(f"{self.folder} is held by this run's parent ({current.describe()}): write into it"
                                    " through that run, not beside it")
            if is_stale(current, mtime):
                self._take_over(current)
                continue
            if time.monotonic() >= deadline:
                self._remove_made()
                raise LockHeld(_held_message(self.folder, current))
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def _create(self, holder: Holder) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(holder), handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _take_over(self, stale: Holder | None) -> None:
        """Remove a stale lock, unless another process is taking it over right now."""
        takeover = self.path.with_name(LOCK_NAME + ".takeover")
        try:
            fd = os.open(takeover, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - takeover.stat().st_mtime > TAKEOVER_LEASE_S:
                    takeover.unlink()  # its writer died during a take-over
            time.sleep(0.2)
            return
        os.close(fd)
        try:
            current, _mtime = read_holder(self.path)
            if current == stale:  # still the stale one (not a fresh lock taken meanwhile)
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            takeover.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a full or flaky disk must not kill the run from here
                os.utime(self.path)

    def release(self) -> None:
        """Give the lock up (only if it is still ours)."""
        self._stop.set()
        if not self.token:
            return
        with contextlib.suppress(FileNotFoundError, OSError):
            holder, _ = read_holder(self.path)
            if holder is not None and holder.token == self.token:
                self.path.unlink()
        self._remove_made()  # a run refused before it wrote anything leaves no empty folder behind
        self.token = ""

    def _remove_made(self) -> None:
        """The folders this lock created, where they are still empty."""
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty (the run wrote into it): it stays, and so do the folders above it

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def child_env(env: dict, *locks: FolderLock) -> dict:
    """``env`` for a child process that works under ``locks`` (kfold's folds, its predict)."""
    tokens = allowed_tokens() | {lock.token for lock in locks if lock.token}
    return dict(env, **{TOKENS_ENV: ",".join(sorted(tokens))})
