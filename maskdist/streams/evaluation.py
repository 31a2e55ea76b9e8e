"""The evaluation plan and stream: every sample of a fold (or of the eval split) exactly once
across ranks and workers, in batches that keep their keys.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from torch.utils.data import IterableDataset

from maskdist.data.transforms import Transform
from maskdist.errors import MaskdistError
from maskdist.shards.format import EVAL_BATCH_FIELDS, TRAIN_BATCH_FIELDS, ShardFormatError
from maskdist.shards.manifest import ShardSet
from maskdist.streams.samples import ERROR, collate, read_shard
from maskdist.streams.selection import current_worker

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
                 rank: int, world_size: int, transform: Transform, workers: int, channels_last: bool = False):
        super().__init__()
        self.channels_last = bool(channels_last)
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
        worker, workers = current_worker()
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
                    yield collate(pending, self.transform, self.fields, self.channels_last)
                    pending = []
            if index != end:  # the split is exact only if the manifest counts are
                raise ShardFormatError(f"{shard['path']}: the manifest lists {n} samples, the shard holds a different number")
        if pending:
            yield collate(pending, self.transform, self.fields, self.channels_last)


def eval_shards(shard_set: ShardSet, fold: int | str) -> tuple[list[dict], tuple[str, ...]]:
    """Shards and label fields of a fold (its competition samples) or of ``"eval"``."""
    if isinstance(fold, str) and fold == "eval":
        shards = shard_set.shards("eval")
        if not shards and shard_set.manifest.get("totals", {}).get("eval", 0):
            raise MaskdistError("the manifest counts eval samples but lists no eval shard: rebuild the set")
        return shards, EVAL_BATCH_FIELDS
    return shard_set.shards("train", [shard_set.check_fold(fold)], extra=False), TRAIN_BATCH_FIELDS
