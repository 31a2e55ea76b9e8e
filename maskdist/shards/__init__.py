"""Shard sets: the format, tar I/O, the manifest, building and checking.

=========== ====================================================================
module      one job
=========== ====================================================================
``format``  file names, member extensions, key formats, sample schema, shard paths
``opener``  open files of a set wherever it lives (``webdataset.gopen``), retries
``tario``   the strict tar reader, samples from tar members, the tar writer
``manifest`` ``manifest.json`` and :class:`ShardSet`: what readers trust
``build``   ``shards build`` and its report
``detectors`` face detectors that ship their weights, loaded by name
``crop``    the face crop: policy, placement, detection cache, what a build counts
``check``   ``shards inspect`` and ``shards verify``
=========== ====================================================================

Readers (the streaming loader) import only ``format``, ``opener``, ``tario`` and
``manifest``; the names below are loaded on first use, so importing this package costs
nothing for them.
"""
from __future__ import annotations

from maskdist.system.exports import lazy_exports

_EXPORTS = {
    "build_shards": "build", "BuildReport": "report", "parse_image_size": "build", "DEFAULT_IMAGE_SIZE": "build",
    "inspect_shards": "check", "describe_inspect": "check", "verify_shards": "check", "VerifyResult": "check",
    "ShardSet": "manifest", "open_shard_set": "manifest",
    "TarReader": "tario", "ShardFormatError": "format", "ShardReadError": "opener", "RetryPolicy": "opener",
    "split_key": "format",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
