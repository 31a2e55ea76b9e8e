"""Raw samples of one shard, and their decode straight into one uint8 NCHW batch.

The batch protocol between workers and the loader lives here too: a batch that carries a
worker's error, the shards it began to skip, or a placeholder of a resumed epoch.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

from maskdist.data.images import ImageError, check_jpeg_complete
from maskdist.data.labels import NUM_CLASSES
from maskdist.data.transforms import DecodeError, Transform
from maskdist.shards.format import IMAGE_EXT, META_EXT, TRAIN_BATCH_FIELDS, ShardFormatError
from maskdist.shards.manifest import ShardSet
from maskdist.shards.tario import iter_samples

ERROR = "__error__"  # a batch that carries a worker's error message instead of data
SKIPPED = "__skipped__"  # (path, reason, samples) of shards a worker began to skip, on the next batch
RESUME_PADDING = "__padding__"  # a placeholder batch that keeps a resumed epoch's batch order

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


def _uint8_batch(shape: tuple[int, int, int, int], channels_last: bool = False) -> torch.Tensor:
    """An empty uint8 NCHW batch; in a DataLoader worker it lives in shared memory from the
    start (as torch's own collate does), so handing it to the main process copies nothing.

    ``channels_last``: NHWC in memory (shape still NCHW): decoded images are HWC, so each
    slot is one plain copy, and on the device the batch is already in the layout of a
    channels_last model, with no conversion there.
    """
    n, c, h, w = shape
    memory = (n, h, w, c) if channels_last else shape
    if get_worker_info() is None:
        batch = torch.empty(memory, dtype=torch.uint8)
    else:
        storage = torch.UntypedStorage._new_shared(math.prod(memory))
        batch = torch.empty(0, dtype=torch.uint8).set_(storage).view(memory)
    return batch.permute(0, 3, 1, 2) if channels_last else batch


class BadSample(ShardFormatError):
    """A sample whose image or metadata does not decode; ``shard`` is its shard entry (or None)."""

    def __init__(self, message: str, shard: dict | None = None):
        super().__init__(message)
        self.shard = shard


class BatchBuilder:
    """Decodes raw samples straight into one uint8 NCHW batch (no per-image array and no
    stacking copy when the transform fixes the output size), with the json's label fields;
    ``channels_last``: the batch is NHWC in memory (see :func:`_uint8_batch`)."""

    def __init__(self, size: int, transform: Transform, fields: Sequence[str], channels_last: bool = False):
        self.transform, self.fields = transform, tuple(fields)
        out = transform.output_size
        self.images = _uint8_batch((size, 3, *out), channels_last) if out is not None else None
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


def collate(samples: list[dict], transform: Transform, fields: Sequence[str], channels_last: bool = False) -> dict:
    """Decode and transform raw samples into one uint8 NCHW batch with the json's ``fields``;
    a sample that does not decode raises BadSample (a ShardFormatError) naming its shard."""
    builder = BatchBuilder(len(samples), transform, fields, channels_last)
    for sample in samples:
        builder.add(sample)
    return builder.batch()
