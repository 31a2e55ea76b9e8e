"""Build, describe and verify WebDataset shard sets (format: ``shards/README.md``).

``build_shards`` reads a competition folder through :mod:`maskdist.layout`, assigns
person-level folds (:mod:`maskdist.folds`), re-encodes every image (:mod:`maskdist.images`)
in a process pool and writes deterministic tar shards grouped by fold and training class,
eval shards in info.csv order, ``manifest.json`` and ``report.json``. The set is built in a
hidden temporary folder beside the output and renamed into place only when complete.

``inspect_shards`` summarises a set from its manifest; ``verify_shards`` reads every shard
back (local, http(s) or ``pipe:``) and checks it against the manifest. Reading back never
unpickles anything: only ``.jpg`` and ``.json`` members are decoded, anything else is a problem.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from maskdist import images, labels, parallel
from maskdist.errors import MaskdistError
from maskdist.manifest import (
    EXTRA,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    REPORT,
    ShardReadError,
    ShardSet,
    open_shard_set,
)

# Exactly 224x224 (aspect not kept): the recipe's first op, Resize((224, 224)), done once at
# build time with INTER_AREA. The loader then decodes a 224x224 JPEG and skips its resize
# (~1.5x the images/s of a 224-short-side set, ~1.7x of the old 256 default). A transform
# that resizes to more than the stored size would upscale: build for it (``--image-size
# 288x288``, or ``--image-size 256`` for the shorter side with the aspect kept).
DEFAULT_IMAGE_SIZE = "224x224"
DEFAULT_QUALITY = 95
DEFAULT_SHARD_SIZE = 2000  # ~2000 x ~13 KB = ~25 MB per shard at 224x224 q95 (~40 MB at 256 px)
IMAGE_EXT = "jpg"
META_EXT = "json"
ALLOWED_EXTS = (IMAGE_EXT, META_EXT)
TRAIN_FIELDS = {"person": str, "id": str, "gender": int, "age": int, "mask": int, "label": int,
                "label_true": int, "fold": int, "source": str, "relpath": str}
EVAL_FIELDS = {"row": int, "image_id": str, "relpath": str}
SOURCES = ("competition", "extra")
_UNKNOWN_AGE = -1


class ShardFormatError(MaskdistError):
    """A shard whose bytes do not match the format: not a plain ustar/pax tar as the writer makes
    them (bad header, unsupported member type, truncated), or a sample without its image or json."""


# --- reading tars -------------------------------------------------------------------------
# The stream and ``verify`` read shards with this small reader instead of :mod:`tarfile`: the
# writer makes plain POSIX tars (ustar headers, a pax header only for a long or non-ASCII name),
# so one 512-byte header parse per member is all it takes, at a fraction of tarfile's cost per
# member. It is strict: a bad checksum or magic, a member type that would change how later
# members are read (GNU long names, sparse files, global pax headers that set a path or size),
# a size in base-256 or a missing end-of-archive block raises ShardFormatError. It never
# interprets member contents; what to read is the caller's choice.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
REGULAR_TYPES = (b"0", b"\x00", b"7")
DIRECTORY_TYPE = b"5"
_PAX, _PAX_GLOBAL = b"x", b"g"
_LINK_AND_DEVICE_TYPES = (b"1", b"2", b"3", b"4", b"6")
_SKIP_CHUNK = 1 << 20


def _tar_number(field: bytes, what: str, where: str) -> int:
    if field[:1] and field[0] & 0x80:
        raise ShardFormatError(f"{where}: {what} in base-256 (a member over 8 GB?) is not supported in shards")
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardFormatError(f"{where}: tar header {what} {text[:12]!r} is not an octal number (not a tar, or damaged)") from None


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """``"LEN key=value\n"`` records of a pax extended header."""
    records, pos, n = {}, 0, len(data)
    while pos < n:
        if data[pos] == 0:  # padding
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ShardFormatError(f"{where}: malformed pax header record") from None
        record = data[space + 1:pos + length]
        if length < 1 or space < 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ShardFormatError(f"{where}: malformed pax header record")
        key, value = record[:-1].split(b"=", 1)
        try:
            records[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ShardFormatError(f"{where}: pax header record is not UTF-8") from None
        pos += length
    return records


class TarReader:
    """Members of one tar stream, in order: iterate for ``(name, typeflag, size)``; call
    :meth:`read` for the current member's bytes, or do nothing and they are skipped (seeked
    over where the stream can seek, read through where it cannot: http, ``pipe:``).

    ``where`` names the shard in errors. Iteration ends at the end-of-archive block; a stream
    that ends before it raises ShardFormatError (truncated shard).
    """

    def __init__(self, stream, where: str, seekable: bool | None = None):
        self.stream = stream
        self.where = where
        self.seekable = bool(getattr(stream, "seekable", lambda: False)()) if seekable is None else seekable
        self.offset = 0  # of the next unread byte, for messages
        self._size = 0  # size of the current member
        self._left = 0  # its data + padding not consumed yet

    def _read(self, n: int, what: str) -> bytes:
        data = self.stream.read(n)
        while len(data) < n:  # raw streams may return less than asked for
            more = self.stream.read(n - len(data))
            if not more:
                raise ShardFormatError(f"{self.where}: truncated at byte {self.offset + len(data)} (in {what});"
                                       " re-copy or rebuild the shard")
            data += more
        self.offset += n
        return data

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.seekable:
            self.stream.seek(n, 1)  # past the end is caught by the next header read
            self.offset += n
            return
        while n > 0:
            step = min(n, _SKIP_CHUNK)
            self._read(step, "member data")
            n -= step

    def read(self) -> bytes:
        """The current member's bytes (once)."""
        if self._left == 0 and self._size:
            raise RuntimeError("member data already consumed")
        data = self._read(self._size, "member data") if self._size else b""
        self._skip(self._left - self._size)
        self._left = 0
        return data

    def _header(self) -> tuple[str, bytes, int] | None:
        at = self.offset
        header = self.stream.read(_BLOCK)
        if len(header) < _BLOCK:
            header += self._read(_BLOCK - len(header), "a tar header") if header else b""
        if not header:
            raise ShardFormatError(f"{self.where}: ends at byte {at} without the tar end-of-archive block (truncated);"
                                   " re-copy or rebuild the shard")
        self.offset = at + _BLOCK
        if header == _ZERO_BLOCK:
            return None
        where = f"{self.where}: tar header at byte {at}"
        magic = header[257:265]
        if magic[:5] != b"ustar":
            raise ShardFormatError(f"{where}: no ustar magic (not a tar written by `maskdist shards build`, or damaged)")
        stored = _tar_number(header[148:156], "checksum", where)
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ShardFormatError(f"{where}: checksum mismatch (damaged shard)")
        size = _tar_number(header[124:136], "size", where)
        name = header[:100].split(b"\x00", 1)[0]
        if magic == b"ustar\x0000":  # POSIX: a name prefix (in GNU headers these bytes are times)
            prefix = header[345:500].split(b"\x00", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise ShardFormatError(f"{where}: member name is not UTF-8") from None
        return text, header[156:157], size

    def __iter__(self) -> Iterator[tuple[str, bytes, int]]:
        pax: dict[str, str] = {}
        while True:
            self._skip(self._left)  # what the caller did not read
            self._left = self._size = 0
            parsed = self._header()
            if parsed is None:
                return
            name, typeflag, size = parsed
            self._size, self._left = size, size + (-size % _BLOCK)
            if typeflag in (_PAX, _PAX_GLOBAL):
                records = _pax_records(self.read(), f"{self.where}: pax header {name!r}")
                odd = [k for k in records if k.startswith("GNU.sparse")]
                if typeflag == _PAX_GLOBAL:
                    odd += [k for k in records if k in ("path", "size")]
                if odd:
                    raise ShardFormatError(f"{self.where}: pax header {name!r} sets {', '.join(sorted(odd))}:"
                                           " not supported in shards (rebuild with `maskdist shards build`)")
                if typeflag == _PAX:
                    pax = records
                continue
            if typeflag not in REGULAR_TYPES and typeflag != DIRECTORY_TYPE and typeflag not in _LINK_AND_DEVICE_TYPES:
                raise ShardFormatError(f"{self.where}: member {name!r} has tar type {typeflag!r}"
                                       " (GNU long name, sparse or vendor extension): not supported in shards;"
                                       " rebuild with `maskdist shards build`")
            if pax:
                name = pax.get("path", name)
                if "size" in pax:
                    try:
                        size = int(pax["size"])
                    except ValueError:
                        raise ShardFormatError(f"{self.where}: member {name!r}: pax size {pax['size']!r} is not a number") from None
                    self._size, self._left = size, size + (-size % _BLOCK)
                pax = {}
            if typeflag not in REGULAR_TYPES:  # directories, links and devices have no data
                self._size = self._left = 0
            yield name, typeflag, size


def split_key(name: str) -> tuple[str, str] | None:
    """``"a/b/key.ext.more"`` -> ``("a/b/key", "ext.more")`` (webdataset's split: the extension
    starts at the first dot of the last path component); None without a key or a dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1:]



# --- build ---------------------------------------------------------------------------------


@dataclass
class BuildReport:
    """What the build read, wrote and skipped (and why). Saved as ``report.json``."""

    out: str
    read: int = 0
    written: int = 0
    skipped: list[dict] = field(default_factory=list)  # {split, relpath, path, reason, why}
    layout: dict | None = None
    eval_layout: dict | None = None
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"] for s in self.skipped).items()))

    def to_dict(self) -> dict:
        return {
            "out": self.out, "read": self.read, "written": self.written,
            "skipped": len(self.skipped), "skipped_by_reason": self.skipped_by_reason(),
            "skipped_files": self.skipped, "shards": self.shards, "bytes": self.bytes,
            "seconds": round(self.seconds, 3), "layout": self.layout, "eval_layout": self.eval_layout,
        }

    def describe(self, limit: int = 20) -> str:
        rate = self.read / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"wrote {self.out}: {self.shards} shards, {self.written} samples, {_human(self.bytes)}"
            f" ({self.read} images read in {self.seconds:.1f} s, {rate:.0f} img/s)",
            f"  read {self.read}, written {self.written}, skipped {len(self.skipped)}",
        ]
        for reason, n in self.skipped_by_reason().items():
            lines.append(f"  skipped ({reason}): {n}")
        for s in self.skipped[:limit]:
            lines.append(f"    {s['split']} {s['relpath']}: {s['reason']}: {s['why']}")
        if len(self.skipped) > limit:
            lines.append(f"    ... and {len(self.skipped) - limit} more (all are in {REPORT})")
        for name, layout in (("train", self.layout), ("eval", self.eval_layout)):
            if layout and layout.get("problems"):
                counts = ", ".join(f"{k} {v}" for k, v in sorted(layout.get("counts", {}).items()))
                lines.append(f"  layout problems ({name}): {counts}")
                for p in layout["problems"][:limit]:
                    lines.append(f"    {p['kind']}: {p['where']}: {p['why']}")
                if len(layout["problems"]) > limit:
                    lines.append(f"    ... and {len(layout['problems']) - limit} more (all are in {REPORT})")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


_SIZE_HW = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_image_size(value: int | str | tuple | list | None) -> int | tuple[int, int] | None:
    """What ``--image-size`` means: ``224`` / ``"224"`` -> 224 (the shorter side, aspect kept,
    never enlarged); ``"224x224"`` / ``(224, 224)`` -> (224, 224) (exactly HxW, aspect not kept:
    the recipe's ``Resize((224, 224))`` done once at build time); ``"original"`` / None -> None."""
    if value is None or str(value).strip().lower() == "original":
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        h, w = (int(v) for v in value)
    else:
        match = _SIZE_HW.match(str(value))
        if match:
            h, w = int(match.group(1)), int(match.group(2))
        else:
            try:
                h = w = None
                size = int(str(value).strip())
            except ValueError:
                raise MaskdistError(f"--image-size {value!r}: expected a shorter side in pixels (e.g. 256),"
                                    f" an exact HxW (e.g. 224x224, the default {DEFAULT_IMAGE_SIZE}) or 'original'") from None
            if size < 16:
                raise MaskdistError(f"--image-size {size} is too small: use at least 16 (default {DEFAULT_IMAGE_SIZE})")
            return size
    if min(h, w) < 16:
        raise MaskdistError(f"--image-size {h}x{w} is too small: use at least 16 on each side (default {DEFAULT_IMAGE_SIZE})")
    return (h, w)


def image_size_text(size: int | tuple[int, int] | None) -> int | str:
    """How the manifest's ``build.image_size`` records a parsed size: 224, "224x224" or "original"."""
    if size is None:
        return "original"
    if isinstance(size, tuple):
        return f"{size[0]}x{size[1]}"
    return int(size)


def _shard_path(split: str, fold: int | None, cls: int | None, index: int) -> str:
    if split == "eval":
        return f"eval/eval-{index:06d}.tar"
    folder = EXTRA if fold == -1 else f"fold{fold}"
    return f"train/{folder}/c{cls:02d}-{index:06d}.tar"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed header fields: the same samples give byte-identical tars on every machine.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _ShardWriter:
    """Writes samples into tars, starting a new shard per group or every ``shard_size`` samples."""

    def __init__(self, root: Path, shard_size: int):
        self.root = root
        self.shard_size = shard_size
        self.entries: list[dict] = []
        self._next_index: Counter = Counter()
        self._tar: tarfile.TarFile | None = None
        self._entry: dict | None = None
        self._group = None

    def add(self, split: str, fold: int | None, cls: int | None, key: str, jpeg: bytes, meta: dict) -> None:
        group = (split, fold, cls)
        if self._tar is None or group != self._group or self._entry["samples"] >= self.shard_size:
            self._close()
            self._open(group)
        _tar_member(self._tar, f"{key}.{IMAGE_EXT}", jpeg)
        _tar_member(self._tar, f"{key}.{META_EXT}", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        self._entry["samples"] += 1
        if self._entry["class_counts"] is not None:
            self._entry["class_counts"][meta["label"]] += 1

    def _open(self, group) -> None:
        split, fold, cls = group
        index = self._next_index[group]
        self._next_index[group] += 1
        relpath = _shard_path(split, fold, cls, index)
        (self.root / relpath).parent.mkdir(parents=True, exist_ok=True)
        self._group = group
        self._entry = {
            "path": relpath, "split": split, "fold": fold, "class": cls, "samples": 0,
            "class_counts": [0] * labels.NUM_CLASSES if split == "train" else None,
        }
        self._tar = tarfile.open(self.root / relpath, "w", format=tarfile.PAX_FORMAT)

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self.root / self._entry["path"]
        self._entry["bytes"] = path.stat().st_size
        self._entry["sha256"] = _sha256_file(path)
        self.entries.append(self._entry)
        self._tar, self._entry = None, None

    def close(self) -> list[dict]:
        self._close()
        return self.entries

    def abort(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:  # noqa: BLE001 (the folder is removed anyway)
                pass
            self._tar = None


def _encode_task(task: tuple[str, int | None, int]) -> tuple[bool, object, object]:
    """Worker: (path, size, quality) -> (True, jpeg, (h, w)) or (False, reason, why)."""
    path, size, quality = task
    try:
        jpeg, shape = images.prepare_file(path, size, quality)
    except images.ImageError as err:
        return False, err.reason, str(err)
    except Exception as err:  # noqa: BLE001 (a decoder bug on one file must not stop the build)
        return False, "unreadable", f"{type(err).__name__}: {err}"
    return True, jpeg, shape



def _encoded(tasks: list, workers: int) -> Iterator[tuple[bool, object, object]]:
    """Encode results in task order; with ``workers > 1`` from a process pool.

    At most ``64 * workers`` results are in flight, so memory stays flat however large the
    dataset (the pool's feeder thread blocks on the semaphore).
    """
    if workers <= 1:
        for task in tasks:
            yield _encode_task(task)
        return
    import threading

    window = threading.BoundedSemaphore(64 * workers)
    stop = threading.Event()

    def feed():
        # Runs in the pool's task-feeder thread; must give up when the build stops, or
        # Pool.terminate() would wait for it forever.
        for task in tasks:
            while not window.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            yield task

    pool = parallel.context().Pool(workers, initializer=parallel.init_worker)
    try:
        for result in pool.imap(_encode_task, feed(), chunksize=4):
            window.release()
            yield result
    finally:
        stop.set()
        pool.terminate()
        pool.join()


def _train_rows(table, age_cut: int) -> list[dict]:
    """Training rows in shard order: fold (extra last), training class, person, stem."""
    rows = []
    for r in table.itertuples(index=False):
        age, mask, gender = int(r.age), int(r.mask), int(r.gender)
        label_true = int(r.label)
        label = label_true if age == _UNKNOWN_AGE else labels.label_of(mask, gender, age, age_cut)
        rows.append({
            "path": str(r.path), "person": str(r.person), "id": str(r.id), "gender": gender, "age": age,
            "mask": mask, "label": label, "label_true": label_true, "fold": int(r.fold),
            "source": str(r.source), "relpath": str(r.relpath), "stem": str(r.stem),
        })
    rows.sort(key=lambda r: (r["fold"] == -1, r["fold"], r["label"], r["person"], r["stem"]))
    extra_index = 0
    for r in rows:
        if r["fold"] == -1:
            r["key"] = f"{EXTRA}/{extra_index:06d}"
            extra_index += 1
        else:
            r["key"] = f"{r['person']}/{r['stem']}"
    return rows


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Remove ``.NAME.partial-PID`` folders left by builds that were killed (-9)."""
    for entry in out.parent.glob(f".{out.name}.partial-*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _check_options(quality: int, shard_size: int, workers: int, age_cut: int, folds: int) -> None:
    if not 1 <= int(quality) <= 100:
        raise MaskdistError(f"--quality {quality}: expected 1..100 (default {DEFAULT_QUALITY})")
    if int(shard_size) < 1:
        raise MaskdistError(f"--shard-size {shard_size}: expected at least 1 sample per shard (default {DEFAULT_SHARD_SIZE})")
    if int(workers) < 1:
        raise MaskdistError(f"--workers {workers}: expected at least 1 process")
    if not labels.YOUNG_CUT < int(age_cut) <= labels.METRIC_AGE_CUT:
        raise MaskdistError(f"--age-cut {age_cut}: expected {labels.YOUNG_CUT + 1}..{labels.METRIC_AGE_CUT} (the recipe uses 58)")
    if int(folds) < 2:
        raise MaskdistError(f"--folds {folds} is too few: k-fold needs at least 2 folds")


def build_shards(
    train_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    eval_dir: str | os.PathLike | None = None,
    folds: int = 5,
    seed: int = 0,
    age_cut: int = 58,
    fixes: str | os.PathLike | None = None,
    extra: Iterable[str | os.PathLike] = (),
    image_size: int | str | tuple[int, int] | None = DEFAULT_IMAGE_SIZE,
    quality: int = DEFAULT_QUALITY,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> BuildReport:
    """Build a shard set at ``out`` (see shards/README.md); returns the build report.

    The set appears at ``out`` only when complete (built in ``.NAME.partial-<pid>`` beside
    it, then renamed). Bad images are skipped and listed in the report, never fatal.
    """
    from maskdist import folds as folds_api
    from maskdist import layout

    started = time.perf_counter()
    out = Path(out)
    size = parse_image_size(image_size)
    _check_options(quality, shard_size, workers, age_cut, folds)
    extra = [str(e) for e in extra]
    if out.exists() and not overwrite:
        raise MaskdistError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise MaskdistError(f"{out} exists and is not a folder: choose another --out")

    table, layout_report = layout.read_train(train_dir, fixes=fixes, extra=extra)
    if len(table) == 0:
        raise MaskdistError(f"{train_dir} holds no usable training images: check train.csv and images/ (see `maskdist layout {train_dir}`)")
    table = folds_api.assign_folds(table, k=folds, seed=seed)
    rows = _train_rows(table, age_cut)
    eval_rows: list[dict] = []
    eval_report = None
    if eval_dir is not None:
        eval_table, eval_report = layout.read_eval(eval_dir)
        eval_rows = [{"path": str(r.path), "row": int(r.row), "image_id": str(r.image_id), "relpath": str(r.relpath)}
                     for r in eval_table.sort_values("row").itertuples(index=False)]

    report = BuildReport(out=str(out), layout=layout_report.to_dict(), eval_layout=eval_report.to_dict() if eval_report else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writer = _ShardWriter(tmp, int(shard_size))
    true_counts: dict[str, list[int]] = {}
    shapes: Counter = Counter()
    eval_skipped_rows: list[int] = []
    try:
        from tqdm import tqdm

        tasks = [(r["path"], size, int(quality)) for r in rows + eval_rows]
        bar = tqdm(total=len(tasks), unit="img", desc=f"shards {out.name}", disable=not progress, dynamic_ncols=True)
        results = _encoded(tasks, int(workers))
        with bar, contextlib.closing(results):
            for index, (ok, value, info) in enumerate(results):
                bar.update(1)
                report.read += 1
                is_train = index < len(rows)
                r = rows[index] if is_train else eval_rows[index - len(rows)]
                if not ok:
                    report.skipped.append({"split": "train" if is_train else "eval", "relpath": r["relpath"],
                                           "path": r["path"], "reason": value, "why": info})
                    if not is_train:
                        eval_skipped_rows.append(r["row"])
                    continue
                shapes[f"{info[0]}x{info[1]}"] += 1
                if is_train:
                    meta = {k: r[k] for k in TRAIN_FIELDS}
                    writer.add("train", r["fold"], r["label"], r["key"], value, meta)
                    name = EXTRA if r["fold"] == -1 else str(r["fold"])
                    true_counts.setdefault(name, [0] * labels.NUM_CLASSES)[r["label_true"]] += 1
                else:
                    meta = {k: r[k] for k in EVAL_FIELDS}
                    writer.add("eval", None, None, f"eval/{r['row']:06d}", value, meta)
                report.written += 1
        entries = writer.close()
        manifest = _manifest(entries, true_counts, shapes, eval_skipped_rows, dict(
            train_dir=str(Path(train_dir).resolve()), eval_dir=str(Path(eval_dir).resolve()) if eval_dir is not None else None,
            folds=int(folds), seed=int(seed), age_cut=int(age_cut),
            image_size=image_size_text(size), quality=int(quality),
            shard_size=int(shard_size), fixes=str(fixes) if fixes is not None else None, extra=extra,
        ), size, int(quality))
        report.shards = len(entries)
        report.bytes = sum(e["bytes"] for e in entries)
        report.seconds = time.perf_counter() - started
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        # Ctrl-C, kill (SIGTERM is turned into SystemExit by the CLI) or a bug: no partial set.
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _manifest(entries, true_counts, shapes, eval_skipped_rows, build: dict, size, quality) -> dict:
    from maskdist import __version__

    k = build["folds"]
    train: dict[str, list[int]] = {str(f): [0] * labels.NUM_CLASSES for f in range(k)}
    eval_total = 0
    for e in entries:
        if e["split"] == "train":
            name = EXTRA if e["fold"] == -1 else str(e["fold"])
            counts = train.setdefault(name, [0] * labels.NUM_CLASSES)
            for c, n in enumerate(e["class_counts"]):
                counts[c] += n
        else:
            eval_total += e["samples"]
    train_true = {name: true_counts.get(name, [0] * labels.NUM_CLASSES) for name in train}
    build = dict(build, maskdist_version=__version__)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "build": build,
        "image": {"format": IMAGE_EXT, "short_side": size if isinstance(size, int) else None,
                  "size": list(size) if isinstance(size, tuple) else None, "quality": quality,
                  "shapes": dict(shapes.most_common(10))},
        "num_classes": labels.NUM_CLASSES, "folds": k, "age_cut": build["age_cut"],
        "shards": entries,
        "totals": {"train": train, "train_true": train_true, "eval": eval_total},
        "eval_skipped_rows": eval_skipped_rows,
    }


# --- inspect -------------------------------------------------------------------------------


def inspect_shards(path_or_url: str | os.PathLike) -> dict:
    """The numbers ``shards inspect`` shows, from the manifest (for ``--json``)."""
    shard_set = open_shard_set(path_or_url)
    m = shard_set.manifest
    train = m["totals"]["train"]
    per_fold = {name: {"samples": sum(counts), "classes": counts,
                       "shards": len([s for s in m["shards"] if s["split"] == "train" and (EXTRA if s["fold"] == -1 else str(s["fold"])) == name])}
                for name, counts in train.items()}
    class_totals = [sum(counts[c] for counts in train.values()) for c in range(m["num_classes"])]
    return {
        "location": shard_set.location,
        "format_version": m["format_version"],
        "folds": m["folds"], "age_cut": m["age_cut"], "num_classes": m["num_classes"],
        "image": m["image"], "build": m["build"],
        "train": per_fold,
        "train_classes": class_totals,
        "train_samples": sum(class_totals),
        "eval_samples": m["totals"]["eval"],
        "eval_shards": len([s for s in m["shards"] if s["split"] == "eval"]),
        "shards": len(m["shards"]),
        "bytes": sum(s["bytes"] for s in m["shards"]),
    }


def describe_inspect(info: dict) -> str:
    """A readable table of :func:`inspect_shards`."""
    n = info["num_classes"]
    width = max(5, len(str(max(info["train_classes"] + [0]))) + 1)
    lines = [f"shard set {info['location']} (format {info['format_version']})"]
    lines.append(f"training samples per fold and class (training labels, old-age cut {info['age_cut']}):")
    lines.append(f"{'fold':>5} {'shards':>6} {'total':>7} | " + " ".join(f"{'c' + str(c):>{width}}" for c in range(n)))
    for name, row in info["train"].items():
        lines.append(f"{name:>5} {row['shards']:>6} {row['samples']:>7} | " + " ".join(f"{v:>{width}}" for v in row["classes"]))
    lines.append(f"{'all':>5} {sum(r['shards'] for r in info['train'].values()):>6} {info['train_samples']:>7} | "
                 + " ".join(f"{v:>{width}}" for v in info["train_classes"]))
    lines.append(f"eval: {info['eval_samples']} samples in {info['eval_shards']} shards")
    lines.append(f"total: {info['shards']} shards, {info['train_samples'] + info['eval_samples']} samples, {_human(info['bytes'])}")
    image = info["image"]
    if image.get("short_side"):
        size = f"shorter side {image['short_side']}"
    elif image.get("size"):
        size = f"exactly {image['size'][0]}x{image['size'][1]} (aspect not kept)"
    else:
        size = "original size"
    shapes = ", ".join(f"{k} ({v})" for k, v in list(image.get("shapes", {}).items())[:3])
    lines.append(f"images: {image['format']} q{image.get('quality')}, {size}; most common HxW: {shapes}")
    build = info["build"]
    lines.append("build: " + ", ".join(f"{k}={v}" for k, v in build.items()))
    return "\n".join(lines)


# --- verify --------------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, raw):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.digest.update(data)
        self.bytes += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class VerifyResult:
    location: str
    quick: bool
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if self.ok:
            what = "sizes and hashes" if self.quick else "hashes, counts, images and metadata"
            return f"ok: {self.location}: {self.shards} shards, {self.samples} samples ({what} match the manifest)"
        return "\n".join(self.problems + [f"{len(self.problems)} problem(s) in {self.location}"])


def verify_shards(path_or_url: str | os.PathLike, quick: bool = False, progress: bool = False) -> VerifyResult:
    """Check every shard of a set against its manifest; problems name the shard.

    ``quick``: sizes and sha256 only. Otherwise also the samples: member names and
    extensions (only .jpg/.json), one image and one json per key, images decode, json fields
    valid and consistent with the shard, per-class counts, eval row order, and no person
    in two folds.
    """
    shard_set = open_shard_set(path_or_url)
    m = shard_set.manifest
    result = VerifyResult(location=shard_set.location, quick=quick)
    _check_totals(m, result.problems)
    person_folds: dict[str, set] = {}
    state = {"last_row": -1, "keys": set()}
    from tqdm import tqdm

    for entry in tqdm(m["shards"], unit="shard", desc="verify", disable=not progress):
        result.shards += 1
        _verify_one(shard_set, entry, quick, result, person_folds, state)
    for person, fold_set in sorted(person_folds.items()):
        if len(fold_set) > 1:
            result.problems.append(f"person {person} is in folds {sorted(fold_set)}: a person must stay in one fold; rebuild the set")
    if shard_set.kind == "local":
        root = Path(shard_set.location)
        listed = {s["path"] for s in m["shards"]}
        for tar in sorted(root.rglob("*.tar")):
            rel = tar.relative_to(root).as_posix()
            if rel not in listed:
                result.problems.append(f"{rel}: shard on disk but not in {MANIFEST} (left over? remove it or rebuild)")
    return result


def _check_totals(m: dict, problems: list[str]) -> None:
    train: dict[str, list[int]] = {}
    eval_total = 0
    for s in m["shards"]:
        if s["split"] == "train":
            name = EXTRA if s["fold"] == -1 else str(s["fold"])
            counts = train.setdefault(name, [0] * m["num_classes"])
            for c, n in enumerate(s["class_counts"] or []):
                counts[c] += n
            if sum(s["class_counts"] or []) != s["samples"]:
                problems.append(f"{s['path']}: {MANIFEST} says {s['samples']} samples but its class counts sum to {sum(s['class_counts'] or [])}")
        else:
            eval_total += s["samples"]
    for name, counts in m["totals"]["train"].items():
        if counts != train.get(name, [0] * m["num_classes"]):
            problems.append(f"{MANIFEST}: totals of fold {name} {counts} disagree with its shards {train.get(name)}")
    if m["totals"]["eval"] != eval_total:
        problems.append(f"{MANIFEST}: eval total {m['totals']['eval']} disagrees with its shards ({eval_total})")


def _verify_one(shard_set: ShardSet, entry: dict, quick: bool, result: VerifyResult, person_folds: dict, state: dict) -> None:
    rel = entry["path"]
    problems = result.problems
    samples: list[dict] = []
    own: list[str] = []
    try:
        with shard_set.open(rel) as raw:
            reader = _HashingReader(raw)
            if not quick:
                try:
                    samples = _read_samples(reader, own)
                except ShardFormatError as err:
                    own.append(f"not a readable shard: {str(err).removeprefix(': ')}")
                except OSError as err:
                    own.append(f"not a readable tar ({type(err).__name__}: {err}); truncated or corrupt, rebuild or re-copy it")
            reader.drain()
    except ShardReadError as err:
        problems.append(f"{rel}: missing or unreadable ({err}): re-copy the set or rebuild it")
        return
    if reader.bytes != entry["bytes"]:
        own.insert(0, f"size {reader.bytes} bytes, {MANIFEST} says {entry['bytes']} (truncated or replaced)")
    if reader.digest.hexdigest() != entry["sha256"]:
        own.insert(0, f"sha256 {reader.digest.hexdigest()[:16]}... differs from {MANIFEST} ({entry['sha256'][:16]}...): the shard was changed or damaged")
    if not quick:
        result.samples += len(samples)
        _check_samples(shard_set, entry, samples, own, person_folds, state)
    else:
        result.samples += entry["samples"]
    problems.extend(f"{rel}: {p}" for p in own)


def _read_samples(reader: _HashingReader, own: list[str]) -> list[dict]:
    """Samples of a tar stream: [{key, jpg: (h, w) or None, json: dict or None}]."""
    samples: list[dict] = []
    current: dict | None = None
    tar = TarReader(reader, "", seekable=False)  # the reader the stream uses: what passes here, it can read
    for name, typeflag, _size in tar:
        if typeflag not in REGULAR_TYPES:
            own.append(f"member {name!r} is not a regular file")
            continue
        parts = split_key(name)
        if parts is None:
            own.append(f"member {name!r} has no key.extension name")
            continue
        key, ext = parts
        if ext not in ALLOWED_EXTS:
            own.append(f"member {name!r}: unexpected field .{ext} (only .jpg and .json are allowed; not decoded)")
            continue
        data = tar.read()
        if current is None or current["key"] != key:
            current = {"key": key, IMAGE_EXT: None, META_EXT: None}
            samples.append(current)
        if current[ext] is not None:
            own.append(f"member {name!r} appears twice")
            continue
        if ext == IMAGE_EXT:
            try:
                current[IMAGE_EXT] = images.check_jpeg(data)
            except images.ImageError as err:
                own.append(f"{name}: image does not decode ({err})")
                current[IMAGE_EXT] = False
        else:
            try:
                current[META_EXT] = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                own.append(f"{name}: invalid JSON ({err})")
                current[META_EXT] = False
    return samples


def _check_samples(shard_set: ShardSet, entry: dict, samples: list[dict], own: list[str], person_folds: dict, state: dict) -> None:
    m = shard_set.manifest
    split = entry["split"]
    counts = [0] * m["num_classes"]
    for s in samples:
        key = s["key"]
        if key in state["keys"]:
            own.append(f"sample {key}: key used twice in the set")
        state["keys"].add(key)
        if s[IMAGE_EXT] is None:
            own.append(f"sample {key}: no .{IMAGE_EXT} member")
        if s[META_EXT] is None:
            own.append(f"sample {key}: no .{META_EXT} member")
        meta = s[META_EXT]
        if not isinstance(meta, dict):
            continue
        fields = TRAIN_FIELDS if split == "train" else EVAL_FIELDS
        bad = [f"{name} missing" if name not in meta else f"{name}={meta[name]!r} is not {kind.__name__}"
               for name, kind in fields.items()
               if name not in meta or not isinstance(meta[name], kind) or (kind is int and isinstance(meta[name], bool))]
        if bad:
            own.append(f"sample {key}: json fields invalid: {', '.join(bad)}")
            continue
        if split == "eval":
            if key != f"eval/{meta['row']:06d}":
                own.append(f"sample {key}: key does not match row {meta['row']}")
            if meta["row"] <= state["last_row"]:
                own.append(f"sample {key}: row {meta['row']} out of info.csv order (after row {state['last_row']})")
            state["last_row"] = meta["row"]
            continue
        why = _train_meta_problem(meta, key, entry, m["age_cut"])
        if why:
            own.append(f"sample {key}: {why}")
            continue
        counts[meta["label"]] += 1
        if meta["fold"] != -1:
            person_folds.setdefault(meta["person"], set()).add(meta["fold"])
    if len(samples) != entry["samples"]:
        own.append(f"{len(samples)} samples, {MANIFEST} says {entry['samples']}")
    if split == "train" and counts != entry["class_counts"] and len(samples) == entry["samples"]:
        own.append(f"class counts {counts} differ from {MANIFEST} {entry['class_counts']}")


def _train_meta_problem(meta: dict, key: str, entry: dict, age_cut: int) -> str | None:
    if meta["source"] not in SOURCES:
        return f"source {meta['source']!r} is not one of {', '.join(SOURCES)}"
    if (meta["source"] == "extra") != (entry["fold"] == -1):
        return f"source {meta['source']!r} in a {'train/extra' if entry['fold'] == -1 else 'fold'} shard"
    if meta["fold"] != entry["fold"]:
        return f"fold {meta['fold']} in a shard of fold {entry['fold']}"
    if meta["label"] != entry["class"]:
        return f"label {meta['label']} in a shard of class {entry['class']}"
    if not (0 <= meta["mask"] <= 2 and 0 <= meta["gender"] <= 1 and 0 <= meta["label_true"] < labels.NUM_CLASSES):
        return "mask/gender/label_true out of range"
    if meta["age"] != _UNKNOWN_AGE:
        try:
            label = labels.label_of(meta["mask"], meta["gender"], meta["age"], age_cut)
            label_true = labels.label_of(meta["mask"], meta["gender"], meta["age"])
        except MaskdistError as err:
            return str(err)
        if (label, label_true) != (meta["label"], meta["label_true"]):
            return (f"labels {meta['label']}/{meta['label_true']} disagree with mask {meta['mask']}, gender {meta['gender']},"
                    f" age {meta['age']} (expected {label}/{label_true} at age cut {age_cut}/60)")
    if meta["source"] == "competition" and not key.startswith(meta["person"] + "/"):
        return f"key does not start with its person {meta['person']!r}"
    return None
