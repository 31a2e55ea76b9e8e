"""Describe and check shard sets: ``shards inspect`` (from the manifest) and ``shards verify``
(every shard read back, local, http(s), ``pipe:`` or any gopen scheme, against the manifest).

Reading back never unpickles anything: only ``.jpg`` and ``.json`` members are decoded,
anything else is a problem.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from maskdist.data import images, labels
from maskdist.errors import MaskdistError
from maskdist.shards.crop import describe_crop
from maskdist.shards.format import (
    COMPETITION,
    CROP,
    EVAL_SCHEMA,
    EXTRA,
    EXTRA_FOLD,
    FIELDS,
    IMAGE_EXT,
    MANIFEST,
    META_EXT,
    SOURCES,
    TRAIN_SCHEMA,
    UNKNOWN_AGE,
    ShardFormatError,
    eval_key,
    fold_name,
    split_key,
)
from maskdist.shards.manifest import ShardSet, open_shard_set
from maskdist.shards.opener import ShardReadError
from maskdist.shards.report import human_bytes
from maskdist.shards.tario import REGULAR_TYPES, TarReader

# --- inspect -------------------------------------------------------------------------------


def inspect_shards(path_or_url: str | os.PathLike) -> dict:
    """The numbers ``shards inspect`` shows, from the manifest (for ``--json``)."""
    shard_set = open_shard_set(path_or_url)
    m = shard_set.manifest
    train = m["totals"]["train"]
    per_fold = {name: {"samples": sum(counts), "classes": counts,
                       "shards": len([s for s in m["shards"] if s["split"] == "train" and fold_name(s["fold"]) == name])}
                for name, counts in train.items()}
    class_totals = [sum(counts[c] for counts in train.values()) for c in range(m["num_classes"])]
    return {
        "location": shard_set.location,
        "format_version": m["format_version"],
        "folds": m["folds"], "age_cut": m["age_cut"], "num_classes": m["num_classes"],
        "image": m["image"], "build": m["build"],
        "train": per_fold,
        "train_classes": class_totals,
        "train_samples": sum(class_totals),
        "eval_samples": m["totals"]["eval"],
        "eval_shards": len([s for s in m["shards"] if s["split"] == "eval"]),
        "shards": len(m["shards"]),
        "bytes": sum(s["bytes"] for s in m["shards"]),
    } | ({CROP: m[CROP]} if CROP in m else {})


def describe_inspect(info: dict) -> str:
    """A readable table of :func:`inspect_shards`."""
    n = info["num_classes"]
    width = max(5, len(str(max(info["train_classes"] + [0]))) + 1)
    lines = [f"shard set {info['location']} (format {info['format_version']})"]
    lines.append(f"training samples per fold and class (training labels, old-age cut {info['age_cut']}):")
    lines.append(f"{'fold':>5} {'shards':>6} {'total':>7} | " + " ".join(f"{'c' + str(c):>{width}}" for c in range(n)))
    for name, row in info["train"].items():
        lines.append(f"{name:>5} {row['shards']:>6} {row['samples']:>7} | " + " ".join(f"{v:>{width}}" for v in row["classes"]))
    lines.append(f"{'all':>5} {sum(r['shards'] for r in info['train'].values()):>6} {info['train_samples']:>7} | "
                 + " ".join(f"{v:>{width}}" for v in info["train_classes"]))
    lines.append(f"eval: {info['eval_samples']} samples in {info['eval_shards']} shards")
    lines.append(f"total: {info['shards']} shards, {info['train_samples'] + info['eval_samples']} samples, {human_bytes(info['bytes'])}")
    image = info["image"]
    if image.get("short_side"):
        size = f"shorter side {image['short_side']}"
    elif image.get("size"):
        size = f"exactly {image['size'][0]}x{image['size'][1]} (aspect not kept)"
    else:
        size = "original size"
    shapes = ", ".join(f"{k} ({v})" for k, v in list(image.get("shapes", {}).items())[:3])
    lines.append(f"images: {image['format']} q{image.get('quality')}, {size}; most common HxW: {shapes}")
    build = info["build"]
    lines.append("build: " + ", ".join(f"{k}={v}" for k, v in build.items()))
    if info.get(CROP):
        lines += [line.removeprefix("  ") for line in describe_crop(info[CROP])]
    return "\n".join(lines)


# --- verify --------------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, raw):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.digest.update(data)
        self.bytes += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class VerifyResult:
    location: str
    quick: bool
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if self.ok:
            what = "sizes and hashes" if self.quick else "hashes, counts, images and metadata"
            return f"ok: {self.location}: {self.shards} shards, {self.samples} samples ({what} match the manifest)"
        return "\n".join(self.problems + [f"{len(self.problems)} problem(s) in {self.location}"])


def verify_shards(path_or_url: str | os.PathLike, quick: bool = False, progress: bool = False) -> VerifyResult:
    """Check every shard of a set against its manifest; problems name the shard.

    ``quick``: sizes and sha256 only. Otherwise also the samples: member names and
    extensions (only .jpg/.json), one image and one json per key, images decode, json fields
    valid and consistent with the shard, per-class counts, eval row order, and no person
    in two folds.
    """
    shard_set = open_shard_set(path_or_url)
    m = shard_set.manifest
    result = VerifyResult(location=shard_set.location, quick=quick)
    _check_totals(m, result.problems)
    person_folds: dict[str, set] = {}
    state = {"last_row": -1, "keys": set()}
    from tqdm import tqdm

    for entry in tqdm(m["shards"], unit="shard", desc="verify", disable=None if progress else True):
        result.shards += 1
        _verify_one(shard_set, entry, quick, result, person_folds, state)
    for person, fold_set in sorted(person_folds.items()):
        if len(fold_set) > 1:
            result.problems.append(f"person {person} is in folds {sorted(fold_set)}: a person must stay in one fold; rebuild the set")
    if shard_set.kind == "local":
        root = Path(shard_set.location)
        listed = {s["path"] for s in m["shards"]}
        for tar in sorted(root.rglob("*.tar")):
            rel = tar.relative_to(root).as_posix()
            if rel not in listed:
                result.problems.append(f"{rel}: shard on disk but not in {MANIFEST} (left over? remove it or rebuild)")
    return result


def _check_totals(m: dict, problems: list[str]) -> None:
    train: dict[str, list[int]] = {}
    eval_total = 0
    for s in m["shards"]:
        if s["split"] == "train":
            name = fold_name(s["fold"])
            counts = train.setdefault(name, [0] * m["num_classes"])
            for c, n in enumerate(s["class_counts"] or []):
                counts[c] += n
            if sum(s["class_counts"] or []) != s["samples"]:
                problems.append(f"{s['path']}: {MANIFEST} says {s['samples']} samples but its class counts sum to {sum(s['class_counts'] or [])}")
        else:
            eval_total += s["samples"]
    for name, counts in m["totals"]["train"].items():
        if counts != train.get(name, [0] * m["num_classes"]):
            problems.append(f"{MANIFEST}: totals of fold {name} {counts} disagree with its shards {train.get(name)}")
    if m["totals"]["eval"] != eval_total:
        problems.append(f"{MANIFEST}: eval total {m['totals']['eval']} disagrees with its shards ({eval_total})")


def _verify_one(shard_set: ShardSet, entry: dict, quick: bool, result: VerifyResult, person_folds: dict, state: dict) -> None:
    rel = entry["path"]
    problems = result.problems
    samples: list[dict] = []
    own: list[str] = []
    try:
        with shard_set.open(rel) as raw:
            reader = _HashingReader(raw)
            if not quick:
                try:
                    samples = _read_samples(reader, own)
                except ShardFormatError as err:
                    own.append(f"not a readable shard: {str(err).removeprefix(': ')}")
                except OSError as err:
                    own.append(f"not a readable tar ({type(err).__name__}: {err}); truncated or corrupt, rebuild or re-copy it")
            reader.drain()
    except ShardReadError as err:
        problems.append(f"{rel}: missing or unreadable ({err}): re-copy the set or rebuild it")
        return
    if reader.bytes != entry["bytes"]:
        own.insert(0, f"size {reader.bytes} bytes, {MANIFEST} says {entry['bytes']} (truncated or replaced)")
    if reader.digest.hexdigest() != entry["sha256"]:
        own.insert(0, f"sha256 {reader.digest.hexdigest()[:16]}... differs from {MANIFEST} ({entry['sha256'][:16]}...):"
                      " the shard was changed or damaged")
    if not quick:
        result.samples += len(samples)
        _check_samples(shard_set, entry, samples, own, person_folds, state)
    else:
        result.samples += entry["samples"]
    problems.extend(f"{rel}: {p}" for p in own)


def _read_samples(reader: _HashingReader, own: list[str]) -> list[dict]:
    """Samples of a tar stream: [{key, jpg: (h, w) or None, json: dict or None}]."""
    samples: list[dict] = []
    current: dict | None = None
    tar = TarReader(reader, "", seekable=False)  # the reader the stream uses: what passes here, it can read
    for name, typeflag, _size in tar:
        if typeflag not in REGULAR_TYPES:
            own.append(f"member {name!r} is not a regular file")
            continue
        parts = split_key(name)
        if parts is None:
            own.append(f"member {name!r} has no key.extension name")
            continue
        key, ext = parts
        if ext not in FIELDS:
            own.append(f"member {name!r}: unexpected field .{ext} (only .jpg and .json are allowed; not decoded)")
            continue
        data = tar.read()
        if current is None or current["key"] != key:
            current = {"key": key, IMAGE_EXT: None, META_EXT: None}
            samples.append(current)
        if current[ext] is not None:
            own.append(f"member {name!r} appears twice")
            continue
        if ext == IMAGE_EXT:
            try:
                current[IMAGE_EXT] = images.check_jpeg(data)
            except images.ImageError as err:
                own.append(f"{name}: image does not decode ({err})")
                current[IMAGE_EXT] = False
        else:
            try:
                current[META_EXT] = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                own.append(f"{name}: invalid JSON ({err})")
                current[META_EXT] = False
    return samples


def _check_samples(shard_set: ShardSet, entry: dict, samples: list[dict], own: list[str], person_folds: dict, state: dict) -> None:
    m = shard_set.manifest
    split = entry["split"]
    counts = [0] * m["num_classes"]
    for s in samples:
        key = s["key"]
        if key in state["keys"]:
            own.append(f"sample {key}: key used twice in the set")
        state["keys"].add(key)
        if s[IMAGE_EXT] is None:
            own.append(f"sample {key}: no .{IMAGE_EXT} member")
        if s[META_EXT] is None:
            own.append(f"sample {key}: no .{META_EXT} member")
        meta = s[META_EXT]
        if not isinstance(meta, dict):
            continue
        fields = TRAIN_SCHEMA if split == "train" else EVAL_SCHEMA
        bad = [f"{name} missing" if name not in meta else f"{name}={meta[name]!r} is not {kind.__name__}"
               for name, kind in fields.items()
               if name not in meta or not isinstance(meta[name], kind) or (kind is int and isinstance(meta[name], bool))]
        if bad:
            own.append(f"sample {key}: json fields invalid: {', '.join(bad)}")
            continue
        if split == "eval":
            if key != eval_key(meta["row"]):
                own.append(f"sample {key}: key does not match row {meta['row']}")
            if meta["row"] <= state["last_row"]:
                own.append(f"sample {key}: row {meta['row']} out of info.csv order (after row {state['last_row']})")
            state["last_row"] = meta["row"]
            continue
        why = _train_meta_problem(meta, key, entry, m["age_cut"])
        if why:
            own.append(f"sample {key}: {why}")
            continue
        counts[meta["label"]] += 1
        if meta["fold"] != EXTRA_FOLD:
            person_folds.setdefault(meta["person"], set()).add(meta["fold"])
    if len(samples) != entry["samples"]:
        own.append(f"{len(samples)} samples, {MANIFEST} says {entry['samples']}")
    if split == "train" and counts != entry["class_counts"] and len(samples) == entry["samples"]:
        own.append(f"class counts {counts} differ from {MANIFEST} {entry['class_counts']}")


def _train_meta_problem(meta: dict, key: str, entry: dict, age_cut: int) -> str | None:
    if meta["source"] not in SOURCES:
        return f"source {meta['source']!r} is not one of {', '.join(SOURCES)}"
    if (meta["source"] == EXTRA) != (entry["fold"] == EXTRA_FOLD):
        return f"source {meta['source']!r} in a {'train/extra' if entry['fold'] == EXTRA_FOLD else 'fold'} shard"
    if meta["fold"] != entry["fold"]:
        return f"fold {meta['fold']} in a shard of fold {entry['fold']}"
    if meta["label"] != entry["class"]:
        return f"label {meta['label']} in a shard of class {entry['class']}"
    if not (0 <= meta["mask"] <= 2 and 0 <= meta["gender"] <= 1 and 0 <= meta["label_true"] < labels.NUM_CLASSES):
        return "mask/gender/label_true out of range"
    if meta["age"] != UNKNOWN_AGE:
        try:
            label = labels.label_of(meta["mask"], meta["gender"], meta["age"], age_cut)
            label_true = labels.label_of(meta["mask"], meta["gender"], meta["age"])
        except MaskdistError as err:
            return str(err)
        if (label, label_true) != (meta["label"], meta["label_true"]):
            return (f"labels {meta['label']}/{meta['label_true']} disagree with mask {meta['mask']}, gender {meta['gender']},"
                    f" age {meta['age']} (expected {label}/{label_true} at age cut {age_cut}/60)")
    if meta["source"] == COMPETITION and not key.startswith(meta["person"] + "/"):
        return f"key does not start with its person {meta['person']!r}"
    return None
