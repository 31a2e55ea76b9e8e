"""Load a shard set's ``manifest.json`` and select its shards.

A shard set lives at a *location*, one of:

* a local folder (or its ``manifest.json``),
* an ``http://`` / ``https://`` URL of the folder,
* a webdataset-style ``pipe:CMD`` where ``{}`` in CMD stands for the path inside the set
  (e.g. ``pipe:aws s3 cp s3://bucket/set/{} -``),
* any other URL scheme ``webdataset.gopen`` opens (``gs://``, ``ais://``, ...).

Paths inside the manifest are relative to the set, so the same manifest works at every
location. :func:`open_shard_set` is what readers (``shards inspect/verify``, the streaming
loader) call; :meth:`ShardSet.urls` gives the shard list to hand to ``webdataset``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from maskdist.errors import MaskdistError
from maskdist.shards.format import EXTRA_FOLD, FORMAT, FORMAT_VERSION, MANIFEST, SHARD_PATH
from maskdist.shards.opener import ResumableStream, RetryPolicy, ShardReadError, is_pipe, is_url, location_kind, open_file, resolve


@dataclass
class ShardSet:
    """A loaded manifest plus where its files live and how reads of them retry."""

    location: str  # as given: folder, URL, or pipe: template
    manifest: dict
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    # --- where things are ---------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``local``, ``http``, ``pipe`` or ``url`` (another gopen scheme)."""
        return location_kind(self.location)

    def url(self, relpath: str) -> str:
        """The path / URL / pipe command of a file inside the set, for ``webdataset``."""
        return resolve(self.location, relpath)

    def open(self, relpath: str, size: int | None = None) -> ResumableStream:
        """A binary stream of a file inside the set (use it as a context manager); reads retry
        transient failures by the set's policy. ``size``: the byte count the file must have
        (a shard's manifest ``bytes``), so a stream that ends early is known to be short.
        Raises ShardReadError when the file cannot be read."""
        return open_file(self.location, relpath, size, self.retry)

    # --- what is there ------------------------------------------------------------------

    @property
    def folds(self) -> int:
        return int(self.manifest["folds"])

    def check_fold(self, fold, what: str = "fold") -> int:
        """``fold`` as an int, or MaskdistError when the set has no such fold."""
        try:
            k = int(fold)
        except (TypeError, ValueError):
            raise MaskdistError(f"{what} {fold!r}: expected a fold number") from None
        if not 0 <= k < self.folds:
            raise MaskdistError(f"{what} {k} does not exist: the shard set has folds 0..{self.folds - 1}")
        return k

    @property
    def age_cut(self) -> int:
        return int(self.manifest["age_cut"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def shards(
        self,
        split: str | None = None,
        folds: Iterable[int] | None = None,
        classes: Iterable[int] | None = None,
        extra: bool = True,
    ) -> list[dict]:
        """Manifest shard entries of a selection, in manifest order.

        ``split``: ``"train"``, ``"eval"`` or None (all). For training shards, ``folds``
        picks competition folds (None: all) and ``extra`` whether outside samples (fold
        -1, ``train/extra/``) are included; ``classes`` picks training classes (None: all).
        """
        fold_set = None if folds is None else {int(f) for f in folds}
        class_set = None if classes is None else {int(c) for c in classes}
        out = []
        for shard in self.manifest["shards"]:
            if split is not None and shard["split"] != split:
                continue
            if shard["split"] == "train":
                is_extra = shard["fold"] == EXTRA_FOLD
                if is_extra and not extra:
                    continue
                if not is_extra and fold_set is not None and shard["fold"] not in fold_set:
                    continue
                if class_set is not None and shard["class"] not in class_set:
                    continue
            out.append(shard)
        return out

    def urls(self, split: str = "train", folds: Iterable[int] | None = None, classes: Iterable[int] | None = None, extra: bool = True) -> list[str]:
        """Shard URLs (absolute paths, URLs or pipe commands) of a selection, in manifest
        order: what ``webdataset.WebDataset`` takes (see docs/shards.md for a recipe)."""
        return [self.url(s["path"]) for s in self.shards(split, folds, classes, extra)]

    def class_counts(self, folds: Iterable[int] | None = None, extra: bool = True) -> list[int]:
        """Training samples per class (training labels) over a selection of folds."""
        counts = [0] * self.num_classes
        for shard in self.shards("train", folds, None, extra):
            for c, n in enumerate(shard["class_counts"]):
                counts[c] += n
        return counts

    def samples(self, split: str | None = None, folds: Iterable[int] | None = None, classes: Iterable[int] | None = None, extra: bool = True) -> int:
        return sum(s["samples"] for s in self.shards(split, folds, classes, extra))


def _base_location(path_or_url: str | os.PathLike) -> str:
    location = os.fspath(path_or_url)
    if is_pipe(location):
        if "{}" not in location:
            raise MaskdistError(f"{location}: a pipe: shard location needs {{}} where the path inside the set goes, e.g. `pipe:cat /data/set/{{}}`")
        return location
    if is_url(location):
        return location[: -len(MANIFEST)] if location.endswith("/" + MANIFEST) else location
    path = Path(location)
    return str(path.parent) if path.name == MANIFEST and path.is_file() else str(path)


def read_manifest_text(location: str, retry: RetryPolicy | None = None) -> str:
    where = resolve(location, MANIFEST)
    try:
        with open_file(location, MANIFEST, None, retry) as stream:
            return stream.read().decode("utf-8")
    except ShardReadError as err:
        raise MaskdistError(f"{where} not found ({err}): build it with `maskdist shards build`") from None
    except UnicodeDecodeError:
        raise MaskdistError(f"{where} is not UTF-8 text: rebuild the set with `maskdist shards build`") from None


def open_shard_set(path_or_url: str | os.PathLike, retry: RetryPolicy | None = None) -> ShardSet:
    """Load the manifest of a shard set at a folder, URL or ``pipe:`` template; ``retry``:
    how reads of remote files retry (default :class:`RetryPolicy`)."""
    location = _base_location(path_or_url)
    where = resolve(location, MANIFEST)
    retry = retry or RetryPolicy()
    text = read_manifest_text(location, retry)
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise MaskdistError(f"{where} is not valid JSON ({err}): rebuild the set with `maskdist shards build`") from None
    check_manifest(manifest, where)
    return ShardSet(location, manifest, retry)


def check_manifest(manifest: dict, where: str) -> None:
    """Raise MaskdistError unless ``manifest`` has this format's shape."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MaskdistError(f"{where} is not a maskdist shard manifest: build the set with `maskdist shards build`")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise MaskdistError(
            f"{where} has format version {version}, this maskdist reads version {FORMAT_VERSION}: rebuild the set with this maskdist"
        )
    required = ("folds", "age_cut", "num_classes", "shards", "totals", "build", "image")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise MaskdistError(f"{where} lacks {', '.join(missing)}: rebuild the set with `maskdist shards build`")
    for index, shard in enumerate(manifest["shards"]):
        for key in ("path", "split", "fold", "class", "samples", "class_counts", "bytes", "sha256"):
            if key not in shard:
                raise MaskdistError(f"{where}: shard entry {index} lacks {key!r}: rebuild the set with `maskdist shards build`")
        path = shard["path"]
        if not isinstance(path, str) or not SHARD_PATH.fullmatch(path):
            raise MaskdistError(f"{where}: shard path {path!r} is not a shard path of this format"
                                " (train/fold<K>/c<CC>-<NNNNNN>.tar, ...): rebuild the set")
