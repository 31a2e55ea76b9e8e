"""A full disk met first by a library's writer thread is told once: by the run's one-line
error, not also by the thread's own traceback.

TensorBoard's event writer writes from a thread of its own; when a write fails there, the
thread keeps the exception, raises it again in the main thread at the next write or flush
(where the run's disk-full handling makes it one line), and also lets it escape, so that
Python prints ``Exception in thread ...`` with a traceback first. The hook here keeps that
second telling quiet for a full disk in such a thread; every other thread error is printed
as before.
"""
from __future__ import annotations

import threading

from maskdist.system.fileio import is_disk_full

# Writer threads that hand their exception to the main thread (tensorboard.summary.writer.event_file_writer).
HANDING_ON = ("_AsyncWriterThread",)


def quiet_disk_full_in_writers() -> None:
    """Install the hook in this process (once)."""
    previous = threading.excepthook
    if getattr(previous, "maskdist_writers", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ in HANDING_ON and is_disk_full(args.exc_value):
            return  # the main thread raises it at its next write, as one line
        previous(args)

    hook.maskdist_writers = True
    threading.excepthook = hook
