"""What one rank and worker read: seeds derived from (seed, rank, worker, epoch), the
training folds, class mixing probabilities, and the checks every loader makes first.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from torch.utils.data import get_worker_info

from maskdist.data.transforms import Transform, build_transform
from maskdist.errors import MaskdistError
from maskdist.shards.manifest import ShardSet, open_shard_set

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


def as_shard_set(shard_set: ShardSet | str) -> ShardSet:
    return shard_set if isinstance(shard_set, ShardSet) else open_shard_set(shard_set)


def as_transform(transform: Transform | str | None) -> Transform:
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


def current_worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def check_split_args(batch_size: int, rank: int, world_size: int, workers: int) -> None:
    if int(batch_size) < 1:
        raise MaskdistError(f"batch size {batch_size} must be 1 or more")
    if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
        raise MaskdistError(f"rank {rank} / world size {world_size}: expected 0 <= rank < world size")
    if int(workers) < 0:
        raise MaskdistError(f"workers {workers} must be 0 or more")
