"""Atomic writes: a file is written under a temporary name beside its target, flushed to
disk, then renamed over the target, so a kill mid-write leaves the previous file (or none),
never a half-written one that looks complete."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def replace_dir(tmp: Path, target: Path) -> None:
    """Swap a completed folder ``tmp`` in for ``target`` (which may exist).

    The old folder is first renamed aside (``<target>.old``) and removed only after the new
    one is in place, so a kill between the two renames leaves a complete old copy that
    :func:`recover_dir` restores.
    """
    old = aside(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def aside(target: Path) -> Path:
    """Where :func:`replace_dir` keeps the previous copy of ``target`` while it swaps."""
    return target.with_name(target.name + ".old")


def dir_exists(target: Path) -> bool:
    """``target`` exists, or a copy :func:`recover_dir` would restore."""
    return target.exists() or aside(target).exists()


def recover_dir(target: Path) -> Path | None:
    """``target`` if it exists, else the copy ``replace_dir`` left aside, else None."""
    if target.exists():
        return target
    old = aside(target)
    if old.exists():
        os.replace(old, target)
        return target
    return None
