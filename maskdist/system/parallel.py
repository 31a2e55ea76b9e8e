"""Worker processes that are safe to start from any process state, and that die with the
process they serve.

Pools and DataLoader workers start through ``forkserver`` (``spawn`` where that is missing),
never a plain ``fork``: a forked child inherits OpenCV's (and OpenMP's) thread pool in
whatever state the parent's threads left it, and its first ``cv2`` call can then wait
forever. Each worker uses one OpenCV and one torch thread: the workers are the parallelism.

A worker's parent is the forkserver, not the process that asked for it, and the forkserver
lives as long as any of its workers (they hold its "alive" pipe). So when the owner dies
without shutting them down (kill -9, the OOM killer, a crash, a plain SIGTERM) nothing else
ends them: every worker watches its owner (:func:`watch`, started by :func:`init_worker`)
and exits when the owner is gone; the forkserver and multiprocessing's resource tracker then
exit by themselves. Commands maskdist launches (``accelerate launch`` in ``kfold``) get
``SIGTERM`` when the launching process dies (:func:`die_with_parent`).
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
import warnings

WATCH_POLL_S = 0.5  # fallback polling interval where pidfd is missing


# What a loader worker imports. The forkserver imports it once, before any thread runs, and
# each worker forks from it ready: otherwise every worker of every loader (training, then
# validation each epoch) re-imports torch and the transforms, about 3 s of CPU each.
LOADER_MODULES = ("maskdist.streams", "maskdist.data.transforms")


def context(preload: tuple[str, ...] = LOADER_MODULES):
    """The multiprocessing context for every worker maskdist starts; a forkserver that
    starts now imports ``preload`` first (one forkserver per process: the first start wins)."""
    quiet_tracker_relaunch()
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *preload])
    return ctx


def start_forkserver(preload: tuple[str, ...] = LOADER_MODULES) -> None:
    """Start the forkserver now, so that it imports ``preload`` on another core while this
    process imports and builds the model, instead of when the first loader needs workers."""
    if context(preload).get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def quiet_tracker_relaunch() -> None:
    """When multiprocessing's resource tracker was killed (it is the smallest process of a
    run, but a ``kill`` of the process group or a careless ``pkill`` reaches it), multiprocessing
    starts a new one at the next queue or lock, and that one prints a ``KeyError`` traceback
    for every name the first one held as they are released: harmless, and alarming. This
    process says so in one line instead and gives the new tracker no stderr. Idempotent."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker, "_resource_tracker", None)
    if tracker is None or getattr(tracker.ensure_running, "quiet_relaunch", False) or not hasattr(tracker, "_check_alive"):
        return
    original = tracker.ensure_running

    def ensure_running():
        if tracker._fd is None or tracker._check_alive():
            return original()
        print("warning: multiprocessing's resource tracker was killed; a new one takes over (shared-memory names the"
              " first one held may be left in /dev/shm)", file=sys.stderr, flush=True)
        devnull = os.open(os.devnull, os.O_WRONLY)
        saved = os.dup(2)
        try:
            os.dup2(devnull, 2)  # the new tracker inherits this process's stderr: give it none
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # multiprocessing's own "relaunching" warning, said above
                return original()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)

    ensure_running.quiet_relaunch = True
    tracker.ensure_running = resource_tracker.ensure_running = ensure_running


SHUTDOWN_WAIT_S = 3.0


def shutdown() -> None:
    """Stop the forkserver, if this process started it, and wait (up to SHUTDOWN_WAIT_S) for
    it to end: a normal exit then leaves no process of its own behind (it would otherwise
    linger for a moment after the command returned). It ends when its last user closes its
    pipe: a worker still alive (an error path that left a loader open) keeps it up, and then
    it is left to end with that worker, which follows its owner out; this never blocks.
    multiprocessing's resource tracker is left alone: the interpreter's exit handlers still
    need it to release semaphores, and it ends a moment after this process, when it reads the
    end of its pipe (measured: about 10 ms on a busy machine)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    # multiprocessing keeps these private; their public stop methods wait without a limit
    if server is not None and _close_and_reap(server, "_forkserver_alive_fd", "_forkserver_pid"):
        address = getattr(server, "_forkserver_address", None)
        if address and not address.startswith("\0"):
            with contextlib.suppress(OSError):
                os.unlink(address)
        server._forkserver_address = None


def _close_and_reap(helper, fd_attr: str, pid_attr: str) -> bool:
    """Close ``helper``'s pipe to its process and reap that process if it ends in time."""
    fd, pid = getattr(helper, fd_attr, None), getattr(helper, pid_attr, None)
    if fd is None or pid is None:
        return False
    with contextlib.suppress(OSError):
        os.close(fd)
    setattr(helper, fd_attr, None)
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    while time.monotonic() < deadline:
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            setattr(helper, pid_attr, None)
            return True
        time.sleep(0.02)
    setattr(helper, pid_attr, None)  # not ours to wait for any longer
    return False


def _wait_for_exit(pid: int) -> None:
    """Return when process ``pid`` has ended."""
    try:
        fd = os.pidfd_open(pid)  # Linux 5.3+: readable when the process ends; immune to pid reuse
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(WATCH_POLL_S)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll():
            pass
    finally:
        os.close(fd)


def watch(pid: int, exit_code: int = 1, on_exit=None) -> threading.Thread:
    """End this process (``os._exit``) as soon as process ``pid`` ends; or, with ``on_exit``,
    call it instead (in the watching thread)."""

    def run():
        _wait_for_exit(pid)
        if on_exit is not None:
            on_exit()
        else:
            os._exit(exit_code)

    thread = threading.Thread(target=run, name=f"maskdist-watch-{pid}", daemon=True)
    thread.start()
    return thread


def init_worker(owner: int | None = None, *_args, loader: bool = False) -> None:
    """Worker start-up: one compute thread each; exit when ``owner`` (the process that started
    the pool or loader) dies. Ctrl-C and SLURM's early-warning SIGUSR1 are the owner's to
    handle. A stream loader's worker (``loader``) ignores SIGTERM as well: a SIGTERM sent to
    every process of a job is the trainer's cue to finish its step and save, which needs its
    workers until it has; the loader stops them itself (:func:`stop_workers`). Pool workers
    keep SIGTERM, which ``Pool.terminate`` sends.
    """
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if loader else signal.SIG_DFL)
    if owner:
        watch(owner)


def stop_workers(loader) -> None:
    """Shut down a torch DataLoader's workers: the polite way first (torch's own shutdown),
    then SIGKILL for any still alive, since stream workers ignore SIGTERM."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    workers = list(getattr(iterator, "_workers", []))
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)
    loader._iterator = None


def worker_init(owner: int | None = None, stream: bool = False):
    """A DataLoader ``worker_init_fn`` bound to this process (or ``owner``) as the owner;
    ``stream``: a stream loader's worker (ignores SIGTERM; see :func:`init_worker`)."""
    return functools.partial(init_worker, os.getpid() if owner is None else owner, loader=stream)


def pool(workers: int):
    """A process pool of ``workers`` whose processes end with this one."""
    return context(preload=()).Pool(workers, initializer=init_worker, initargs=(os.getpid(),))  # pool tasks need no torch


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when this process
    dies (Linux ``PR_SET_PDEATHSIG``; nothing elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def preexec():
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: act now
            os.kill(os.getpid(), sig)

    return preexec
