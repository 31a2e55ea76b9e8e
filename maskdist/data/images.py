"""Robust image decode, resize and JPEG encode for shard building (and checking).

Every input image goes through :func:`prepare`: decode (PIL, strict about truncation), convert
to RGB whatever the mode (palette, RGBA, grayscale, 16-bit, CMYK), resize (:func:`resize_to`:
an int shrinks so the shorter side is that many pixels, never enlarging; an ``(h, w)`` pair
resizes to exactly that size, aspect ratio not kept, as the training ``Resize((h, w))`` does;
``cv2.INTER_AREA`` when shrinking) and re-encode as JPEG with OpenCV.
Bad files raise :class:`ImageError` with a short machine-readable ``reason``
(``empty``, ``truncated``, ``corrupt``, ``unreadable``) so the build can count and list them.

Why PIL for decoding: OpenCV decodes many truncated JPEGs "successfully" (grey bottom rows,
a warning on stderr) and cannot read CMYK/16-bit PNG oddities consistently. PIL with
``LOAD_TRUNCATED_IMAGES = False`` raises on truncation; a JPEG that lacks its end-of-image
marker is refused explicitly as well, since libjpeg only warns about it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Photos are ~0.2 Mpx; refuse decompression bombs well before memory trouble.
Image.MAX_IMAGE_PIXELS = 64_000_000

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
# A JPEG may carry a little padding after its end-of-image marker; more than this is suspect
# only for the marker search, not for validity.
_EOI_WINDOW = 4096


class ImageError(Exception):
    """An image that cannot be used; ``reason`` is one word, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def is_jpeg(data: bytes) -> bool:
    return data[:2] == JPEG_SOI


def check_jpeg_complete(data: bytes) -> None:
    """Raise ImageError('truncated') when a JPEG lacks its end-of-image marker.

    In entropy-coded JPEG data 0xFF is always followed by 0x00 or a restart marker, so
    0xFFD9 near the end can only be the real end-of-image marker.
    """
    if JPEG_EOI not in data[-_EOI_WINDOW:]:
        raise ImageError("truncated", "JPEG has no end-of-image marker (file cut short)")


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's headers say, read without decoding."""

    height: int
    width: int
    components: int
    adobe: bool  # an APP14 "Adobe" colour-transform marker precedes the frame


# Start-of-frame markers (baseline, progressive, lossless, arithmetic): not DHT, JPG or DAC.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header of a JPEG (walking the marker segments), or None if there is none."""
    if data[:2] != JPEG_SOI:
        return None
    pos, end, adobe = 2, len(data), False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker == 0xEE:
            adobe = True
        if marker in _SOF_MARKERS:
            if pos + 10 > end:
                return None
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
            return JpegFrame(height, width, data[pos + 9], adobe)
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _plain_ycc_jpeg(data: bytes) -> bool:
    """True for a 3-component JPEG without an Adobe (APP14) colour transform marker.

    Those decode the same in OpenCV and PIL; CMYK/YCCK, grayscale and Adobe files go to PIL.
    """
    frame = jpeg_frame(data)
    return frame is not None and frame.components == 3 and not frame.adobe


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array (H, W, 3); strict about bad files."""
    if not data:
        raise ImageError("empty", "zero-byte file")
    if is_jpeg(data):
        check_jpeg_complete(data)
        if _plain_ycc_jpeg(data):
            # The common case, ~2x faster than PIL; EXIF orientation is applied by OpenCV too.
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if bgr is not None and bgr.ndim == 3 and bgr.shape[2] == 3:
                return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            # else: let PIL decode it and say what is wrong
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            arr = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("corrupt", "not an image PIL can identify") from None
    except Image.DecompressionBombError as err:
        raise ImageError("unreadable", f"too large: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        text = str(err)
        reason = "truncated" if "truncated" in text.lower() or isinstance(err, EOFError) else "corrupt"
        raise ImageError(reason, f"decode failed: {text}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError("corrupt", f"unexpected decoded shape {arr.shape}")
    return arr


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping.
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() if arr.size and arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels over white, as a viewer shows them; alpha is not kept.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def resize_short(rgb: np.ndarray, short_side: int | None) -> np.ndarray:
    """Shrink so the shorter side is ``short_side`` (INTER_AREA); smaller images are kept."""
    if short_side is None:
        return rgb
    h, w = rgb.shape[:2]
    short = min(h, w)
    if short <= short_side:
        return rgb
    scale = short_side / short
    if h <= w:
        size = (max(1, round(w * scale)), short_side)
    else:
        size = (short_side, max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def resize_exact(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to exactly ``size`` (h, w), aspect ratio not kept: ``cv2.INTER_AREA`` when no side
    grows (one clean resampling, no aliasing), else ``cv2.INTER_LINEAR`` (what the training
    transform's resize would do to it anyway)."""
    h, w = rgb.shape[:2]
    th, tw = int(size[0]), int(size[1])
    if (h, w) == (th, tw):
        return rgb
    interpolation = cv2.INTER_AREA if th <= h and tw <= w else cv2.INTER_LINEAR
    return cv2.resize(rgb, (tw, th), interpolation=interpolation)


def resize_to(rgb: np.ndarray, size: int | tuple[int, int] | None) -> np.ndarray:
    """``size``: None keeps the image, an int is the shorter side (:func:`resize_short`), an
    ``(h, w)`` pair the exact size (:func:`resize_exact`)."""
    if size is None:
        return rgb
    if isinstance(size, (tuple, list)):
        return resize_exact(rgb, (int(size[0]), int(size[1])))
    return resize_short(rgb, int(size))


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageError("unreadable", "JPEG encoding failed")
    return buf.tobytes()


def prepare(data: bytes, size: int | tuple[int, int] | None = (224, 224), quality: int = 95) -> tuple[bytes, tuple[int, int]]:
    """Decode, convert to RGB, resize and re-encode; returns (jpeg bytes, (height, width)).

    ``size``: the shorter side (int), an exact ``(h, w)`` (the default, as ``shards build``'s),
    or None (keep the size); see :func:`resize_to`.
    """
    rgb = resize_to(decode_rgb(data), size)
    return encode_jpeg(rgb, quality), (int(rgb.shape[0]), int(rgb.shape[1]))


def read_file(path: str | Path) -> bytes:
    """The bytes of an image file; ImageError('unreadable') when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ImageError("unreadable", f"cannot read: {err.strerror or err}") from None


def prepare_file(path: str | Path, size: int | tuple[int, int] | None = (224, 224), quality: int = 95) -> tuple[bytes, tuple[int, int]]:
    return prepare(read_file(path), size, quality)


def check_jpeg(data: bytes) -> tuple[int, int]:
    """Verify that shard JPEG bytes decode fully (fast, OpenCV); returns (height, width)."""
    if not data:
        raise ImageError("empty", "zero-byte image")
    if not is_jpeg(data):
        raise ImageError("corrupt", "not a JPEG")
    check_jpeg_complete(data)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ImageError("corrupt", "JPEG does not decode")
    return int(arr.shape[0]), int(arr.shape[1])
