"""The class-balanced training stream: an infinite stream per class, mixed by n_c ** alpha,
shuffled, cut into exactly ``steps`` batches per rank per epoch; damaged shards skipped and
counted. See the package docstring for the guarantees.
"""
from __future__ import annotations

import bisect
import math
import multiprocessing
import random
from collections.abc import Iterable, Iterator, Sequence

from torch.utils.data import IterableDataset

from maskdist.data.transforms import Transform
from maskdist.errors import MaskdistError
from maskdist.shards.format import TRAIN_BATCH_FIELDS, ShardFormatError
from maskdist.shards.manifest import ShardSet
from maskdist.shards.opener import ShardReadError
from maskdist.streams.samples import ERROR, RESUME_PADDING, SKIPPED, BadSample, BatchBuilder, read_shard
from maskdist.streams.selection import class_probabilities, current_worker, derive_seed

DEFAULT_MAX_SKIPPED = 0.05
DEFAULT_SHUFFLE_BUFFER = 1000

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


class TrainStream(IterableDataset):
    """Class-balanced infinite stream, cut into exactly ``steps`` batches per rank per epoch.

    Build it with :func:`train_loader`; it can also be iterated directly (one process).
    """

    def __init__(self, shard_set: ShardSet, folds: Iterable[int] | None, batch_size: int, rank: int,
                 world_size: int, seed: int, alpha: float, transform: Transform, shuffle_buffer: int,
                 extra: bool = True, channels_last: bool = False):
        super().__init__()
        self.shard_set = shard_set
        self.folds = None if folds is None else sorted(int(f) for f in folds)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.alpha = int(seed), float(alpha)
        self.transform, self.shuffle_buffer, self.extra = transform, int(shuffle_buffer), bool(extra)
        self.channels_last = bool(channels_last)
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
        worker, workers = current_worker()
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
        builder = BatchBuilder(self.batch_size, self.transform, TRAIN_BATCH_FIELDS, self.channels_last)
        while len(builder.keys) < self.batch_size:
            sample = next(samples)
            try:
                builder.add(sample)
            except BadSample as err:
                if err.shard is None:
                    raise
                health.mark(err.shard, str(err))
        return builder.batch()
