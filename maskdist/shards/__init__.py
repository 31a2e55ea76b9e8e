"""Shard sets: the format, tar I/O, the manifest, building and checking.

=========== ====================================================================
module      one job
=========== ====================================================================
``format``  file names, member extensions, key formats, sample schema, shard paths
``opener``  open files of a set wherever it lives (``webdataset.gopen``), retries
``tario``   the strict tar reader, samples from tar members, the tar writer
``manifest`` ``manifest.json`` and :class:`ShardSet`: what readers trust
``build``   ``shards build`` and its report
``check``   ``shards inspect`` and ``shards verify``
=========== ====================================================================

Readers (the streaming loader) import only ``format``, ``opener``, ``tario`` and
``manifest``; the names below are loaded on first use, so importing this package costs
nothing for them.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_shards": "build", "BuildReport": "build", "parse_image_size": "build", "DEFAULT_IMAGE_SIZE": "build",
    "inspect_shards": "check", "describe_inspect": "check", "verify_shards": "check", "VerifyResult": "check",
    "ShardSet": "manifest", "open_shard_set": "manifest",
    "TarReader": "tario", "ShardFormatError": "format", "ShardReadError": "opener", "RetryPolicy": "opener",
    "split_key": "format",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'maskdist.shards' has no attribute {name!r}")
    return getattr(importlib.import_module(f"maskdist.shards.{module}"), name)
