"""The process table, read from /proc: a process's descendants and whether they are gone.

A pid is identified with its start time (field 22 of /proc/PID/stat), so a pid reused by an
unrelated process is not mistaken for a survivor; a zombie counts as gone (it has exited).
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces
    return [str(pid), text[text.index("(") + 1:text.rindex(")")]] + text[text.rindex(")") + 2:].split()


def identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time), or None if the process does not exist."""
    fields = _stat(pid)
    return (pid, fields[21]) if fields else None


def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                out.setdefault(int(fields[3]), []).append(int(entry))
    return out


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every process below ``pid`` (children, their children, ...), as identities."""
    tree = children_map()
    found, todo = [], list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        ident = identity(child)
        if ident:
            found.append(ident)
        todo += tree.get(child, [])
    return found


def running(ident: tuple[int, str]) -> bool:
    """The same process (pid and start time) exists and has not exited (not a zombie)."""
    fields = _stat(ident[0])
    return bool(fields) and fields[21] == ident[1] and fields[2] not in ("Z", "X")


def wait_gone(idents: list[tuple[int, str]], timeout: float) -> list[tuple[int, str]]:
    """Wait until none of ``idents`` runs; returns those still running after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = [i for i in idents if running(i)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def wait_for(predicate, timeout: float, every: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout``. Often: a tiny model's steps take tens of
    milliseconds, and a test that signals "after the Nth batch" must see it before the last."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def describe(idents: list[tuple[int, str]]) -> str:
    out = []
    for pid, _start in idents:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            out.append(f"{pid}: {command[:150]}")
        except OSError:
            out.append(f"{pid}: ?")
    return "; ".join(out)


def signal_frozen(pid: int, sig: int) -> None:
    """Freeze process ``pid`` (SIGSTOP), send it ``sig``, and let it go on: it handles the
    signal at the very point it was frozen, however loaded the machine is (a signal sent
    while it runs may land a few steps later, or after a short run has already ended)."""
    import os
    import signal as signals

    os.kill(pid, signals.SIGSTOP)
    try:
        os.kill(pid, sig)
    finally:
        os.kill(pid, signals.SIGCONT)
