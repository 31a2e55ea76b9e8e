"""Drawn faces for the synthetic data: one person's fixed appearance (:class:`PersonTraits`)
and one 384x512 photo of them with a mask worn, pulled down or not worn (:func:`draw_face`).

Gender cues overlap and age cues follow a noisy *apparent* age, so a small model is far from
perfect on age; every pixel is a function of the generator passed in.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

HEIGHT, WIDTH = 512, 384

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
