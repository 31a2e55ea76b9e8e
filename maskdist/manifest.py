"""Moved: :mod:`maskdist.shards.manifest` (``ShardSet``, ``open_shard_set``). This name keeps
working for code written before the ``maskdist.shards`` package, with a DeprecationWarning."""
from __future__ import annotations

import warnings

from maskdist.shards.format import EXTRA, FORMAT, FORMAT_VERSION, MANIFEST, REPORT  # noqa: F401
from maskdist.shards.manifest import ShardSet, check_manifest, open_shard_set, read_manifest_text  # noqa: F401
from maskdist.shards.opener import ShardReadError  # noqa: F401

warnings.warn("maskdist.manifest moved to maskdist.shards.manifest: import ShardSet and open_shard_set from there",
              DeprecationWarning, stacklevel=2)
