"""Load a shard set's ``manifest.json`` and resolve its shards to paths, URLs or pipe commands.

A shard set lives at a *location*, one of:

* a local folder (or its ``manifest.json``),
* an ``http://`` / ``https://`` URL of the folder,
* a webdataset-style ``pipe:CMD`` where ``{}`` in CMD stands for the path inside the set
  (e.g. ``pipe:aws s3 cp s3://bucket/set/{} -``).

Paths inside the manifest are relative to the set, so the same manifest works at every
location. :func:`open_shard_set` is what readers (``shards inspect/verify``, the streaming
loader) call; :meth:`ShardSet.urls` gives the shard list to hand to ``webdataset``.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

from maskdist.errors import MaskdistError

FORMAT = "maskdist-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
EXTRA = "extra"  # the fold name of outside samples in paths and totals
_HTTP_TIMEOUT_S = 60
_PIPE_TAIL = 1 << 20  # bytes a finished reader may leave unread in a pipe


class ShardReadError(Exception):
    """A shard (or the manifest) could not be read from its location."""


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _is_pipe(location: str) -> bool:
    return location.startswith("pipe:")


@dataclass
class ShardSet:
    """A loaded manifest plus where its files live."""

    location: str  # as given: folder, URL, or pipe: template
    manifest: dict

    # --- where things are ---------------------------------------------------------------

    @property
    def kind(self) -> str:
        return "pipe" if _is_pipe(self.location) else "http" if _is_url(self.location) else "local"

    def url(self, relpath: str) -> str:
        """The path / URL / pipe command of a file inside the set, for ``webdataset``."""
        return _resolve(self.location, relpath)

    @contextlib.contextmanager
    def open(self, relpath: str) -> Iterator[IO[bytes]]:
        """A binary stream of a file inside the set; raises ShardReadError if unreadable."""
        with _open(self.location, relpath) as stream:
            yield stream

    # --- what is there ------------------------------------------------------------------

    @property
    def folds(self) -> int:
        return int(self.manifest["folds"])

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
                is_extra = shard["fold"] == -1
                if is_extra and not extra:
                    continue
                if not is_extra and fold_set is not None and shard["fold"] not in fold_set:
                    continue
                if class_set is not None and shard["class"] not in class_set:
                    continue
            out.append(shard)
        return out

    def urls(self, split: str = "train", folds: Iterable[int] | None = None, classes: Iterable[int] | None = None, extra: bool = True) -> list[str]:
        """Shard URLs (absolute paths, http URLs or pipe commands) of a selection."""
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


def _resolve(location: str, relpath: str) -> str:
    if _is_pipe(location):
        return location.replace("{}", relpath)
    if _is_url(location):
        return location.rstrip("/") + "/" + relpath
    return str((Path(location) / relpath).resolve())


@contextlib.contextmanager
def _open(location: str, relpath: str) -> Iterator[IO[bytes]]:
    target = _resolve(location, relpath)
    if _is_pipe(location):
        proc = subprocess.Popen(target[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        finished = False
        try:
            yield proc.stdout
            # Read the little that may follow the tar's end (record padding) so the command
            # can finish, and judge it by its exit status. A reader that stopped early (more
            # than that left) is not an error: the command is stopped instead.
            left = 0
            while left <= _PIPE_TAIL:
                block = proc.stdout.read(1 << 16)
                if not block:
                    finished = True
                    break
                left += len(block)
        finally:
            if not finished:
                proc.kill()
            proc.stdout.close()
            err = proc.stderr.read().decode("utf-8", "replace").strip()
            proc.stderr.close()
            rc = proc.wait()
        if finished and rc != 0:
            tail = err.splitlines()[-1] if err else ""
            raise ShardReadError(f"`{target[len('pipe:'):]}` exited with status {rc}" + (f": {tail}" if tail else ""))
    elif _is_url(location):
        try:
            response = urllib.request.urlopen(target, timeout=_HTTP_TIMEOUT_S)  # noqa: S310 (http(s) only)
        except urllib.error.HTTPError as err:
            raise ShardReadError(f"{target}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError) as err:
            raise ShardReadError(f"{target}: {getattr(err, 'reason', err)}") from None
        with response:
            yield response
    else:
        try:
            stream = open(target, "rb")
        except OSError as err:
            raise ShardReadError(f"{target}: {err.strerror or err}") from None
        with stream:
            yield stream


def _base_location(path_or_url: str | os.PathLike) -> str:
    location = os.fspath(path_or_url)
    if _is_pipe(location):
        if "{}" not in location:
            raise MaskdistError(f"{location}: a pipe: shard location needs {{}} where the path inside the set goes, e.g. `pipe:cat /data/set/{{}}`")
        return location
    if _is_url(location):
        return location[: -len(MANIFEST)] if location.endswith("/" + MANIFEST) else location
    path = Path(location)
    return str(path.parent) if path.name == MANIFEST and path.is_file() else str(path)


def read_manifest_text(location: str) -> str:
    try:
        with _open(location, MANIFEST) as stream:
            return stream.read().decode("utf-8")
    except ShardReadError as err:
        raise MaskdistError(f"{_resolve(location, MANIFEST)} not found ({err}): build it with `maskdist shards build`") from None
    except UnicodeDecodeError:
        raise MaskdistError(f"{_resolve(location, MANIFEST)} is not UTF-8 text: rebuild the set with `maskdist shards build`") from None


def open_shard_set(path_or_url: str | os.PathLike) -> ShardSet:
    """Load the manifest of a shard set at a folder, http(s) URL or ``pipe:`` template."""
    location = _base_location(path_or_url)
    where = _resolve(location, MANIFEST)
    text = read_manifest_text(location)
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise MaskdistError(f"{where} is not valid JSON ({err}): rebuild the set with `maskdist shards build`") from None
    check_manifest(manifest, where)
    return ShardSet(location, manifest)


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
        if not isinstance(path, str) or path.startswith("/") or ".." in path.split("/"):
            raise MaskdistError(f"{where}: shard path {path!r} must be relative and inside the set: rebuild the set")
