"""The shard-set format in one place: file names, member extensions, key formats, the sample
schema and shard paths. Builders, readers, ``verify`` and the docs all follow these constants.

The full description is ``shards/README.md``.
"""
from __future__ import annotations

import re

from maskdist.errors import MaskdistError

FORMAT = "maskdist-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"

IMAGE_EXT = "jpg"
META_EXT = "json"
FIELDS = (IMAGE_EXT, META_EXT)  # the only members a sample has, and the only ones readers decode

EXTRA = "extra"  # the fold name of outside samples in paths, keys and manifest totals
EXTRA_FOLD = -1  # ... and their fold number in tables and sample metadata
UNKNOWN_AGE = -1  # an outside sample labelled by class only: its age in years is unknown
COMPETITION = "competition"  # the source of the competition's own samples ...
SOURCES = (COMPETITION, EXTRA)  # ... and of outside ones (EXTRA)

# The .json of a sample: field -> type.
TRAIN_SCHEMA = {"person": str, "id": str, "gender": int, "age": int, "mask": int, "label": int,
                "label_true": int, "fold": int, "source": str, "relpath": str}
EVAL_SCHEMA = {"row": int, "image_id": str, "relpath": str}
# With ``shards build --crop face``: the manifest's (and each model card's) crop policy, and the
# .json field of every sample with the face box, its score and the region stored. A set
# without them was built without a crop.
CROP = "crop"
FACE = "face"
# The fields the loaders put into batches (as int64 tensors).
TRAIN_BATCH_FIELDS = ("label", "label_true")
EVAL_BATCH_FIELDS = ("row",)


class ShardFormatError(MaskdistError):
    """A shard whose bytes do not match the format: not a plain ustar/pax tar as the writer makes
    them (bad header, unsupported member type, truncated), or a sample without its image or json."""


def fold_name(fold: int) -> str:
    """The name of a fold in paths and manifest totals: ``"0"``.. or ``"extra"``."""
    return EXTRA if fold == EXTRA_FOLD else str(fold)


def train_key(person: str, stem: str) -> str:
    return f"{person}/{stem}"


def extra_key(index: int) -> str:
    return f"{EXTRA}/{index:06d}"


def eval_key(row: int) -> str:
    """The key of the eval sample of info.csv row ``row``."""
    return f"eval/{row:06d}"


def shard_path(split: str, fold: int | None, cls: int | None, index: int) -> str:
    """A shard's path inside the set: ``train/fold{k}/c{cc}-{n}.tar``, ``train/extra/...``,
    ``eval/eval-{n}.tar``."""
    if split == "eval":
        return f"eval/eval-{index:06d}.tar"
    folder = EXTRA if fold == EXTRA_FOLD else f"fold{fold}"
    return f"train/{folder}/c{cls:02d}-{index:06d}.tar"


# Every path shard_path makes, and nothing else: a manifest is read from wherever the set
# lives, and a path goes into pipe: commands, so one that is not a shard path is refused.
SHARD_PATH = re.compile(r"(train/(fold\d+|extra)/c\d{2}|eval/eval)-\d{6}\.tar")
SKIP_CHUNK = 1 << 20  # bytes read at a time when data is read only to be skipped


def split_key(name: str) -> tuple[str, str] | None:
    """``"a/b/key.ext.more"`` -> ``("a/b/key", "ext.more")`` (webdataset's split: the extension
    starts at the first dot of the last path component); None without a key or a dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1:]
