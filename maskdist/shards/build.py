"""Build a shard set (format: ``shards/README.md``) from a competition-style folder.

``build_shards`` reads the folder through :mod:`maskdist.data.layout`, assigns person-level folds
(:mod:`maskdist.data.folds`), re-encodes every image (:mod:`maskdist.data.images`) in a process pool and
writes deterministic tar shards (:class:`~maskdist.shards.tario.ShardTarWriter`) grouped by
fold and training class, eval shards in info.csv order, ``manifest.json`` and ``report.json``
(:class:`BuildReport`). The set is built in a hidden temporary folder beside the output and
renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from maskdist.data import images, labels
from maskdist.errors import MaskdistError
from maskdist.shards import crop
from maskdist.shards.detectors import DEFAULT_DETECTOR
from maskdist.shards.format import (
    CROP,
    EVAL_SCHEMA,
    EXTRA_FOLD,
    FACE,
    FORMAT,
    FORMAT_VERSION,
    IMAGE_EXT,
    MANIFEST,
    REPORT,
    TRAIN_SCHEMA,
    UNKNOWN_AGE,
    eval_key,
    extra_key,
    fold_name,
    shard_path,
    train_key,
)
from maskdist.shards.report import BuildReport, human_bytes  # noqa: F401 (BuildReport is part of this module's API)
from maskdist.shards.tario import ShardTarWriter
from maskdist.system import parallel
from maskdist.system.fileio import disk_full, is_disk_full, sha256_file

# Exactly 224x224 (aspect not kept): the recipe's first op, Resize((224, 224)), done once at
# build time with INTER_AREA. The loader then decodes a 224x224 JPEG and skips its resize
# (~1.5x the images/s of a 224-short-side set, ~1.7x of the old 256 default). A transform
# that resizes to more than the stored size would upscale: build for it (``--image-size
# 288x288``, or ``--image-size 256`` for the shorter side with the aspect kept).
DEFAULT_IMAGE_SIZE = "224x224"
DEFAULT_QUALITY = 95
DEFAULT_SHARD_SIZE = 2000  # ~2000 x ~13 KB = ~25 MB per shard at 224x224 q95 (~40 MB at 256 px)



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


class _ShardWriter:
    """Writes samples into tars, starting a new shard per group or every ``shard_size`` samples."""

    def __init__(self, root: Path, shard_size: int):
        self.root = root
        self.shard_size = shard_size
        self.entries: list[dict] = []
        self._next_index: Counter = Counter()
        self._tar: ShardTarWriter | None = None
        self._entry: dict | None = None
        self._group = None

    def add(self, split: str, fold: int | None, cls: int | None, key: str, jpeg: bytes, meta: dict) -> None:
        group = (split, fold, cls)
        if self._tar is None or group != self._group or self._entry["samples"] >= self.shard_size:
            self._close()
            self._open(group)
        self._tar.write(key, jpeg, meta)
        self._entry["samples"] += 1
        if self._entry["class_counts"] is not None:
            self._entry["class_counts"][meta["label"]] += 1

    def _open(self, group) -> None:
        split, fold, cls = group
        index = self._next_index[group]
        self._next_index[group] += 1
        relpath = shard_path(split, fold, cls, index)
        (self.root / relpath).parent.mkdir(parents=True, exist_ok=True)
        self._group = group
        self._entry = {
            "path": relpath, "split": split, "fold": fold, "class": cls, "samples": 0,
            "class_counts": [0] * labels.NUM_CLASSES if split == "train" else None,
        }
        self._tar = ShardTarWriter(str(self.root / relpath))

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self.root / self._entry["path"]
        self._entry["bytes"] = path.stat().st_size
        self._entry["sha256"] = sha256_file(path)
        self.entries.append(self._entry)
        self._tar, self._entry = None, None

    def close(self) -> list[dict]:
        self._close()
        return self.entries

    def abort(self) -> None:
        if self._tar is not None:
            with contextlib.suppress(Exception):  # the folder is removed anyway
                self._tar.close()
            self._tar = None


def _encode_task(task: tuple[str, int | None, int, crop.CropJob | None]) -> tuple[bool, object, object, dict | None]:
    """Worker: (path, size, quality, crop job) -> (True, jpeg, (h, w), face record or None)
    or (False, reason, why, None)."""
    path, size, quality, job = task
    record = None
    try:
        if job is None:
            jpeg, shape = images.prepare_file(path, size, quality)
        else:
            jpeg, shape, record = crop.prepare_file(path, size, quality, job)
    except images.ImageError as err:
        return False, err.reason, str(err), None
    except MaskdistError:
        raise
    except Exception as err:  # noqa: BLE001 (a decoder bug on one file must not stop the build)
        return False, "unreadable", f"{type(err).__name__}: {err}", None
    return True, jpeg, shape, record



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

    pool = parallel.pool(workers)
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
        label = label_true if age == UNKNOWN_AGE else labels.label_of(mask, gender, age, age_cut)
        rows.append({
            "path": str(r.path), "person": str(r.person), "id": str(r.id), "gender": gender, "age": age,
            "mask": mask, "label": label, "label_true": label_true, "fold": int(r.fold),
            "source": str(r.source), "relpath": str(r.relpath), "stem": str(r.stem),
        })
    rows.sort(key=lambda r: (r["fold"] == EXTRA_FOLD, r["fold"], r["label"], r["person"], r["stem"]))
    extra_index = 0
    for r in rows:
        if r["fold"] == EXTRA_FOLD:
            r["key"] = extra_key(extra_index)
            extra_index += 1
        else:
            r["key"] = train_key(r["person"], r["stem"])
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
    crop_kind: str | None = None,
    detector: str = DEFAULT_DETECTOR,
    crop_margin: float = crop.DEFAULT_MARGIN,
    face_cache: str | os.PathLike | None = None,
) -> BuildReport:
    """Build a shard set at ``out`` (see shards/README.md); returns the build report.

    The set appears at ``out`` only when complete (built in ``.NAME.partial-<pid>`` beside
    it, then renamed). Bad images are skipped and listed in the report, never fatal.
    ``crop_kind="face"`` stores face crops (:mod:`maskdist.shards.crop`) found by ``detector``
    with ``crop_margin``; detections are cached in ``face_cache`` (default: ``.face-cache``
    beside ``out``).
    """
    from maskdist.data import folds as folds_api, layout

    started = time.perf_counter()
    out = Path(out)
    size = parse_image_size(image_size)
    _check_options(quality, shard_size, workers, age_cut, folds)
    extra = [str(e) for e in extra]
    if out.exists() and not overwrite:
        raise MaskdistError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise MaskdistError(f"{out} exists and is not a folder: choose another --out")
    if crop_kind not in (None, crop.FACE):
        raise MaskdistError(f"--crop {crop_kind!r}: the only crop is 'face' (without --crop the whole photo is stored)")
    policy = crop.make_policy(detector, crop_margin, size) if crop_kind else None

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
    tally = crop.CropTally(policy) if policy else None
    try:
        from tqdm import tqdm

        job = None
        cache = contextlib.nullcontext()
        if policy:
            cache_path = crop.cache_file(Path(face_cache) if face_cache is not None else out.parent / crop.CACHE_DIR, policy)
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            job = crop.CropJob(policy, str(cache_path), f"{os.getpid()}-{time.time_ns()}")
            cache = open(cache_path, "a", encoding="utf-8")  # noqa: SIM115 (closed by the with below)
        tasks = [(r["path"], size, int(quality), job) for r in rows + eval_rows]
        bar = tqdm(total=len(tasks), unit="img", desc=f"shards {out.name}", disable=None if progress else True,  # only on a terminal
                   dynamic_ncols=True)
        results = _encoded(tasks, int(workers))
        with bar, contextlib.closing(results), cache:
            for index, (ok, value, info, face) in enumerate(results):  # face: the crop's record, or None
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
                meta = {k: r[k] for k in (TRAIN_SCHEMA if is_train else EVAL_SCHEMA)}
                if face is not None:
                    meta[FACE] = face["sample"]
                    tally.add("train" if is_train else "eval", r.get("label"), r["relpath"], face)
                    if face["new"]:
                        crop.append_cache(cache, face["sha256"], face["face"])
                if is_train:
                    writer.add("train", r["fold"], r["label"], r["key"], value, meta)
                    name = fold_name(r["fold"])
                    true_counts.setdefault(name, [0] * labels.NUM_CLASSES)[r["label_true"]] += 1
                else:
                    writer.add("eval", None, None, eval_key(r["row"]), value, meta)
                report.written += 1
        entries = writer.close()
        manifest = _manifest(entries, true_counts, shapes, eval_skipped_rows, dict(
            train_dir=str(Path(train_dir).resolve()), eval_dir=str(Path(eval_dir).resolve()) if eval_dir is not None else None,
            folds=int(folds), seed=int(seed), age_cut=int(age_cut),
            image_size=image_size_text(size), quality=int(quality),
            shard_size=int(shard_size), fixes=str(fixes) if fixes is not None else None, extra=extra,
        ), size, int(quality))
        if tally is not None:
            manifest[CROP] = tally.manifest_entry()
            report.crop = tally.report_entry()
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
    except BaseException as err:
        # Ctrl-C, kill (SIGTERM is turned into SystemExit by the CLI), a full disk or a bug: no partial set.
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, MaskdistError) and is_disk_full(err):
            raise disk_full(out, what="no shard set was written (the partial one is removed)") from None
        raise
    return report


def _manifest(entries, true_counts, shapes, eval_skipped_rows, build: dict, size, quality) -> dict:
    from maskdist import __version__

    k = build["folds"]
    train: dict[str, list[int]] = {str(f): [0] * labels.NUM_CLASSES for f in range(k)}
    eval_total = 0
    for e in entries:
        if e["split"] == "train":
            name = fold_name(e["fold"])
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
