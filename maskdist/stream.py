"""Read shard sets as streams: class-balanced training, exactly-once evaluation, DDP-safe.

The training loop needs four calls (no ``accelerator.prepare`` on these loaders: they
split the data by rank themselves, and ``prepare`` would split it again or dispatch it)::

    from maskdist import stream, transforms

    shard_set = open_shard_set("shards/full")
    train, steps = stream.train_loader(
        shard_set, stream.folds_except(shard_set, fold), batch_size=64,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        workers=8, seed=cfg.seed, alpha=0.0, transform="recipe")
    val = stream.eval_loader(shard_set, fold, batch_size=128, rank=..., world_size=..., workers=4)
    for epoch in range(epochs):
        train.set_epoch(epoch)                       # before iterating: reaches persistent workers
        for batch in train:                          # exactly `steps` batches on every rank
            x = transforms.to_device(batch["image"], accelerator.device, mean, std)
            y = batch["label"].to(accelerator.device)
            ...
        for batch in val:                            # ranks may get different batch counts:
            ...                                      # use the unwrapped model, gather (key, pred)
                                                     # pairs with gather_object, de-duplicate by key

Batches are dicts: ``image`` (uint8 NCHW tensor), ``key`` (list of str), and from the
sample's json ``label`` and ``label_true`` (int64 tensors; training folds) or ``row``
(int64; the eval split). Normalise on the device with :func:`maskdist.transforms.to_device`.

Training stream (:func:`train_loader`)
    * Per class an infinite stream: the class's shards in a fresh random order on every pass,
      each shard read from a random start sample round to the one before it (so ranks and
      workers do not walk a one-shard class in lockstep, and every sample stays equally
      likely). Classes are mixed with probability ``n_c ** alpha / sum`` (``n_c`` from the
      manifest; ``alpha`` 0 uniform = default, 0.5 square root, 1 natural); a class with no
      samples in the selection gets probability 0 and is never opened. A shuffle buffer of
      ``shuffle_buffer`` raw (undecoded) samples follows; only what leaves it is decoded.
    * Randomness comes from local ``random.Random`` generators seeded from ``(seed, rank,
      worker, epoch)`` and augmentation seeded per batch from ``(..., batch)``: ranks and
      workers never replay one sequence, epochs differ, and the same arguments reproduce the
      same batches. The epoch reaches persistent workers through a shared
      ``multiprocessing.Value`` (:meth:`StreamLoader.set_epoch`); without ``set_epoch`` calls
      each worker counts its own passes instead.
    * Resuming inside an epoch: ``set_epoch(epoch, start_step)`` makes the workers draw the
      batches before ``start_step`` without decoding them and yield the rest, in the order
      and with the augmentation of an uninterrupted epoch.
    * Damage: a shard that cannot be read (after the set's retries) or that is damaged (a
      tar header, a sample's json or JPEG that does not decode) is skipped for the rest of
      the epoch and reported with the next batch; the loader names it once (a warning),
      records it in ``loader.skipped`` and raises MaskdistError when a class has lost all
      its shards or the skipped shards hold more than ``max_skipped`` of the epoch's samples.
      A worker's MaskdistError reaches the caller as one line, not a worker traceback.
    * Epoch length: ``steps = ceil(train_samples / (batch_size * world_size))``. The rank's
      ``steps`` are split among its workers exactly (worker ``w`` makes
      ``steps // workers + (w < steps % workers)`` full batches of an infinite stream), and
      the DataLoader yields the sum, so every rank yields exactly ``steps`` full batches
      whatever the shard count, class sizes or worker count.

Evaluation stream (:func:`eval_loader`)
    Every sample of a fold (its competition samples, never extra) or of the eval split
    exactly once across all ranks and workers: shards are split among ranks (balanced by
    sample count) when there are at least as many shards as ranks, else samples by index
    modulo; then the same again among the rank's workers. Partial last batches are kept, so
    ranks may yield different numbers of batches (``len(loader)`` says how many). A shard
    that cannot be read is an error naming it: evaluation never silently reads less.

Reading and decoding
    Shards are read with a small strict tar reader (:class:`maskdist.shards.tario.TarReader`, one
    512-byte header parse per member; 3-4x cheaper per sample than :mod:`tarfile`), which
    reads only the ``.jpg`` and ``.json`` members; any other member (a ``.pyd`` pickle, say)
    is skipped unread and never decoded, and a header that is not plain ustar/pax (bad
    checksum, GNU extensions, links, truncation) raises :class:`ShardFormatError`. Images
    are decoded and transformed straight into the batch tensor (in shared memory inside a
    DataLoader worker, so passing it to the main process copies nothing); a stored image
    that already has the transform's resize size (the default ``--image-size 224x224``
    build) is not resized again. A transform that would enlarge the stored images gets a
    warning when the loader is made (:func:`check_stored_size`).
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import multiprocessing
import random
import warnings
import weakref
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from maskdist import parallel
from maskdist.errors import MaskdistError
from maskdist.images import ImageError, check_jpeg_complete
from maskdist.labels import NUM_CLASSES
from maskdist.shards.format import EVAL_BATCH_FIELDS, IMAGE_EXT, META_EXT, TRAIN_BATCH_FIELDS, ShardFormatError
from maskdist.shards.manifest import ShardSet, open_shard_set
from maskdist.shards.opener import ShardReadError
from maskdist.shards.tario import iter_samples
from maskdist.transforms import DecodeError, Transform, build_transform

log = logging.getLogger(__name__)
DEFAULT_MAX_SKIPPED = 0.05

DEFAULT_SHUFFLE_BUFFER = 1000


# --- reading shards -----------------------------------------------------------------------


def read_shard(shard_set: ShardSet, shard: dict | str, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__index__", "jpg", "json"}`` of one shard (a manifest entry,
    or a path inside the set), in order, with index in ``[start, stop)``.

    Only ``.jpg`` and ``.json`` members are read and nothing is decoded here (see
    :func:`maskdist.shards.tario.iter_samples`); a damaged shard raises ShardFormatError, an
    unreadable one ShardReadError (after the set's retries, for remote sets).
    """
    relpath, size = (shard["path"], shard.get("bytes")) if isinstance(shard, dict) else (shard, None)
    if stop is not None and stop <= start:
        return
    with shard_set.open(relpath, size) as handle:
        yield from iter_samples(handle, relpath, start, stop)


# --- seeds and selections -----------------------------------------------------------------


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from a base seed and non-negative parts (rank, worker, epoch, ...)."""
    state = np.random.SeedSequence([int(seed) % (2**63), *[int(p) for p in parts]]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def folds_except(shard_set: ShardSet, fold: int, what: str = "fold") -> list[int]:
    """The training folds when ``fold`` is held out (``what``: its name in the error)."""
    held_out = shard_set.check_fold(fold, what)
    return [k for k in range(shard_set.folds) if k != held_out]


def class_probabilities(counts: Sequence[int], alpha: float = 0.0) -> list[float]:
    """Mixing probabilities ``n_c ** alpha / sum`` (0 where ``n_c == 0``)."""
    if alpha < 0:
        raise MaskdistError(f"alpha {alpha} must be 0 or more (0 uniform, 0.5 square root, 1 natural)")
    weights = [float(n) ** alpha if n > 0 else 0.0 for n in counts]
    total = sum(weights)
    if total <= 0:
        raise MaskdistError("the selection holds no training samples: check the folds and the shard set")
    return [w / total for w in weights]


def _as_shard_set(shard_set: ShardSet | str) -> ShardSet:
    return shard_set if isinstance(shard_set, ShardSet) else open_shard_set(shard_set)


def _as_transform(transform: Transform | str | None) -> Transform:
    if transform is None:
        return build_transform("none", resize=None, crop=None)
    if isinstance(transform, str):
        return build_transform(transform)
    return transform


def check_stored_size(shard_set: ShardSet, transform: Transform) -> list[str]:
    """Stored image shapes (``"HxW"``, from the manifest) that the transform's resize would
    enlarge; warns when there are any (the set was built smaller than the training needs)."""
    target = transform.resize
    if target is None:
        return []
    small = []
    for text in (shard_set.manifest.get("image") or {}).get("shapes") or {}:
        try:
            h, w = (int(v) for v in str(text).split("x"))
        except ValueError:
            continue
        if h < target[0] or w < target[1]:
            small.append(str(text))
    if small:
        warnings.warn(f"{shard_set.location}: shard images of {', '.join(small[:3])} (HxW) are enlarged to the"
                      f" transform's resize {target[0]}x{target[1]}: rebuild the set with `--image-size"
                      f" {target[0]}x{target[1]}` (or larger) for full detail, or lower --resize", stacklevel=3)
    return small


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _check_split_args(batch_size: int, rank: int, world_size: int, workers: int) -> None:
    if int(batch_size) < 1:
        raise MaskdistError(f"batch size {batch_size} must be 1 or more")
    if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
        raise MaskdistError(f"rank {rank} / world size {world_size}: expected 0 <= rank < world size")
    if int(workers) < 0:
        raise MaskdistError(f"workers {workers} must be 0 or more")


# --- the training stream -------------------------------------------------------------------


SMALL_SHARD_BYTES = 4 << 20  # a training shard up to this size is kept in memory once read ...
SHARD_CACHE_BYTES = 64 << 20  # ... while the worker keeps at most this much


class _ShardCache:
    """Raw samples of small training shards, kept after their first read (one per process).

    A rare class's shards hold a few samples each, and uniform class mixing reads them over
    and over: reopening and re-parsing them cost more per sample than the decode of a big
    class. Shards of at most ``SMALL_SHARD_BYTES`` (by the manifest) are read once and served
    from memory, up to ``SHARD_CACHE_BYTES`` in all; the samples and their order are the same.
    """

    def __init__(self, budget: int = SHARD_CACHE_BYTES, small: int = SMALL_SHARD_BYTES):
        self.budget, self.small, self.used = int(budget), int(small), 0
        self.shards: dict[str, list[dict]] = {}

    def get(self, shard_set: ShardSet, shard: dict) -> list[dict] | None:
        path = shard["path"]
        cached = self.shards.get(path)
        if cached is not None:
            return cached
        size = int(shard.get("bytes") or 0)
        if not 0 < size <= self.small or self.used + size > self.budget:
            return None
        samples = list(read_shard(shard_set, shard))
        for sample in samples:
            sample["__shard__"] = shard
        if len(samples) != shard["samples"]:
            raise ShardFormatError(f"{path}: the manifest lists {shard['samples']} samples, the shard holds {len(samples)}")
        self.shards[path] = samples
        self.used += size
        return samples


class _ShardHealth:
    """The shards one worker found unreadable in the current epoch: each is skipped for the
    rest of the epoch, reported once (path, reason, its sample count) with the next batch."""

    def __init__(self):
        self.bad: dict[str, str] = {}
        self._new: list[tuple[str, str, int]] = []

    def is_bad(self, path: str) -> bool:
        return path in self.bad

    def mark(self, shard: dict, reason: str) -> None:
        if shard["path"] not in self.bad:
            self.bad[shard["path"]] = reason
            self._new.append((shard["path"], reason, int(shard["samples"])))

    def take_new(self) -> list[tuple[str, str, int]]:
        new, self._new = self._new, []
        return new


def _class_stream(shard_set: ShardSet, shards: list[dict], rng: random.Random, cache: _ShardCache | None = None,
                  health: _ShardHealth | None = None, cls: int = -1) -> Iterator[dict]:
    """Infinite raw samples of one class: shards in a new random order on every pass, each
    read from a random start sample round to the one before it (small shards from ``cache``).

    A shard that cannot be read (after the set's retries) or is damaged is marked in
    ``health`` and skipped for the rest of the epoch; mixing goes on with the class's other
    shards. When every shard of the class is marked the class is lost: MaskdistError.
    Samples carry their shard entry (``__shard__``) so a sample that fails to decode later can
    mark it too.
    """
    health = health if health is not None else _ShardHealth()
    while True:
        got = 0
        for shard in rng.sample(shards, len(shards)):
            offset = rng.randrange(shard["samples"])
            if health.is_bad(shard["path"]):
                continue
            try:
                cached = cache.get(shard_set, shard) if cache is not None else None
                if cached is not None:
                    got += len(cached)
                    yield from cached[offset:]
                    yield from cached[:offset]
                    continue
                for part in (dict(start=offset), dict(stop=offset)):
                    for sample in read_shard(shard_set, shard, **part):
                        sample["__shard__"] = shard
                        got += 1
                        yield sample
            except (ShardFormatError, ShardReadError) as err:
                health.mark(shard, str(err))
        if all(health.is_bad(s["path"]) for s in shards):
            listed = "; ".join(f"{path}: {why}" for path, why in health.bad.items() if path in {s["path"] for s in shards})
            raise MaskdistError(f"class {cls} lost every one of its {len(shards)} shard(s) in this epoch ({listed[:600]}):"
                                " check the set with `maskdist shards verify`, then re-copy or rebuild it")
        if got == 0:
            raise ShardFormatError(f"shards {', '.join(s['path'] for s in shards)} yielded no samples although the manifest lists some")


def _mixed(streams: dict[int, Iterator[dict]], probs: Sequence[float], rng: random.Random) -> Iterator[dict]:
    """Infinite: each sample from class c with probability probs[c]."""
    classes = [c for c, p in enumerate(probs) if p > 0]
    cumulative, acc = [], 0.0
    for c in classes:
        acc += probs[c]
        cumulative.append(acc)
    last = len(classes) - 1
    while True:
        c = classes[min(bisect.bisect_right(cumulative, rng.random() * acc), last)]
        yield next(streams[c])


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer of ``size`` samples (0 or 1: no shuffling)."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _uint8_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor; in a DataLoader worker it lives in shared memory from the start
    (as torch's own collate does), so handing it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class BadSample(ShardFormatError):
    """A sample whose image or metadata does not decode; ``shard`` is its shard entry (or None)."""

    def __init__(self, message: str, shard: dict | None = None):
        super().__init__(message)
        self.shard = shard


class _BatchBuilder:
    """Decodes raw samples straight into one uint8 NCHW batch (no per-image array and no
    stacking copy when the transform fixes the output size), with the json's label fields."""

    def __init__(self, size: int, transform: Transform, fields: Sequence[str]):
        self.transform, self.fields = transform, tuple(fields)
        out = transform.output_size
        self.images = _uint8_batch((size, 3, *out)) if out is not None else None
        self.slots = self.images.numpy() if self.images is not None else None
        self.arrays: list[np.ndarray] = []  # decode only (no fixed size): stacked at the end
        self.keys: list[str] = []
        self.values: list[list[int]] = []

    def add(self, sample: dict) -> None:
        """Decode ``sample`` into the next slot; raises BadSample naming its shard and key."""
        i = len(self.keys)
        try:
            data = sample[IMAGE_EXT]
            check_jpeg_complete(data)
            if self.slots is not None:
                self.transform.from_jpeg(data, out=self.slots[i])
            else:
                array = self.transform.from_jpeg(data)
            meta = json.loads(sample[META_EXT])
            values = [int(meta[name]) for name in self.fields]
        except (ImageError, DecodeError, ValueError, KeyError, TypeError, UnicodeDecodeError, cv2.error) as err:
            shard = sample.get("__shard__")
            where = shard["path"] if shard else sample.get("__url__", "?")
            raise BadSample(f"{where}: sample {sample.get('__key__')!r} does not decode ({type(err).__name__}: {err})", shard) from None
        for name, value in zip(self.fields, values):
            if name in TRAIN_BATCH_FIELDS and not 0 <= value < NUM_CLASSES:
                shard = sample.get("__shard__")
                raise BadSample(f"{shard['path'] if shard else '?'}: sample {sample['__key__']!r} has {name} {value},"
                                f" outside 0..{NUM_CLASSES - 1}", shard)
        if self.slots is None:
            self.arrays.append(array)
        self.keys.append(sample["__key__"])
        self.values.append(values)

    def batch(self) -> dict:
        n = len(self.keys)
        images = self.images[:n] if self.images is not None else torch.from_numpy(np.stack(self.arrays))
        batch = {"image": images, "key": self.keys}
        for j, name in enumerate(self.fields):
            batch[name] = torch.tensor([v[j] for v in self.values], dtype=torch.int64)
        return batch


def collate(samples: list[dict], transform: Transform, fields: Sequence[str]) -> dict:
    """Decode and transform raw samples into one uint8 NCHW batch with the json's ``fields``;
    a sample that does not decode raises BadSample (a ShardFormatError) naming its shard."""
    builder = _BatchBuilder(len(samples), transform, fields)
    for sample in samples:
        builder.add(sample)
    return builder.batch()


class TrainStream(IterableDataset):
    """Class-balanced infinite stream, cut into exactly ``steps`` batches per rank per epoch.

    Build it with :func:`train_loader`; it can also be iterated directly (one process).
    """

    def __init__(self, shard_set: ShardSet, folds: Iterable[int] | None, batch_size: int, rank: int,
                 world_size: int, seed: int, alpha: float, transform: Transform, shuffle_buffer: int,
                 extra: bool = True):
        super().__init__()
        self.shard_set = shard_set
        self.folds = None if folds is None else sorted(int(f) for f in folds)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.alpha = int(seed), float(alpha)
        self.transform, self.shuffle_buffer, self.extra = transform, int(shuffle_buffer), bool(extra)
        self.class_counts = shard_set.class_counts(self.folds, extra=self.extra)
        self.samples = shard_set.samples("train", self.folds, extra=self.extra)
        self.probs = class_probabilities(self.class_counts, self.alpha)
        # Shards grouped by the class they hold (training shards hold one class each).
        self.class_shards: dict[int, list[dict]] = {}
        for shard in shard_set.shards("train", self.folds, extra=self.extra):
            if shard["samples"] > 0:
                self.class_shards.setdefault(int(shard["class"]), []).append(shard)
        for c, p in enumerate(self.probs):
            if p > 0 and c not in self.class_shards:
                raise MaskdistError(f"class {c} has {self.class_counts[c]} samples in the manifest totals but no shard: rebuild the set")
        self.steps = math.ceil(self.samples / (self.batch_size * self.world_size))
        self._epoch = multiprocessing.RawValue("q", -1)  # shared with (persistent) workers; one writer
        self._start = multiprocessing.RawValue("q", 0)  # the epoch's first batch (> 0 when resumed)
        self._passes = 0  # per-process count of passes, used when set_epoch is never called
        self._cache: _ShardCache | None = None
        self.preskipped: tuple[int, tuple[str, ...]] = (-1, ())  # (epoch, shards already found bad in it)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self._epoch.value = int(epoch)
        self._start.value = int(start_step)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # each worker fills its own
        return state

    def __len__(self) -> int:
        return self.steps

    def worker_steps(self, worker: int, workers: int) -> int:
        """Batches worker ``worker`` of ``workers`` makes per epoch (they sum to ``steps``)."""
        return self.steps // workers + (1 if worker < self.steps % workers else 0)

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        epoch, start = self._epoch.value, self._start.value
        if epoch < 0:
            epoch = self._passes
        self._passes += 1
        seed = derive_seed(self.seed, self.rank, worker, epoch)
        rng = random.Random(seed)
        n_batches = self.worker_steps(worker, workers)
        if n_batches == 0:
            return
        if self._cache is None:  # made in the process that iterates (each worker its own)
            self._cache = _ShardCache()
        health = _ShardHealth()  # a skipped shard stays skipped for the rest of this epoch only
        if epoch == self.preskipped[0]:  # a resumed epoch: what was skipped before the interruption
            health.bad.update(dict.fromkeys(self.preskipped[1], "skipped before the run was resumed"))
        streams = {c: _class_stream(self.shard_set, shards, random.Random(derive_seed(seed, 2, c)), self._cache, health, c)
                   for c, shards in self.class_shards.items()}
        samples = _shuffled(_mixed(streams, self.probs, rng), self.shuffle_buffer, rng)
        # The DataLoader takes batches from its workers in turn, starting with worker 0, so the
        # rank's batch i comes from worker i % workers as its batch i // workers. A resumed
        # epoch starts at batch `start`: workers before `start % workers` first send a
        # placeholder (dropped by StreamLoader) so that the turns still match the batch order.
        if workers > 1 and worker < start % workers and start > 0:
            yield {RESUME_PADDING: True}
        try:
            for i in range(n_batches):
                index = i * workers + worker
                if index < start:  # consumed before the run was interrupted: drawn, not decoded
                    for _ in range(self.batch_size):
                        next(samples)
                    continue
                # Augmentation seeded per batch: a resumed epoch augments its batches as the
                # uninterrupted one did, whatever was skipped.
                self.transform.set_seed(derive_seed(seed, 1, index))
                batch = self._fill(samples, health)
                batch["step"] = index
                skipped = health.take_new()
                if skipped:
                    batch[SKIPPED] = skipped
                yield batch
        except MaskdistError as err:
            yield {ERROR: str(err)}  # one line for the user, not a worker traceback
        finally:
            samples.close()
            for s in streams.values():
                s.close()

    def _fill(self, samples: Iterator[dict], health: _ShardHealth) -> dict:
        """One batch of decoded samples; a sample that does not decode marks its shard bad
        (skipped for the rest of the epoch) and the next sample takes its place."""
        builder = _BatchBuilder(self.batch_size, self.transform, TRAIN_BATCH_FIELDS)
        while len(builder.keys) < self.batch_size:
            sample = next(samples)
            try:
                builder.add(sample)
            except BadSample as err:
                if err.shard is None:
                    raise
                health.mark(err.shard, str(err))
        return builder.batch()


# --- the evaluation stream -----------------------------------------------------------------


def _balanced_split(shards: list[dict], parts: int) -> list[list[dict]]:
    """Shards into ``parts`` groups of near-equal sample counts (largest first, to the
    lightest group; deterministic), each group in manifest order."""
    order = sorted(range(len(shards)), key=lambda i: (-shards[i]["samples"], i))
    loads = [0] * parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        g = min(range(parts), key=lambda j: (loads[j], j))
        groups[g].append(i)
        loads[g] += shards[i]["samples"]
    return [[shards[i] for i in sorted(g)] for g in groups]


def eval_plan(shards: list[dict], rank: int, world_size: int, worker: int, workers: int) -> tuple[list[dict], int, int]:
    """What one worker of one rank reads: (shards, modulus, residue): it keeps the samples
    whose running index over those shards is ``residue`` modulo ``modulus``.

    Shards are split among ranks when there are at least ``world_size`` of them, else
    samples by index; then the same among the rank's workers. Exactly once in every case.
    """
    if len(shards) >= world_size:
        mine, modulus, residue = _balanced_split(shards, world_size)[rank], 1, 0
    else:
        mine, modulus, residue = list(shards), world_size, rank
    if modulus == 1 and len(mine) >= workers:
        return _balanced_split(mine, workers)[worker], 1, 0
    # j-th kept sample of the rank goes to worker j % workers: index = residue + modulus * j
    return mine, modulus * workers, residue + modulus * worker


def _kept(n: int, modulus: int, residue: int) -> int:
    return 0 if residue >= n else (n - residue + modulus - 1) // modulus


class EvalStream(IterableDataset):
    """Every sample of a selection exactly once across ranks and workers, in batches with keys."""

    def __init__(self, shard_set: ShardSet, shards: list[dict], fields: Sequence[str], batch_size: int,
                 rank: int, world_size: int, transform: Transform, workers: int):
        super().__init__()
        self.shard_set, self.shards, self.fields = shard_set, shards, tuple(fields)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.transform, self.workers = transform, max(1, int(workers))

    def worker_samples(self, worker: int) -> int:
        shards, modulus, residue = eval_plan(self.shards, self.rank, self.world_size, worker, self.workers)
        return _kept(sum(s["samples"] for s in shards), modulus, residue)

    @property
    def samples(self) -> int:
        """Samples this rank yields."""
        return sum(self.worker_samples(w) for w in range(self.workers))

    def __len__(self) -> int:
        return sum(math.ceil(self.worker_samples(w) / self.batch_size) for w in range(self.workers))

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._batches()
        except MaskdistError as err:  # one line for the user, not a worker traceback
            yield {ERROR: f"{err} (evaluation reads every sample, so it stops here)"}

    def _batches(self) -> Iterator[dict]:
        worker, workers = _worker()
        if workers != self.workers:
            raise RuntimeError(f"EvalStream built for {self.workers} workers runs in {workers}")
        shards, modulus, residue = eval_plan(self.shards, self.rank, self.world_size, worker, workers)
        self.transform.set_seed(0)
        pending: list[dict] = []
        index = 0
        for shard in shards:
            n = shard["samples"]
            end = index + n
            if _kept(end, modulus, residue) == _kept(index, modulus, residue):
                index = end  # nothing of ours in this shard: do not open it
                continue
            for sample in read_shard(self.shard_set, shard):
                mine = index % modulus == residue
                index += 1
                if not mine:
                    continue
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield collate(pending, self.transform, self.fields)
                    pending = []
            if index != end:  # the split is exact only if the manifest counts are
                raise ShardFormatError(f"{shard['path']}: the manifest lists {n} samples, the shard holds a different number")
        if pending:
            yield collate(pending, self.transform, self.fields)


# --- loaders --------------------------------------------------------------------------------


ERROR = "__error__"  # a batch that carries a worker's error message instead of data
SKIPPED = "__skipped__"  # (path, reason, samples) of shards a worker began to skip, on the next batch
RESUME_PADDING = "__padding__"  # a placeholder batch that keeps a resumed epoch's batch order


class StreamLoader:
    """A torch DataLoader over a stream, plus ``set_epoch``, an exact ``len``, worker errors as
    one-line MaskdistErrors, and the record of skipped shards.

    Not a DataLoader subclass on purpose: ``accelerator.prepare`` returns it unchanged
    (preparing would split the already rank-split data again). Iterate it directly.

    ``skipped`` holds the shards this rank's workers skipped in the current epoch (path ->
    (reason, samples)); each is logged as a warning the first time, and when their samples
    pass ``max_skipped`` of the epoch's the loader raises MaskdistError.
    """

    def __init__(self, dataset: IterableDataset, workers: int, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None, max_skipped: float = DEFAULT_MAX_SKIPPED):
        self.dataset = dataset
        self.workers = int(workers)
        self.max_skipped = float(max_skipped)
        self.skipped: dict[str, tuple[str, int]] = {}
        self._resumed: tuple[int, dict[str, tuple[str, int]]] = (-1, {})  # (epoch, skipped) before a resume
        self._warned: set[str] = set()
        kwargs = {}
        if self.workers > 0:
            kwargs = dict(persistent_workers=True, worker_init_fn=parallel.worker_init(stream=True), prefetch_factor=prefetch_factor or 2,
                          multiprocessing_context=multiprocessing_context or parallel.context())
        # Its own generator: a DataLoader draws a seed from the global torch RNG whenever it
        # starts iterating, which would shift dropout's random stream between a run and its
        # resumed copy. The streams seed themselves; this seed is unused by them.
        self.loader = DataLoader(dataset, batch_size=None, num_workers=self.workers, pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(0), **kwargs)
        # Before multiprocessing's own exit handler, which would wait for workers that ignore SIGTERM.
        self._finalizer = weakref.finalize(self, parallel.stop_workers, self.loader)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Call before iterating an epoch (persistent workers read it when the epoch starts);
        ``start_step``: the first batch to yield (a resumed epoch skips the ones before)."""
        self.skipped = dict(self._resumed[1]) if epoch == self._resumed[0] else {}
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch, start_step)

    def resume_skipped(self, epoch: int, skipped: dict) -> None:
        """Shards this rank had skipped in ``epoch`` before an interruption (path -> (reason,
        samples)): counted again, and skipped again by the workers. Call before the first
        iteration (the workers get the list when they start)."""
        self._resumed = (int(epoch), {path: tuple(value) for path, value in skipped.items()})
        self._warned |= set(skipped)
        self.dataset.preskipped = (int(epoch), tuple(skipped))

    @property
    def steps(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:  # starts the (persistent) workers the first time
            if ERROR in batch:
                raise MaskdistError(batch[ERROR])
            if RESUME_PADDING in batch:
                continue
            skipped = batch.pop(SKIPPED, None)
            if skipped:
                self._note_skipped(skipped)
            yield batch

    def _note_skipped(self, skipped: list[tuple[str, str, int]]) -> None:
        for path, reason, samples in skipped:
            if path in self.skipped:
                continue
            self.skipped[path] = (reason, samples)
            if path not in self._warned:
                self._warned.add(path)
                log.warning("warning: skipping shard %s for the rest of the epoch (%d samples): %s", path, samples, reason)
        lost = sum(n for _reason, n in self.skipped.values())
        total = getattr(self.dataset, "samples", 0)
        if total and lost > self.max_skipped * total:
            raise MaskdistError(
                f"skipped shards hold {lost} of the epoch's {total} samples, more than --max-skipped {self.max_skipped:g}"
                f" ({', '.join(sorted(self.skipped)[:5])}{' ...' if len(self.skipped) > 5 else ''}): check the set with"
                " `maskdist shards verify`, re-copy or rebuild it, or raise --max-skipped")

    def worker_pids(self) -> list[int]:
        """Process ids of the (started) workers, for monitoring."""
        iterator = getattr(self.loader, "_iterator", None)
        return [w.pid for w in getattr(iterator, "_workers", [])] if iterator is not None else []

    def close(self) -> None:
        """Stop the workers now (also done when the loader is collected, and at exit)."""
        self._finalizer()


def train_loader(shard_set: ShardSet | str, folds: Iterable[int] | None, batch_size: int, rank: int = 0,
                 world_size: int = 1, workers: int = 4, seed: int = 0, alpha: float = 0.0,
                 transform: Transform | str | None = "recipe", shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 extra: bool = True, pin_memory: bool = False, prefetch_factor: int | None = None,
                 multiprocessing_context=None, max_skipped: float = DEFAULT_MAX_SKIPPED) -> tuple[StreamLoader, int]:
    """The class-balanced training loader of one rank and its exact steps per epoch.

    ``folds``: training folds (None: all; see :func:`folds_except`); ``extra``: include
    outside samples. ``batch_size`` is per rank; every rank yields exactly
    ``steps = ceil(train_samples / (batch_size * world_size))`` full batches per epoch.
    ``rank``/``world_size`` are taken as given, never from the environment. ``transform``:
    a preset name, a :class:`~maskdist.transforms.Transform`, or None (decode only).
    Call ``loader.set_epoch(epoch)`` before each epoch (``set_epoch(epoch, step)`` to resume
    inside it). An unreadable or damaged shard is skipped for the rest of the epoch and
    recorded in ``loader.skipped``; ``max_skipped`` (a fraction of the epoch's samples) bounds
    what may be skipped before the loader raises.
    """
    _check_split_args(batch_size, rank, world_size, workers)
    shard_set, transform = _as_shard_set(shard_set), _as_transform(transform)
    check_stored_size(shard_set, transform)
    dataset = TrainStream(shard_set, folds, batch_size, rank, world_size, seed, alpha, transform, shuffle_buffer, extra=extra)
    loader = StreamLoader(dataset, workers, pin_memory, prefetch_factor, multiprocessing_context, max_skipped)
    return loader, dataset.steps


def eval_shards(shard_set: ShardSet, fold: int | str) -> tuple[list[dict], tuple[str, ...]]:
    """Shards and label fields of a fold (its competition samples) or of ``"eval"``."""
    if isinstance(fold, str) and fold == "eval":
        shards = shard_set.shards("eval")
        if not shards and shard_set.manifest.get("totals", {}).get("eval", 0):
            raise MaskdistError("the manifest counts eval samples but lists no eval shard: rebuild the set")
        return shards, EVAL_BATCH_FIELDS
    return shard_set.shards("train", [shard_set.check_fold(fold)], extra=False), TRAIN_BATCH_FIELDS


def eval_loader(shard_set: ShardSet | str, fold: int | str, batch_size: int, rank: int = 0, world_size: int = 1,
                workers: int = 2, transform: Transform | str | None = "none", pin_memory: bool = False,
                prefetch_factor: int | None = None, multiprocessing_context=None) -> StreamLoader:
    """The evaluation loader of one rank over fold ``fold`` or ``"eval"``: every sample
    exactly once across ranks and workers; ``len(loader)`` is this rank's batch count and
    ``loader.dataset.samples`` its sample count (they differ between ranks)."""
    _check_split_args(batch_size, rank, world_size, workers)
    shard_set, transform = _as_shard_set(shard_set), _as_transform(transform)
    check_stored_size(shard_set, transform)
    shards, fields = eval_shards(shard_set, fold)
    dataset = EvalStream(shard_set, shards, fields, batch_size, rank, world_size, transform, workers)
    return StreamLoader(dataset, workers, pin_memory, prefetch_factor, multiprocessing_context)
