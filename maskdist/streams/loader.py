"""``StreamLoader``: a torch DataLoader over a stream, with ``set_epoch``, an exact ``len``,
worker errors and a worker's death as one-line MaskdistErrors and the record of skipped shards; and the two
factories the training loop calls, :func:`train_loader` and :func:`eval_loader`.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from maskdist.data.transforms import Transform
from maskdist.errors import MaskdistError
from maskdist.shards.manifest import ShardSet
from maskdist.streams.evaluation import EvalStream, eval_shards
from maskdist.streams.samples import ERROR, RESUME_PADDING, SKIPPED
from maskdist.streams.selection import as_shard_set, as_transform, check_split_args, check_stored_size
from maskdist.streams.training import DEFAULT_MAX_SKIPPED, DEFAULT_SHUFFLE_BUFFER, TrainStream
from maskdist.system import parallel
from maskdist.system.worker_death import guarded

# --- loaders --------------------------------------------------------------------------------

log = logging.getLogger(__name__)


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
                 prefetch_factor: int | None = None, multiprocessing_context=None, max_skipped: float = DEFAULT_MAX_SKIPPED,
                 persistent: bool = True, name: str = "training"):
        self.dataset = dataset
        self.name = name  # in the line that reports a dead worker: training, validation, prediction
        self.workers = int(workers)
        self.prefetch_factor = (prefetch_factor or 2) if self.workers > 0 else 0
        self.max_skipped = float(max_skipped)
        self.skipped: dict[str, tuple[str, int]] = {}
        self._resumed: tuple[int, dict[str, tuple[str, int]]] = (-1, {})  # (epoch, skipped) before a resume
        self._warned: set[str] = set()
        kwargs = {}
        if self.workers > 0:
            kwargs = dict(persistent_workers=persistent, worker_init_fn=parallel.worker_init(stream=True), prefetch_factor=self.prefetch_factor,
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
        for batch in guarded(self.loader, self.name):  # starts the (persistent) workers the first time
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


SHARED_MEMORY = "/dev/shm"  # where worker processes build their batches (torch's shared tensors)


def shared_memory_bytes(loader: StreamLoader) -> int:
    """Bytes of batches a loader's workers hold in shared memory at once: each worker keeps
    ``prefetch_factor`` batches ready, and the main process uses one more (0 without workers
    or without a fixed batch size)."""
    size = getattr(loader.dataset.transform, "output_size", None)
    if not loader.workers or size is None:
        return 0
    return (loader.workers * loader.prefetch_factor + 1) * loader.dataset.batch_size * 3 * size[0] * size[1]


def check_shared_memory(loaders: Iterable[StreamLoader], processes: int = 1, path: str = SHARED_MEMORY) -> int:
    """Refuse in one line, before any worker starts, loaders whose batches do not fit in
    ``path`` (``processes``: training processes on this machine, each with these loaders);
    returns the bytes needed. Docker's default ``/dev/shm`` of 64 MB is far too small for a
    GPU's batches, and running out kills a worker with a bus error in the middle of an epoch.
    """
    import shutil

    need = int(processes) * sum(shared_memory_bytes(loader) for loader in loaders)
    if not need or not os.path.isdir(path):
        return need
    free = shutil.disk_usage(path).free
    if need > free:
        workers = "+".join(f"{loader.workers} workers x prefetch {loader.prefetch_factor}" for loader in loaders if loader.workers)
        raise MaskdistError(
            f"{path} has {free / 2**20:.0f} MB free, but the loaders' batches need about {need / 2**20:.0f} MB there"
            f" ({workers} per process, {processes} process(es) on this machine): give the container"
            " more shared memory (docker run --shm-size=16g, or --ipc=host), or lower --workers / --val-workers / --batch-size")
    return need


def train_loader(shard_set: ShardSet | str, folds: Iterable[int] | None, batch_size: int, rank: int = 0,
                 world_size: int = 1, workers: int = 4, seed: int = 0, alpha: float = 0.0,
                 transform: Transform | str | None = "recipe", shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 extra: bool = True, pin_memory: bool = False, prefetch_factor: int | None = None,
                 multiprocessing_context=None, max_skipped: float = DEFAULT_MAX_SKIPPED,
                 channels_last: bool = False) -> tuple[StreamLoader, int]:
    """The class-balanced training loader of one rank and its exact steps per epoch.

    ``folds``: training folds (None: all; see :func:`folds_except`); ``extra``: include
    outside samples. ``batch_size`` is per rank; every rank yields exactly
    ``steps = ceil(train_samples / (batch_size * world_size))`` full batches per epoch.
    ``rank``/``world_size`` are taken as given, never from the environment. ``transform``:
    a preset name, a :class:`~maskdist.data.transforms.Transform`, or None (decode only).
    Call ``loader.set_epoch(epoch)`` before each epoch (``set_epoch(epoch, step)`` to resume
    inside it). An unreadable or damaged shard is skipped for the rest of the epoch and
    recorded in ``loader.skipped``; ``max_skipped`` (a fraction of the epoch's samples) bounds
    what may be skipped before the loader raises. ``channels_last``: batches NHWC in memory
    (for a channels_last model on CUDA; the shape stays NCHW).
    """
    check_split_args(batch_size, rank, world_size, workers)
    shard_set, transform = as_shard_set(shard_set), as_transform(transform)
    check_stored_size(shard_set, transform)
    dataset = TrainStream(shard_set, folds, batch_size, rank, world_size, seed, alpha, transform, shuffle_buffer, extra=extra,
                          channels_last=channels_last)
    loader = StreamLoader(dataset, workers, pin_memory, prefetch_factor, multiprocessing_context, max_skipped)
    return loader, dataset.steps


def eval_loader(shard_set: ShardSet | str, fold: int | str, batch_size: int, rank: int = 0, world_size: int = 1,
                workers: int = 2, transform: Transform | str | None = "none", pin_memory: bool = False,
                prefetch_factor: int | None = None, multiprocessing_context=None, channels_last: bool = False,
                persistent: bool = True) -> StreamLoader:
    """The evaluation loader of one rank over fold ``fold`` or ``"eval"``: every sample
    exactly once across ranks and workers; ``len(loader)`` is this rank's batch count and
    ``loader.dataset.samples`` its sample count (they differ between ranks). ``persistent``
    False: the workers start for each pass and exit after it (validation, once an epoch)."""
    check_split_args(batch_size, rank, world_size, workers)
    shard_set, transform = as_shard_set(shard_set), as_transform(transform)
    check_stored_size(shard_set, transform)
    shards, fields = eval_shards(shard_set, fold)
    dataset = EvalStream(shard_set, shards, fields, batch_size, rank, world_size, transform, workers, channels_last)
    return StreamLoader(dataset, workers, pin_memory, prefetch_factor, multiprocessing_context, persistent=persistent,
                        name="prediction" if fold == "eval" else "validation")
