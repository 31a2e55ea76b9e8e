"""Atomic writes: a file is written under a temporary name beside its target, flushed to
disk, then renamed over the target, so a kill mid-write leaves the previous file (or none),
never a half-written one that looks complete. A full disk (or quota) during a write becomes
one :class:`DiskFull` line that names the path and the fix. Files and folders made through a
temporary name get the mode a plain ``open()``/``mkdir()`` would give under the umask (mkstemp and
mkdtemp make them owner-only, which would hide models and submissions from teammates on a shared
filesystem). Also: a file's sha256."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from maskdist.errors import MaskdistError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")  # what libraries that wrap the OSError say
# torch.save's zip writer loses the errno of a failed write and reports only the short write
_SHORT_WRITE_TEXT = ("unexpected pos", "PytorchStreamWriter failed writing")
LOW_SPACE_BYTES = 64 * 2**20  # a short write with less free than this is taken for a full disk


class DiskFull(MaskdistError):
    """A write failed because the filesystem (or the user's quota) is full."""


def is_disk_full(err: BaseException, path: str | os.PathLike | None = None) -> bool:
    """``err`` (or what it wraps) says the disk or the quota is full: an OSError with ENOSPC or
    EDQUOT, or a library's error that carries its text (safetensors, tensorboard). With the
    ``path`` written, also a short write (torch.save's) on a filesystem with almost no space left."""
    seen, short_write = set(), False
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(err) for text in _DISK_FULL_TEXT):
            return True
        short_write |= any(text in str(err) for text in _SHORT_WRITE_TEXT)
        err = err.__cause__ or err.__context__
    return short_write and path is not None and free_bytes(path) < LOW_SPACE_BYTES


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(path: str | os.PathLike, needed: int | None = None, what: str = "") -> DiskFull:
    """The one-line error for a full disk at ``path``."""
    need = f" (needs about {needed / 2**20:.0f} MB, {free_bytes(path) / 2**20:.0f} MB free)" if needed else \
        f" ({free_bytes(path) / 2**20:.0f} MB free)"
    return DiskFull(f"no space left on the device writing {path}{need}{': ' + what if what else ''}: free space there,"
                    " or write to another folder")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` can only
    be read by setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def plain_dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def give_plain_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open()`` would: safetensors creates
    its files owner-only whatever the umask."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, plain_file_mode())


def make_temp_dir(target: Path) -> Path:
    """A new empty folder beside ``target`` (hidden, unique) to build it in before
    :func:`replace_dir`, with the mode a plain ``mkdir`` would give."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, plain_dir_mode())
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write; it replaces ``path`` only if the block succeeds. A full disk
    raises :class:`DiskFull`, and the temporary file is removed either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full(path) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, plain_file_mode())  # after the block: some writers (safetensors) recreate the file
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except DiskFull:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise disk_full(path) from None
        raise
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


def rotate_dir(tmp: Path, target: Path) -> None:
    """Swap a completed folder ``tmp`` in for ``target`` and keep the previous ``target`` as
    ``<target>.old`` (the copy before it is removed): a damaged ``target`` then still has a
    good predecessor. A kill at any point leaves ``target`` or ``<target>.old`` complete."""
    old = aside(target)
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)


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


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
