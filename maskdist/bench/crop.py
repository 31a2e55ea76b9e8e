"""``maskdist bench crop``: the face detectors side by side, on real photos with drawn masks.

The photos are real faces that ship inside scikit-image's wheel (``data.astronaut()`` and
``data.camera()``), placed into 384x512 frames as the competition's photos are (three
placements each), without a mask, with three easy masks (over the nose, light or grey) and
five hard ones (pulled up to the eyes, black, in a dark photo, rotated 20 degrees), plus photos
without any face. Each face was annotated by hand: its box, its head (hair included) and the
drawn mask's polygon.

For each installed detector: photos/s on one core at full size and at half size, against the
shard build's own work on the same photo (decode, resize to 224x224, encode) measured in the
same run; faces found per group (a face counts when the best box scoring at least the
detector's minimum has its centre inside the annotated face); detections on the photos
without a face; and the boxes' agreement (IoU) between detectors. Times are medians of
alternating rounds, so load from other work falls on every detector alike. Then, for each margin, how
much of the drawn mask and of the head the crop keeps, and how much of the crop the face fills.
Optionally the same on ``maskdist synth``'s drawn faces (``synth``: a synth folder).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from maskdist.data import images, labels, layout
from maskdist.errors import MaskdistError
from maskdist.shards import crop, detectors

WIDTH, HEIGHT = 384, 512
MARGINS = (0.2, 0.3, 0.4, 0.5, 0.6)

# Hand annotations in the 512x512 source photos: face box and head box (x0, y0, x1, y1), the
# eye, nose-tip and chin heights, and the face's left, centre and right x.
_SOURCES = {
    "astronaut": dict(face=(178, 58, 272, 172), head=(150, 15, 300, 176), eye=101, nose=129, chin=170, x=(180, 225, 270)),
    "camera": dict(face=(198, 112, 258, 196), head=(160, 65, 262, 198), eye=149, nose=168, chin=195, x=(200, 232, 258)),
}
# Where the face centre goes in the frame (x, y) and the face's width there, in pixels.
_PLACEMENTS = ((192, 225, 170), (130, 250, 150), (262, 200, 190))
# name, group, mask colour (RGB) or None, pulled up to the eyes, brightness, rotation (degrees)
_VARIANTS = (
    ("bare", "bare", None, False, 1.0, 0), ("white", "easy", (236, 236, 236), False, 1.0, 0),
    ("blue", "easy", (160, 204, 232), False, 1.0, 0), ("grey", "easy", (128, 128, 126), False, 1.0, 0),
    ("up-white", "hard", (236, 236, 236), True, 1.0, 0), ("up-black", "hard", (32, 32, 34), True, 1.0, 0),
    ("black", "hard", (32, 32, 34), False, 1.0, 0), ("dark", "hard", (160, 204, 232), False, 0.35, 0),
    ("rotated", "hard", (236, 236, 236), False, 1.0, 20),
)
GROUPS = ("bare", "easy", "hard")
_NO_FACE = ("coffee", "chelsea", "brick", "rocket", "grass")  # scikit-image photos without a human face


@dataclass
class Photo:
    name: str
    group: str  # bare, easy, hard, or none (no face)
    rgb: np.ndarray  # 512x384
    face: tuple | None = None  # annotated face box (x0, y0, x1, y1) in the frame
    head: tuple | None = None
    mask: np.ndarray | None = None  # bool (512, 384): the drawn mask's pixels


def _skimage():
    try:
        from skimage import data
    except ImportError:
        raise MaskdistError("bench crop draws its test photos from scikit-image's: pip install scikit-image") from None
    return data


def _mask_polygon(a: dict, up: bool) -> np.ndarray:
    left, cx, right = a["x"]
    w, h = right - left, a["chin"] - a["face"][1]
    top = a["eye"] + (0.3 if up else 0.6) * (a["nose"] - a["eye"])
    mid = (top + a["chin"]) / 2
    return np.array([(left, top), (cx, top - 0.03 * h), (right, top), (right - 0.05 * w, mid), (cx + 0.25 * w, a["chin"]),
                     (cx, a["chin"] + 0.05 * h), (cx - 0.25 * w, a["chin"]), (left + 0.05 * w, mid)], np.float64)


def _box_of(points: np.ndarray) -> tuple:
    return (float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max()))


def _corners(box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], np.float64)


def _moved(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.hstack([points, np.ones((len(points), 1))]) @ affine.T


def bench_photos() -> list[Photo]:
    """The benchmark's photos (deterministic): faces with drawn masks, and photos without a face."""
    data = _skimage()
    photos = []
    for source, a in _SOURCES.items():
        rgb = getattr(data, source)()
        rgb = cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB) if rgb.ndim == 2 else rgb
        face_w = a["face"][2] - a["face"][0]
        centre = ((a["face"][0] + a["face"][2]) / 2, (a["face"][1] + a["face"][3]) / 2)
        for p, (tx, ty, width) in enumerate(_PLACEMENTS):
            for name, group, colour, up, light, angle in _VARIANTS:
                src = rgb.copy()
                polygon = _mask_polygon(a, up)
                if colour is not None:
                    cv2.fillPoly(src, [np.round(polygon).astype(np.int32)], colour, cv2.LINE_AA)
                m = cv2.getRotationMatrix2D(centre, angle, width / face_w)
                m[:, 2] += (tx - centre[0], ty - centre[1])
                frame = cv2.warpAffine(src, m, (WIDTH, HEIGHT), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
                frame = cv2.convertScaleAbs(frame, alpha=light)

                drawn = None
                if colour is not None:
                    drawn = np.zeros((HEIGHT, WIDTH), np.uint8)
                    cv2.fillPoly(drawn, [np.round(_moved(polygon, m)).astype(np.int32)], 1)
                    drawn = drawn.astype(bool)
                photos.append(Photo(f"{source}-{p}-{name}", group, frame, _box_of(_moved(_corners(a["face"]), m)),
                                    _box_of(_moved(_corners(a["head"]), m)), drawn))
    for name in _NO_FACE:
        rgb = getattr(data, name)()
        rgb = cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB) if rgb.ndim == 2 else rgb
        photos.append(Photo(name, "none", cv2.resize(rgb, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)))
    return photos


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _xyxy(face: crop.Face) -> tuple:
    x, y, w, h = face.box
    return (x, y, x + w, y + h)


def _hit(face: crop.Face | None, photo: Photo, min_score: float) -> bool:
    if face is None or face.score < min_score or photo.face is None:
        return False
    x0, y0, x1, y1 = _xyxy(face)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return photo.face[0] <= cx <= photo.face[2] and photo.face[1] <= cy <= photo.face[3]


@dataclass
class DetectorRun:
    name: str
    version: str
    licence: str
    ms: dict = field(default_factory=dict)  # detect side -> ms per photo on one core
    found: dict = field(default_factory=dict)  # detect side -> {group: (found, of)}
    false_positives: dict = field(default_factory=dict)  # detect side -> photos without a face with a detection
    faces: dict = field(default_factory=dict)  # photo name -> face at full size
    synth: dict = field(default_factory=dict)  # detect side -> {mask part name: (found, of)}


@dataclass
class CropBench:
    photos: int
    prepare_ms: float  # the build's decode + resize + encode of one photo, same run
    runs: list[DetectorRun]
    agreement: dict  # "a / b" -> (mean IoU, min IoU, photos both found)
    margins: list[dict]  # per margin: mask kept (min, mean), head kept (min, mean), face share of the crop
    margin_detector: str = ""
    synth_images: int = 0
    rounds: int = 1

    def describe(self) -> str:
        sides = sorted({side for r in self.runs for side in r.ms}, reverse=True)
        lines = [f"{self.photos} test photos (384x512), medians of {self.rounds} alternating rounds; the build's decode + resize"
                 f" + encode: {self.prepare_ms:.1f} ms per photo",
                 "| detector | licence | detected at | ms / photo (1 core) | photos/s | x the build's own work | "
                 + " | ".join(f"found {g}" for g in GROUPS) + " | no-face photos with a face |",
                 "|" + "---|" * (6 + len(GROUPS) + 1)]
        for r in self.runs:
            for side in sides:
                found = " | ".join("{}/{}".format(*r.found[side][g]) for g in GROUPS)
                lines.append(f"| {r.name} {r.version} | {r.licence} | {side} px | {r.ms[side]:.1f} | {1000 / r.ms[side]:.0f} |"
                             f" {r.ms[side] / self.prepare_ms:.1f} | {found} | {r.false_positives[side]}/{len(_NO_FACE)} |")
        for pair, (mean, low, n) in self.agreement.items():
            lines.append(f"box agreement {pair}: mean IoU {mean:.3f}, lowest {low:.3f} ({n} photos both found)")
        if self.margins:
            lines += [f"margins (boxes of {self.margin_detector}, faces it found):",
                      "| margin | drawn mask kept (lowest / mean) | head kept (lowest / mean) | face's share of the crop |",
                      "|---|---|---|---|"]
            lines += [f"| {m['margin']} | {m['mask'][0]:.3f} / {m['mask'][1]:.3f} | {m['head'][0]:.3f} / {m['head'][1]:.3f} |"
                      f" {m['face_share']:.2f} |" for m in self.margins]
        if self.synth_images:
            lines.append(f"synthetic faces found ({self.synth_images} training photos of maskdist synth):")
            for r in self.runs:
                for side, found in r.synth.items():
                    lines.append(f"  {r.name} at {side} px: " + ", ".join(f"{part} {n}/{of}" for part, (n, of) in found.items()))
        return "\n".join(lines)


def _timed(detector: str, photos: list[Photo], side: int) -> tuple[float, dict]:
    policy = {"detector": detector, "detect_side": side}
    started = time.perf_counter()
    faces = {p.name: crop.detect_face(p.rgb, policy) for p in photos}
    return (time.perf_counter() - started) * 1000 / len(photos), faces


def _synth_photos(folder: Path, count: int) -> list[tuple[int, np.ndarray]]:
    table, _report = layout.read_train(folder / "train" if (folder / "train").is_dir() else folder)
    rows = table.sort_values(["person", "stem"]).head(count)
    return [(int(r.mask), images.decode_rgb(images.read_file(r.path))) for r in rows.itertuples(index=False)]


def bench_crop(margins=MARGINS, synth: str | Path | None = None, synth_images: int = 210, rounds: int = 3) -> CropBench:
    """The table of installed detectors (see the module docstring); times are medians of ``rounds``."""
    names = detectors.installed()
    if not names:
        raise MaskdistError(f"no face detector is installed: {detectors.spec(detectors.DEFAULT_DETECTOR).install}")
    photos = bench_photos()
    cv2.setNumThreads(1)  # one core, as in a build worker
    jpegs = [images.encode_jpeg(p.rgb, 92) for p in photos]

    def prepare_ms() -> float:
        started = time.perf_counter()
        for data in jpegs:
            images.prepare(data, (224, 224), 95)
        return (time.perf_counter() - started) * 1000 / len(photos)

    runs = [DetectorRun(name, detectors.version(name), detectors.spec(name).licence) for name in names]
    sides = (HEIGHT, crop.DEFAULT_DETECT_SIDE)  # the photo as it is, and at the size the build detects at
    baseline, timings = [], {}
    for _round in range(rounds):  # rounds alternate every timing, so load from elsewhere spreads over all
        baseline.append(prepare_ms())
        for run in runs:
            spec = detectors.spec(run.name)
            for side in sides:
                _timed(run.name, photos[:3], side)  # warm-up: first-call allocations
                ms, faces = _timed(run.name, photos, side)
                timings.setdefault((run.name, side), []).append(ms)
                run.ms[side] = statistics.median(timings[run.name, side])
                if _round:  # detections are the same every round: counted once
                    continue
                run.found[side] = {g: (sum(_hit(faces[p.name], p, spec.min_score) for p in photos if p.group == g),
                                       sum(p.group == g for p in photos)) for g in GROUPS}
                run.false_positives[side] = sum(1 for p in photos if p.group == "none" and faces[p.name] is not None
                                                and faces[p.name].score >= spec.min_score)
                if side == crop.DEFAULT_DETECT_SIDE:
                    run.faces = faces
    agreement = {}
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            both = [p for p in photos if _hit(a.faces[p.name], p, detectors.spec(a.name).min_score)
                    and _hit(b.faces[p.name], p, detectors.spec(b.name).min_score)]
            ious = [_iou(_xyxy(a.faces[p.name]), _xyxy(b.faces[p.name])) for p in both]
            agreement[f"{a.name} / {b.name}"] = (statistics.mean(ious) if ious else 0.0, min(ious, default=0.0), len(both))
    first = runs[0]
    rows = []
    found = [p for p in photos if _hit(first.faces[p.name], p, detectors.spec(first.name).min_score)]
    for margin in margins:
        mask_kept, head_kept, share = [], [], []
        for p in found:
            x0, y0, x1, y1 = crop.face_region(first.faces[p.name].box, HEIGHT, WIDTH, margin, 1.0)
            if p.mask is not None:
                mask_kept.append(float(p.mask[y0:y1, x0:x1].sum() / max(1, p.mask.sum())))
            hx0, hy0, hx1, hy1 = p.head
            inter = max(0.0, min(hx1, x1) - max(hx0, x0)) * max(0.0, min(hy1, y1) - max(hy0, y0))
            head_kept.append(inter / ((hx1 - hx0) * (hy1 - hy0)))
            fx0, fy0, fx1, fy1 = p.face
            share.append((fx1 - fx0) * (fy1 - fy0) / ((x1 - x0) * (y1 - y0)))
        rows.append({"margin": margin, "mask": (min(mask_kept, default=0.0), statistics.mean(mask_kept) if mask_kept else 0.0),
                     "head": (min(head_kept, default=0.0), statistics.mean(head_kept) if head_kept else 0.0),
                     "face_share": statistics.mean(share) if share else 0.0})
    count = 0
    if synth is not None:
        drawn = _synth_photos(Path(synth), synth_images)
        count = len(drawn)
        for run, side in ((run, side) for run in runs for side in sides):
            min_score = detectors.spec(run.name).min_score
            policy = {"detector": run.name, "detect_side": side}
            found = {}
            for part in range(3):
                of = [rgb for mask, rgb in drawn if mask == part]
                faces = [crop.detect_face(rgb, policy) for rgb in of]
                found[labels.MASK_NAMES[part]] = (sum(f is not None and f.score >= min_score for f in faces), len(of))
            run.synth[side] = found
    return CropBench(len(photos), statistics.median(baseline), runs, agreement, rows, first.name, count, rounds)
