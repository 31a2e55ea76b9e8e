"""A synthetic stand-in for the competition data, in exactly its layout (see DATA.md).

``write_dataset(out, ...)`` writes::

    OUT/train/train.csv              id,gender,race,age,path
    OUT/train/images/<path>/         mask1..mask5, incorrect_mask, normal (.jpg, a few .png/.jpeg)
    OUT/eval/info.csv                ImageID,ans (ans = 0)
    OUT/eval/images/<40-hex>.jpg
    OUT/eval_answers.csv             ImageID,ans with the true labels (never inside eval/)
    OUT/external/<nnnnnn>_<age>.jpg  only with external=N (no labels inside external/)
    OUT/external_answers.csv         file,ans,mask,gender,age (mask and gender as codes)
    OUT/synth.json                   parameters, person and per-class counts, planted quirks

The images are drawn faces: a mask cue (worn / pulled below the nose or onto the chin /
not worn), a noisy, overlapping gender cue (hair length, face width, brows, lips) and a
continuous age cue (grey hair, wrinkles, skin tone) driven by an *apparent* age that carries
per-person noise, so ages near 30 and 60 are genuinely hard. Each person has one consistent
appearance across their seven images. Everything is deterministic from ``seed``: person
traits come from ``default_rng([seed, kind, person])`` and each image from
``default_rng([seed, kind, person, image + 1])``, so the bytes do not depend on ``workers``.

The quirks of DATA.md are planted: mixed extensions, macOS ``._`` junk files, hidden
``.ipynb_checkpoints`` folders, a duplicated id and suffixed ids (from 20 people up).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from maskdist import labels as L
from maskdist import parallel
from maskdist.errors import MaskdistError

HEIGHT, WIDTH = 512, 384
IMAGES_PER_PERSON = len(L.STEMS)
EXTERNAL_SIZE = 256  # external images are square crops, as scraped photos would be

# Kinds of people; part of every RNG key so train, eval and external never share faces.
TRAIN, EVAL, EXTERNAL = 0, 1, 2

# People by (gender, age group) in the competition's training set (DATA.md).
_DEFAULT_COUNTS = {(0, 0): 549, (0, 1): 410, (0, 2): 83, (1, 0): 732, (1, 1): 817, (1, 2): 109}
_EVAL_FRACTION = 2 / 3

# Ages within a cell: heavy edges at 18..20 and 58..59 as in DATA.md.
_YOUNG_AGES = np.arange(18, 30)
_YOUNG_W = np.array([192, 407, 267] + [46] * 9, dtype=float)
_MID_AGES = np.arange(30, 60)
_MID_W = np.array([35] * 28 + [159, 85], dtype=float)

# Extension modes per person: all .jpg, all .png, all .jpeg, mixed.
_EXT_MODES = ("jpg", "png", "jpeg", "mixed")
_EXT_MODE_P = (0.95, 0.025, 0.015, 0.01)

# Mask colours (BGR) and patterns.
_MASK_COLOURS = (
    (238, 238, 236),  # white
    (232, 204, 160),  # surgical light blue
    (34, 32, 32),     # black
    (128, 128, 126),  # grey
    (92, 48, 28),     # navy
    (196, 178, 240),  # pink
    (172, 196, 214),  # beige
)
_MASK_COLOUR_P = (0.24, 0.3, 0.2, 0.08, 0.07, 0.05, 0.06)
PLAIN, PLEATS, STRIPES, DOTS = range(4)

_JUNK_HEAD = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "


# --- counts -------------------------------------------------------------------------------


def default_person_counts() -> dict[tuple[int, int], int]:
    """Training people by (gender, age_group) of the competition: 2,700 in all."""
    return dict(_DEFAULT_COUNTS)


def scaled_person_counts(total: int) -> dict[tuple[int, int], int]:
    """The default proportions scaled to ``total`` people (largest-remainder rounding).

    From 6 people up every (gender, age group) cell gets at least one person.
    """
    if total < 0:
        raise MaskdistError(f"invalid person count {total}: expected 0 or more")
    base = default_person_counts()
    keys = list(base)
    whole = sum(base.values())
    exact = np.array([base[k] * total / whole for k in keys])
    counts = np.floor(exact).astype(int)
    order = sorted(range(len(keys)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    if total >= len(keys):
        for i in range(len(keys)):
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return {k: int(c) for k, c in zip(keys, counts)}


def expected_class_counts(person_counts: dict[tuple[int, int], int]) -> list[int]:
    """Images per class (cut 60) that ``person_counts`` people with 7 images each give."""
    out = [0] * L.NUM_CLASSES
    for (gender, group), n in person_counts.items():
        for stem, mask in L.STEM_TO_MASK.items():
            out[L.encode(mask, gender, group)] += n
    return out


# --- appearance ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PersonTraits:
    """One person's fixed appearance. Colours are BGR (OpenCV order)."""

    gender: int
    age: int                 # true age in years (may exceed 60; the CSV records at most 60)
    apparent_age: float      # age plus per-person noise; drives every age cue
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]  # already mixed with grey
    grey: float              # 0..1 grey-hair fraction
    wrinkles: float          # 0..1
    hair_long: float         # 0 (short) .. 1 (shoulder length and beyond)
    fringe: float            # 0..1 how low the fringe falls
    bald: float              # 0..1 receding hairline
    face_w: float            # half width in px
    face_h: float            # half height in px
    eye_dx: float            # half distance between the eyes in px
    eye_r: float
    brow_t: int
    lips: tuple[float, float, float]
    shirt: tuple[float, float, float]
    glasses: bool
    masks: tuple[tuple[tuple[float, float, float], int], ...]  # five (colour, pattern)


def _clip01(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


def make_traits(rng: np.random.Generator, gender: int, age: int) -> PersonTraits:
    """Draw one person's appearance. Gender cues overlap (~80/20); age cues are noisy."""
    female = gender == 1
    apparent = float(age + rng.normal(0.0, 6.0))
    grey = _clip01((apparent - 42.0) / 30.0 + rng.normal(0.0, 0.12))
    wrinkles = _clip01((apparent - 28.0) / 40.0 + rng.normal(0.0, 0.1))
    # skin: light to darker, slightly duller and yellower with age
    t = rng.beta(2.0, 2.5)
    rgb = np.array([245, 212, 184]) * (1 - t) + np.array([186, 136, 102]) * t
    rgb = rgb + rng.normal(0.0, 6.0, 3)
    age_shift = _clip01((apparent - 20.0) / 60.0)
    rgb = rgb * (1 - 0.10 * age_shift) - np.array([0.0, 0.0, 14.0]) * age_shift
    skin = tuple(float(v) for v in np.clip(rgb[::-1], 0, 255))
    # hair: mostly black or dark brown, some brown, a few dyed; mixed with grey
    kind = rng.choice(3, p=(0.8, 0.15, 0.05))
    hair_rgb = (
        rng.uniform([18, 14, 10], [60, 44, 34]),
        rng.uniform([80, 52, 28], [110, 75, 45]),
        rng.uniform([130, 80, 40], [170, 110, 60]),
    )[kind]
    grey_rgb = np.array([196, 194, 190]) + rng.normal(0.0, 8.0)
    hair_rgb = hair_rgb * (1 - grey) + grey_rgb * grey
    hair = tuple(float(v) for v in np.clip(hair_rgb[::-1], 0, 255))
    long_p = 0.8 if female else 0.2
    hair_long = float(rng.uniform(0.55, 1.0) if rng.random() < long_p else rng.uniform(0.0, 0.35))
    bald = _clip01((apparent - 40.0) / 40.0 + rng.normal(0, 0.2)) if (not female and rng.random() < 0.5) else 0.0
    width = rng.normal(0.93 if female else 1.0, 0.055)
    face_w = float(96.0 * width)
    face_h = float(128.0 * rng.normal(0.99 if female else 1.01, 0.04))
    eye_dx = float(face_w * rng.uniform(0.36, 0.46))
    eye_r = float(rng.uniform(9.0, 13.0))
    brow_t = int(rng.choice([2, 3, 4, 5], p=(0.35, 0.4, 0.2, 0.05) if female else (0.05, 0.25, 0.4, 0.3)))
    lip_rgb = np.array(skin[::-1]) * 0.75 + (np.array([200, 70, 80]) * 0.25 if female and rng.random() < 0.8 else np.array([150, 90, 90]) * 0.25)
    lips = tuple(float(v) for v in np.clip(lip_rgb[::-1] + rng.normal(0, 5, 3), 0, 255))
    shirt = tuple(float(v) for v in rng.uniform(20, 235, 3))
    masks = []
    for _ in range(5):
        colour = np.array(_MASK_COLOURS[rng.choice(len(_MASK_COLOURS), p=_MASK_COLOUR_P)], dtype=float)
        colour = np.clip(colour + rng.normal(0.0, 7.0, 3), 0, 255)
        pattern = int(rng.choice(4, p=(0.45, 0.3, 0.15, 0.1)))
        masks.append((tuple(float(v) for v in colour), pattern))
    return PersonTraits(
        gender=gender, age=int(age), apparent_age=apparent, skin=skin, hair=hair, grey=grey,
        wrinkles=wrinkles, hair_long=hair_long, fringe=float(rng.uniform(0, 1)), bald=bald,
        face_w=face_w, face_h=face_h, eye_dx=eye_dx, eye_r=eye_r, brow_t=brow_t, lips=lips,
        shirt=shirt, glasses=bool(rng.random() < 0.15), masks=tuple(masks),
    )


_BANKS: list[tuple[np.ndarray, np.ndarray]] | None = None


def _noise_banks() -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed sensor-noise tiles (positive, negative parts) at three strengths; same in every process."""
    global _BANKS
    if _BANKS is None:
        rng = np.random.default_rng(20_240_601)
        banks = []
        for sigma in (2.0, 4.0, 7.0):
            noise = rng.normal(0.0, sigma, (HEIGHT + 32, WIDTH + 32, 3))
            banks.append((np.clip(noise, 0, 255).astype(np.uint8), np.clip(-noise, 0, 255).astype(np.uint8)))
        _BANKS = banks
    return _BANKS


def _background(rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # flat
        img = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        img[:] = rng.integers(30, 235, 3).astype(np.uint8)
        return img
    if kind in (1, 2):  # gradient
        a, b = rng.uniform(20, 240, 3), rng.uniform(20, 240, 3)
        ramp = np.linspace(0.0, 1.0, 16)[:, None] * (b - a) + a
        small = ramp[:, None, :] if kind == 1 else ramp[None, :, :]
        return cv2.resize(small.astype(np.uint8), (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
    small = np.clip(rng.uniform(40, 215, 3) + rng.normal(0, 35, (6, 5, 3)), 0, 255).astype(np.uint8)  # soft blobs
    return cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


def _shade(colour, factor: float) -> tuple[float, float, float]:
    return tuple(float(min(255.0, max(0.0, c * factor))) for c in colour)


def _draw_mask(img, rng, cx, cy, fw, fh, colour, pattern, top, bottom) -> None:
    """A mask from y=top (under the eyes when worn) to y=bottom, following the jaw."""
    aa = cv2.LINE_AA
    mid = top + (bottom - top) * 0.5
    pts = np.array([
        _pt(cx - 0.97 * fw, top + 0.06 * fh), _pt(cx - 0.45 * fw, top - 0.02 * fh), _pt(cx, top - 0.05 * fh),
        _pt(cx + 0.45 * fw, top - 0.02 * fh), _pt(cx + 0.97 * fw, top + 0.06 * fh),
        _pt(cx + 0.9 * fw, mid), _pt(cx + 0.6 * fw, bottom - 0.08 * fh), _pt(cx, bottom + 0.04 * fh),
        _pt(cx - 0.6 * fw, bottom - 0.08 * fh), _pt(cx - 0.9 * fw, mid),
    ], np.int32)
    cv2.fillPoly(img, [pts], colour, aa)
    dark = _shade(colour, 0.72) if np.mean(colour) > 60 else _shade((70, 70, 70), 1.0)
    if pattern == PLEATS:
        for k in (0.3, 0.5, 0.7):
            y = top + (bottom - top) * k
            cv2.line(img, _pt(cx - 0.85 * fw, y), _pt(cx + 0.85 * fw, y), dark, 2, aa)
    elif pattern == STRIPES:
        for k in np.linspace(0.15, 0.85, 6):
            y = top + (bottom - top) * k
            cv2.line(img, _pt(cx - 0.8 * fw, y), _pt(cx + 0.8 * fw, y), dark, 4, aa)
    elif pattern == DOTS:
        for _ in range(14):
            x = cx + rng.uniform(-0.7, 0.7) * fw
            y = top + (bottom - top) * rng.uniform(0.12, 0.88)
            cv2.circle(img, _pt(x, y), 4, dark, -1, aa)
    cv2.polylines(img, [pts], True, _shade(colour, 0.8), 2, aa)
    # ear loops
    for side in (-1, 1):
        cv2.line(img, _pt(cx + side * 0.97 * fw, top + 0.06 * fh), _pt(cx + side * 1.02 * fw, cy - 0.05 * fh), dark, 2, aa)
        cv2.line(img, _pt(cx + side * 0.9 * fw, mid), _pt(cx + side * 1.02 * fw, cy + 0.05 * fh), dark, 2, aa)


def draw_face(rng: np.random.Generator, traits: PersonTraits, mask: int, *, mask_index: int = 0) -> np.ndarray:
    """One photo of a person: a (512, 384, 3) uint8 image in BGR order, ready for cv2.imencode.

    ``mask`` is the mask part of the label (0 worn, 1 incorrect, 2 not worn); ``mask_index``
    picks which of the person's five masks is shown. ``rng`` drives everything that varies
    from photo to photo (pose, background, light, noise).
    """
    aa = cv2.LINE_AA
    t = traits
    img = _background(rng)
    cx, cy = WIDTH / 2, HEIGHT * 0.44
    fw, fh = t.face_w, t.face_h
    skin, hair = t.skin, t.hair
    # long hair behind the head
    if t.hair_long > 0.4:
        length = cy + fh * (0.4 + 1.1 * t.hair_long)
        cv2.ellipse(img, _pt(cx, cy - 0.1 * fh), _pt(fw * 1.22, fh * 1.12), 0, 180, 360, hair, -1, aa)
        cv2.rectangle(img, _pt(cx - fw * 1.22, cy - 0.1 * fh), _pt(cx + fw * 1.22, length), hair, -1, aa)
    # shoulders, neck, ears
    cv2.ellipse(img, _pt(cx, HEIGHT + 40), _pt(fw * 2.2, 150), 0, 180, 360, t.shirt, -1, aa)
    cv2.rectangle(img, _pt(cx - 0.45 * fw, cy + 0.5 * fh), _pt(cx + 0.45 * fw, cy + 1.35 * fh), _shade(skin, 0.88), -1, aa)
    for side in (-1, 1):
        cv2.ellipse(img, _pt(cx + side * fw * 0.98, cy), _pt(12, 24), 0, 0, 360, _shade(skin, 0.95), -1, aa)
    if t.hair_long > 0.4:  # hair falling in front of the shoulders
        for side in (-1, 1):
            x0 = cx + side * fw * 1.22
            x1 = cx + side * fw * 0.86
            cv2.rectangle(img, _pt(min(x0, x1), cy - 0.1 * fh), _pt(max(x0, x1), cy + fh * (0.4 + 1.1 * t.hair_long)), hair, -1, aa)
    # face
    cv2.ellipse(img, _pt(cx, cy), _pt(fw, fh), 0, 0, 360, skin, -1, aa)
    w = t.wrinkles
    line = _shade(skin, 1.0 - 0.3 * w)
    for k in range(int(round(4 * w))):  # forehead lines
        y = cy - 0.47 * fh + k * 0.07 * fh
        cv2.ellipse(img, _pt(cx, y + 60), _pt(0.5 * fw, 60), 0, 245, 295, line, 1 + (w > 0.6), aa)
    # eyes and brows
    eye_y = cy - 0.06 * fh
    for side in (-1, 1):
        ex = cx + side * t.eye_dx
        cv2.ellipse(img, _pt(ex, eye_y), _pt(t.eye_r * 1.5, t.eye_r * 0.75), 0, 0, 360, (245, 245, 245), -1, aa)
        cv2.circle(img, _pt(ex + rng.uniform(-2, 2), eye_y), int(t.eye_r * 0.6), (40, 30, 25), -1, aa)
        cv2.ellipse(img, _pt(ex, eye_y), _pt(t.eye_r * 1.5, t.eye_r * 0.75), 0, 180, 360, (50, 40, 35), 2, aa)
        brow = _shade(hair, 0.9) if t.grey < 0.7 else _shade(hair, 0.75)
        cv2.ellipse(img, _pt(ex, eye_y - 0.1 * fh), _pt(t.eye_r * 1.8, 8), 0, 195, 345, brow, t.brow_t, aa)
        for k in range(int(round(3 * w))):  # crow's feet
            x0 = ex + side * t.eye_r * 1.7
            cv2.line(img, _pt(x0, eye_y + (k - 1) * 5), _pt(x0 + side * 10, eye_y + (k - 1) * 8), line, 1, aa)
        if w > 0.35:  # bags under the eyes
            cv2.ellipse(img, _pt(ex, eye_y + t.eye_r * 0.9), _pt(t.eye_r * 1.2, 5), 0, 20, 160, line, 1, aa)
    # nose, folds, mouth
    nose_tip = cy + 0.27 * fh
    nose_col = _shade(skin, 0.78)
    cv2.line(img, _pt(cx + 3, eye_y + 0.08 * fh), _pt(cx + 7, nose_tip - 4), nose_col, 2, aa)
    for side in (-1, 1):
        cv2.ellipse(img, _pt(cx + side * 9, nose_tip), _pt(6, 4), 0, 0, 360, _shade(skin, 0.6), -1, aa)
        if w > 0.2:
            cv2.line(img, _pt(cx + side * 20, nose_tip + 4), _pt(cx + side * 32, cy + 0.56 * fh), line, 1 + (w > 0.6), aa)
    mouth_y = cy + 0.55 * fh
    open_ = rng.uniform(0, 5)
    cv2.ellipse(img, _pt(cx, mouth_y), _pt(0.3 * fw, 6 + open_), 0, 0, 360, t.lips, -1, aa)
    cv2.line(img, _pt(cx - 0.28 * fw, mouth_y), _pt(cx + 0.28 * fw, mouth_y), _shade(t.lips, 0.55), 2, aa)
    # mask
    if mask != 2:
        colour, pattern = t.masks[mask_index % len(t.masks)]
        bottom = cy + fh * rng.uniform(1.0, 1.08)
        if mask == 0:
            top = cy + fh * rng.uniform(0.06, 0.13)  # over the nose, under the eyes
        elif rng.random() < 0.7:
            top = nose_tip + fh * rng.uniform(0.07, 0.11)  # under the nose: nostrils visible
            bottom += fh * 0.08
        else:
            top = mouth_y + fh * rng.uniform(0.1, 0.15)  # on the chin: mouth visible
            bottom += fh * 0.18
        _draw_mask(img, rng, cx, cy, fw, fh, colour, pattern, top, bottom)
    # hair on top: cap, sides, fringe; receding for some older men
    cap_top = cy - fh * 1.12
    cap_low = cy - fh * (0.55 - 0.15 * t.fringe + 0.25 * t.bald)
    cv2.ellipse(img, _pt(cx, cap_low), _pt(fw * 1.06, max(8.0, cap_low - cap_top)), 0, 180, 360, hair, -1, aa)
    for side in (-1, 1):
        cv2.ellipse(img, _pt(cx + side * fw * 0.92, cy - 0.4 * fh), _pt(fw * 0.16, fh * 0.42), 0, 0, 360, hair, -1, aa)
    if t.grey > 0.05:  # grey strands in darker hair: salt and pepper
        strand = _shade((200, 200, 200), 1.0)
        for _ in range(int(30 * t.grey * (1.2 - t.grey))):
            x = cx + rng.uniform(-0.9, 0.9) * fw
            y = rng.uniform(cap_top + 6, cap_low - 4)
            cv2.line(img, _pt(x, y), _pt(x + rng.uniform(-8, 8), y + 10), strand, 1, aa)
    if t.glasses:
        for side in (-1, 1):
            cv2.circle(img, _pt(cx + side * t.eye_dx, eye_y), int(t.eye_r * 2.0), (30, 30, 30), 2, aa)
        cv2.line(img, _pt(cx - t.eye_dx + t.eye_r * 2, eye_y), _pt(cx + t.eye_dx - t.eye_r * 2, eye_y), (30, 30, 30), 2, aa)
    # pose and scale, then light, blur and sensor noise
    m = cv2.getRotationMatrix2D((cx, cy), float(rng.normal(0, 5)), float(rng.uniform(0.85, 1.15)))
    m[0, 2] += rng.uniform(-24, 24)
    m[1, 2] += rng.uniform(-20, 28)
    img = cv2.warpAffine(img, m, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    img = cv2.convertScaleAbs(img, alpha=float(rng.uniform(0.75, 1.2)), beta=float(rng.uniform(-25, 25)))
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (5, 5), float(rng.uniform(0.6, 1.6)))
    pos, neg = _noise_banks()[int(rng.integers(3))]
    oy, ox = int(rng.integers(32)), int(rng.integers(32))
    img = cv2.add(img, pos[oy:oy + HEIGHT, ox:ox + WIDTH])
    return cv2.subtract(img, neg[oy:oy + HEIGHT, ox:ox + WIDTH])


def _encode(img: np.ndarray, ext: str, quality: int) -> bytes:
    if ext == "png":
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise MaskdistError(f"could not encode a synthetic .{ext} image")
    return buf.tobytes()


# --- jobs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PersonJob:
    """What one worker call draws: one person's images (files relative to the temp root)."""

    kind: int
    index: int
    gender: int
    age: int  # true age in years
    files: tuple[tuple[str, int, int], ...]  # (relative path, mask, mask_index)


def _write_person(job: PersonJob, seed: int, root: str) -> int:
    """Draw and write one person's images; returns how many were written."""
    traits = make_traits(np.random.default_rng([seed, job.kind, job.index]), job.gender, job.age)
    for i, (rel, mask, mask_index) in enumerate(job.files):
        rng = np.random.default_rng([seed, job.kind, job.index, i + 1])
        img = draw_face(rng, traits, mask, mask_index=mask_index)
        if job.kind == EXTERNAL:  # outside-style: tighter square crop, own size
            side = int(rng.integers(300, 384))
            y0 = int(rng.integers(40, HEIGHT - side - 20))
            x0 = (WIDTH - side) // 2
            img = cv2.resize(img[y0:y0 + side, x0:x0 + side], (EXTERNAL_SIZE, EXTERNAL_SIZE), interpolation=cv2.INTER_AREA)
        ext = rel.rsplit(".", 1)[-1]
        data = _encode(img, ext, int(rng.integers(82, 96)))
        with open(os.path.join(root, rel), "wb") as fh:
            fh.write(data)
    return len(job.files)


def _run_chunk(args: tuple[list[PersonJob], int, str]) -> int:
    jobs, seed, root = args
    return sum(_write_person(job, seed, root) for job in jobs)


# --- planning -----------------------------------------------------------------------------


def _ages(rng: np.random.Generator, group: int, n: int) -> np.ndarray:
    if group == 0:
        return rng.choice(_YOUNG_AGES, size=n, p=_YOUNG_W / _YOUNG_W.sum())
    if group == 1:
        return rng.choice(_MID_AGES, size=n, p=_MID_W / _MID_W.sum())
    return 60 + np.minimum(25, np.floor(rng.exponential(6.0, size=n))).astype(int)


def _people(rng: np.random.Generator, counts: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    """(gender, true age) of each person, shuffled."""
    people = []
    for (gender, group), n in counts.items():
        people += [(gender, int(a)) for a in _ages(rng, group, n)]
    order = rng.permutation(len(people))
    return [people[i] for i in order]


def _mask_files(prefix: str, exts: list[str]) -> tuple[tuple[str, int, int], ...]:
    files = []
    for i, (stem, mask) in enumerate(L.STEM_TO_MASK.items()):
        mask_index = i if mask == 0 else 0
        files.append((f"{prefix}{stem}.{exts[i]}", mask, mask_index))
    return tuple(files)


@dataclass
class _Plan:
    train_rows: list[dict]
    train_jobs: list[PersonJob]
    eval_jobs: list[PersonJob]
    eval_rows: list[tuple[str, int]]  # (ImageID, true label), info.csv order
    external_jobs: list[PersonJob]
    external_rows: list[tuple[str, int, int, int, int]]
    quirks: dict


def _plan(seed: int, train_counts, eval_counts, external: int) -> _Plan:
    rng = np.random.default_rng([seed, 9, 0])
    people = _people(rng, train_counts)
    n = len(people)
    numbers = np.sort(rng.choice(np.arange(1, int(n * 2.6) + 10), size=n, replace=False))
    ids = [f"{k:06d}" for k in numbers]
    quirks: dict = {"duplicate_id": None, "suffixed_ids": [], "ext_people": {}, "junk": []}
    if n >= 20:
        # one id shared by two different people (different folders)
        a = int(rng.integers(n))
        others = [j for j in range(n) if j != a and people[j][0] == people[a][0] and min(people[j][1], 60) != min(people[a][1], 60)]
        others = others or [j for j in range(n) if j != a and people[j] != people[a]]
        b = others[int(rng.integers(len(others)))]
        ids[b] = ids[a]
        quirks["duplicate_id"] = ids[a]
        # suffixed ids "001498-1": the id of another person plus a suffix
        n_suffix = max(2, round(41 / 2700 * n))
        free = [j for j in range(n) if j not in (a, b)]
        picks = rng.choice(free, size=2 * n_suffix, replace=False)
        for p, q in zip(picks[:n_suffix], picks[n_suffix:]):
            ids[int(p)] = f"{numbers[int(q)]:06d}-1"
            quirks["suffixed_ids"].append(ids[int(p)])
    # extensions per person; from 20 people one of each odd mode is planted
    modes = list(rng.choice(len(_EXT_MODES), size=n, p=_EXT_MODE_P))
    if n >= 20:
        for mode, p in zip((1, 2, 3), rng.choice(n, size=3, replace=False)):
            modes[int(p)] = mode
    train_rows, train_jobs = [], []
    for i, ((gender, age), pid) in enumerate(zip(people, ids)):
        recorded = min(age, L.METRIC_AGE_CUT)
        path = f"{pid}_{L.GENDER_NAMES[gender]}_Asian_{recorded}"
        mode = _EXT_MODES[modes[i]]
        if mode == "mixed":
            exts = list(rng.choice(["jpg", "png", "jpeg"], size=IMAGES_PER_PERSON, p=(0.5, 0.3, 0.2)))
            exts[0], exts[-1] = "jpg", "png"
        else:
            exts = [mode] * IMAGES_PER_PERSON
        if mode != "jpg":
            quirks["ext_people"][path] = mode
        train_rows.append({"id": pid, "gender": L.GENDER_NAMES[gender], "race": "Asian", "age": recorded, "path": path})
        train_jobs.append(PersonJob(TRAIN, i, gender, age, _mask_files(f"train/images/{path}/", exts)))
    paths = [r["path"] for r in train_rows]
    if len(set(paths)) != len(paths):  # cannot happen by construction; guard the invariant
        raise RuntimeError("synthetic plan produced duplicate folder names")
    # eval: hashed names, rows shuffled
    eval_people = _people(np.random.default_rng([seed, 9, 1]), eval_counts)
    eval_jobs, eval_rows = [], []
    for i, (gender, age) in enumerate(eval_people):
        files = []
        for k, (stem, mask) in enumerate(L.STEM_TO_MASK.items()):
            name = hashlib.sha1(f"maskdist-synth:{seed}:{i}:{k}".encode()).hexdigest() + ".jpg"
            files.append((f"eval/images/{name}", mask, k if mask == 0 else 0))
            eval_rows.append((name, L.label_of(mask, gender, min(age, 60))))
        eval_jobs.append(PersonJob(EVAL, i, gender, age, tuple(files)))
    order = np.random.default_rng([seed, 9, 2]).permutation(len(eval_rows))
    eval_rows = [eval_rows[i] for i in order]
    # external: outside-style, mostly unmasked and older
    ext_rng = np.random.default_rng([seed, 9, 3])
    external_jobs, external_rows = [], []
    for i in range(external):
        gender = int(ext_rng.integers(2))
        group = int(ext_rng.choice(3, p=(0.15, 0.2, 0.65)))
        age = int(_ages(ext_rng, group, 1)[0])
        mask = int(ext_rng.choice(3, p=(0.15, 0.1, 0.75)))
        name = f"{i + 1:06d}_{age}.jpg"
        external_jobs.append(PersonJob(EXTERNAL, i, gender, age, ((f"external/{name}", mask, int(ext_rng.integers(5))),)))
        external_rows.append((name, L.label_of(mask, gender, age), mask, gender, age))
    return _Plan(train_rows, train_jobs, eval_jobs, eval_rows, external_jobs, external_rows, quirks)


# --- writing ------------------------------------------------------------------------------


@dataclass
class SynthSummary:
    """What ``write_dataset`` wrote."""

    out: Path
    train_people: int
    train_images: int
    eval_people: int
    eval_images: int
    external_images: int
    class_counts: list[int]  # training images per class, true labels with the cut at 60
    seconds: float
    images_per_second: float
    workers: int = 1
    eval_class_counts: list[int] = field(default_factory=list)

    def describe(self) -> str:
        lines = [
            f"synthetic dataset written to {self.out}",
            f"  train: {self.train_people} people, {self.train_images} images; "
            f"eval: {self.eval_people} people, {self.eval_images} images; external: {self.external_images} images",
            f"  {self.train_images + self.eval_images + self.external_images} images in {self.seconds:.1f} s "
            f"({self.images_per_second:.0f} images/s, {self.workers} worker{'s' if self.workers != 1 else ''})",
            "  training images per class (age cut 60):",
        ]
        for c, n in enumerate(self.class_counts):
            lines.append(f"    {c:2d} {L.class_name(c):<22} {n:6d}")
        return "\n".join(lines)


def _junk(rng: np.random.Generator) -> bytes:
    return _JUNK_HEAD + rng.integers(0, 256, 4070, dtype=np.uint8).tobytes()


def _write_csv(path: Path, header: str, rows) -> None:
    with open(path, "w", newline="") as fh:
        fh.write(header + "\n")
        for row in rows:
            fh.write(",".join(str(v) for v in row) + "\n")


def _resolve_counts(people, scale) -> dict[tuple[int, int], int]:
    if people is not None and scale is not None:
        raise MaskdistError("pass either people or scale, not both")
    if people is not None:
        if int(people) < 1:
            raise MaskdistError(f"invalid people {people}: expected 1 or more")
        return scaled_person_counts(int(people))
    if scale is not None:
        if not float(scale) > 0:
            raise MaskdistError(f"invalid scale {scale}: expected a positive factor")
        total = round(sum(_DEFAULT_COUNTS.values()) * float(scale))
        if total < 1:
            raise MaskdistError(f"scale {scale} leaves no people: expected a larger factor")
        return scaled_person_counts(total)
    return default_person_counts()


def write_dataset(out, *, people=None, scale=None, eval_people=None, seed=0, workers=1, external=0,
                  overwrite=False, progress=False) -> SynthSummary:
    """Write a synthetic dataset in the competition layout to ``out`` (see the module docstring).

    ``people`` scales the competition's person counts to that many training people, or
    ``scale`` multiplies them; ``eval_people`` defaults to 2/3 of the training people.
    The folder appears only when complete: it is written to ``OUT.partial-<pid>`` and renamed.
    """
    out = Path(out)
    train_counts = _resolve_counts(people, scale)
    n_train = sum(train_counts.values())
    if eval_people is None:
        eval_people = round(n_train * _EVAL_FRACTION)
    if int(eval_people) < 0:
        raise MaskdistError(f"invalid eval_people {eval_people}: expected 0 or more")
    if int(workers) < 1:
        raise MaskdistError(f"invalid workers {workers}: expected 1 or more")
    if int(external) < 0:
        raise MaskdistError(f"invalid external {external}: expected 0 or more")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MaskdistError(f"{out} exists; pass --overwrite (overwrite=True) to replace it, or choose another folder")
    eval_counts = scaled_person_counts(int(eval_people))
    seed, workers, external = int(seed), int(workers), int(external)

    start = time.perf_counter()
    plan = _plan(seed, train_counts, eval_counts, external)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for sub in ("train/images", "eval/images"):
            (tmp / sub).mkdir(parents=True)
        for row in plan.train_rows:
            (tmp / "train/images" / row["path"]).mkdir()
        if external:
            (tmp / "external").mkdir()
        jobs = plan.train_jobs + plan.eval_jobs + plan.external_jobs
        total_images = sum(len(j.files) for j in jobs)
        chunk = 8
        tasks = [(jobs[i:i + chunk], seed, str(tmp)) for i in range(0, len(jobs), chunk)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total_images, unit="img", desc="synth", file=sys.stderr, dynamic_ncols=True)
        written = 0
        if workers == 1:
            previous = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                for task in tasks:
                    n = _run_chunk(task)
                    written += n
                    if bar is not None:
                        bar.update(n)
            finally:
                cv2.setNumThreads(previous)
        else:
            with parallel.pool(workers) as pool:
                for n in pool.imap_unordered(_run_chunk, tasks):
                    written += n
                    if bar is not None:
                        bar.update(n)
        if bar is not None:
            bar.close()
        if written != total_images:
            raise RuntimeError(f"wrote {written} of {total_images} synthetic images")
        # CSVs (eval answers and external labels stay outside the folders a model reads)
        _write_csv(tmp / "train/train.csv", "id,gender,race,age,path",
                   ([r["id"], r["gender"], r["race"], r["age"], r["path"]] for r in plan.train_rows))
        _write_csv(tmp / "eval/info.csv", "ImageID,ans", ((name, 0) for name, _ in plan.eval_rows))
        _write_csv(tmp / "eval_answers.csv", "ImageID,ans", plan.eval_rows)
        if external:
            _write_csv(tmp / "external_answers.csv", "file,ans,mask,gender,age", plan.external_rows)
        # junk: macOS ._ files next to real images, hidden checkpoint folders
        junk_rng = np.random.default_rng([seed, 9, 4])
        junk = []
        n_train_junk = min(len(plan.train_rows), max(2, round(len(plan.train_rows) / 500)))
        for p in junk_rng.choice(len(plan.train_rows), size=n_train_junk, replace=False):
            rel, _, _ = plan.train_jobs[int(p)].files[int(junk_rng.integers(IMAGES_PER_PERSON))]
            folder, name = rel.rsplit("/", 1)
            junk.append(f"{folder}/._{name.rsplit('.', 1)[0]}.jpg")
        if plan.eval_rows:
            n_eval_junk = min(len(plan.eval_rows), max(2, round(len(plan.eval_rows) / 3000)))
            for p in junk_rng.choice(len(plan.eval_rows), size=n_eval_junk, replace=False):
                junk.append(f"eval/images/._{plan.eval_rows[int(p)][0]}")
        for folder in ("train/images/.ipynb_checkpoints", "eval/images/.ipynb_checkpoints"):
            (tmp / folder).mkdir()
            junk.append(f"{folder}/mask1-checkpoint.jpg")
        for rel in junk:
            (tmp / rel).write_bytes(_junk(junk_rng))
        plan.quirks["junk"] = junk

        class_counts = [0] * L.NUM_CLASSES
        for job in plan.train_jobs:
            for _, mask, _ in job.files:
                class_counts[L.label_of(mask, job.gender, min(job.age, 60))] += 1
        eval_class_counts = [0] * L.NUM_CLASSES
        for _, label in plan.eval_rows:
            eval_class_counts[label] += 1
        ages = {}
        for r in plan.train_rows:
            ages[r["age"]] = ages.get(r["age"], 0) + 1
        ext_counts: dict[str, int] = {}
        for job in plan.train_jobs:
            for rel, _, _ in job.files:
                e = rel.rsplit(".", 1)[-1]
                ext_counts[e] = ext_counts.get(e, 0) + 1
        meta = {
            "generator": "maskdist.synth",
            "parameters": {"people": people, "scale": scale, "eval_people": int(eval_people), "seed": seed,
                           "external": external},
            "image_size": {"height": HEIGHT, "width": WIDTH},
            "train_people": len(plan.train_rows),
            "train_images": sum(class_counts),
            "eval_people": len(plan.eval_jobs),
            "eval_images": len(plan.eval_rows),
            "external_images": external,
            "train_person_counts": {f"{L.GENDER_NAMES[g]}/{L.AGE_NAMES[a]}": n for (g, a), n in train_counts.items()},
            "eval_person_counts": {f"{L.GENDER_NAMES[g]}/{L.AGE_NAMES[a]}": n for (g, a), n in eval_counts.items()},
            "train_class_counts": class_counts,
            "eval_class_counts": eval_class_counts,
            "external_class_counts": [sum(1 for r in plan.external_rows if r[1] == c) for c in range(L.NUM_CLASSES)],
            "train_ages": {str(k): ages[k] for k in sorted(ages)},
            "train_extensions": dict(sorted(ext_counts.items())),
            "quirks": plan.quirks,
        }
        (tmp / "synth.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists() or out.is_symlink():  # overwrite: swap in, then remove the old one
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    n_images = sum(class_counts) + len(plan.eval_rows) + external
    return SynthSummary(
        out=out, train_people=len(plan.train_rows), train_images=sum(class_counts), eval_people=len(plan.eval_jobs),
        eval_images=len(plan.eval_rows), external_images=external, class_counts=class_counts, seconds=seconds,
        images_per_second=n_images / seconds if seconds > 0 else float("inf"), workers=workers,
        eval_class_counts=eval_class_counts,
    )
