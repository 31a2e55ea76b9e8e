"""``maskdist bench onnx``: the exported ONNX ensemble under onnxruntime against the same
ensemble in PyTorch, and ``maskdist classify`` on the same photos, in one run.

The photos of a folder are decoded, resized and cropped once into uint8 NHWC batches; the
ensemble's graph (:class:`maskdist.infer.export.EnsembleGraph`: every fold, normalisation,
TTA, softmax, mean) then runs on those batches in PyTorch and, exported, in onnxruntime
(CPU), in alternating rounds. The outputs are compared (largest probability difference,
share of equal labels) and both rates given with their ratio; ``classify`` is timed over the
folder as users run it (decoding included).
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maskdist.errors import MaskdistError
from maskdist.infer import classify as classify_mod, export
from maskdist.infer.ensemble import FolderImages, load_ensemble
from maskdist.infer.members import find_members


@dataclass
class OnnxBench:
    runs: str
    models: int
    images: int
    tta: str
    batch_size: int
    torch_s: float
    onnx_s: float
    classify_s: float
    max_abs_diff: float
    same_labels: float  # share of images whose label is the same

    def rate(self, seconds: float) -> float:
        return self.images / seconds if seconds > 0 else 0.0

    @property
    def ratio(self) -> float:
        """onnxruntime img/s over PyTorch img/s."""
        return self.torch_s / self.onnx_s if self.onnx_s > 0 else 0.0

    def describe(self) -> str:
        return "\n".join([
            f"{self.images} photos, {self.models} model(s), TTA {self.tta}, batch {self.batch_size}, CPU:",
            f"  PyTorch ensemble graph      : {self.rate(self.torch_s):9.1f} img/s",
            f"  onnxruntime (same graph)    : {self.rate(self.onnx_s):9.1f} img/s",
            f"  ratio onnxruntime / PyTorch : {self.ratio:.3f}",
            f"  maskdist classify (decode + ensemble, 0 workers): {self.rate(self.classify_s):9.1f} img/s",
            f"  agreement: largest |probability difference| {self.max_abs_diff:.2e}, same label on {100 * self.same_labels:.1f}%",
        ])


def _batches(paths: Sequence[Path], group, batch_size: int) -> list[np.ndarray]:
    """The readable photos as the group's uint8 NHWC batches (decoded as classify decodes them)."""
    keys = [str(p) for p in paths]
    dataset = FolderImages(keys, keys, group.folder_transform())
    images = [item["image"].transpose(1, 2, 0) for item in map(dataset.__getitem__, range(len(dataset))) if item["ok"]]
    if not images:
        raise MaskdistError("no readable photos to time")
    return [np.ascontiguousarray(np.stack(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]


def bench_onnx(runs: Sequence[str | Path], photos: Sequence[str | Path], tta: str = "none", batch_size: int = 32,
               rounds: int = 2, allow_unfinished: bool = False) -> OnnxBench:
    """Run the benchmark (see the module docstring) on CPU."""
    import onnxruntime

    ensemble = load_ensemble(find_members(runs, allow_unfinished), "uniform", "cpu", allow_unfinished)
    graph = export.EnsembleGraph(ensemble, tta).eval()  # the one graph both runtimes time
    batches = _batches(classify_mod.photos(photos), ensemble.groups[0], batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ensemble.onnx"
        export.write_onnx(graph, path)
        options = onnxruntime.SessionOptions()
        # onnxruntime's idle threads spin for a while after each run: they would take the
        # cores from the PyTorch pass that follows
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def torch_pass() -> list:
        with torch.no_grad():
            return [tuple(t.numpy() for t in graph(torch.from_numpy(b))) for b in batches]

    def onnx_pass() -> list:
        return [tuple(session.run(None, {"image": b})) for b in batches]

    def classify_pass() -> None:
        classify_mod.classify(runs, photos, tta=tta, decisions="argmax", batch_size=batch_size, workers=0, precision="no",
                              allow_unfinished=allow_unfinished, progress=False)

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    reference, exported = torch_pass(), onnx_pass()  # warm-up, and the outputs compared
    diff = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(reference, exported))
    same = float(np.mean(np.concatenate([a[1] == b[1] for a, b in zip(reference, exported)])))
    classify_pass()
    totals = {"torch": 0.0, "onnx": 0.0, "classify": 0.0}
    for _ in range(rounds):
        totals["torch"] += timed(torch_pass)
        totals["onnx"] += timed(onnx_pass)
        totals["classify"] += timed(classify_pass)
    images = sum(len(b) for b in batches)
    return OnnxBench(",".join(map(str, runs)), len(ensemble.members), images, tta, batch_size, totals["torch"] / rounds,
                     totals["onnx"] / rounds, totals["classify"] / rounds, diff, same)
