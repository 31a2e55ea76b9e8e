"""``maskdist bench predict``: the fold ensemble's prediction against a bare forward of the
same models on the same decoded images.

:func:`bench_predict` times :func:`maskdist.infer.ensemble.vote` over the eval shards
exactly as ``maskdist predict`` runs it (loader workers decoding, normalisation on the
device, every fold model, TTA), then a bare loop over the same images already decoded into
memory: ``softmax(model(x))`` for each model, one host copy per batch, nothing else. The ratio predict / bare says
what the loading and bookkeeping cost; the target is 0.9 or more.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from maskdist.data import transforms
from maskdist.infer.ensemble import load_ensemble, pin_memory, vote
from maskdist.infer.members import find_members
from maskdist.infer.predict import ShardEval, resolve_precision
from maskdist.model import heads
from maskdist.system import distributed


@dataclass
class PredictBench:
    runs: str
    device: str
    models: int
    images: int
    tta: str
    workers: int
    predict_s: float
    bare_s: float

    @property
    def ratio(self) -> float:
        """predict images/s over bare images/s (1.0: predicting costs nothing beyond the forward)."""
        return self.bare_s / self.predict_s if self.predict_s > 0 else 0.0

    def describe(self) -> str:
        rate = lambda s: self.images / s if s > 0 else 0.0  # noqa: E731
        return "\n".join([
            f"prediction of {self.images} eval images by {self.models} model(s), TTA {self.tta}, {self.device},"
            f" {self.workers} loader worker(s):",
            f"  maskdist predict (decode + ensemble) : {rate(self.predict_s):9.1f} img/s",
            f"  bare forward on decoded images       : {rate(self.bare_s):9.1f} img/s",
            f"  ratio predict / bare                 : {self.ratio:.3f}",
        ])


def bench_predict(runs: Sequence[str | Path], shards: str, info_csv: str | Path | None = None, batch_size: int = 64,
                  workers: int = 2, tta: str = "none", precision: str = "auto", rounds: int = 2,
                  allow_unfinished: bool = False) -> PredictBench:
    """Run the benchmark (see the module docstring); rounds alternate the two loops."""
    members = find_members(runs, allow_unfinished)
    accelerator = distributed.make_accelerator(resolve_precision(precision, members)[0])
    device = accelerator.device
    ensemble = load_ensemble(members, "uniform", device)
    eval_set = ShardEval(shards, info_csv)
    channels_last = device.type == "cuda"
    pin = pin_memory(device)

    def make_loader(group):
        return eval_set.loader(group, batch_size, 0, 1, workers, pin)

    def predict_pass() -> int:
        votes = vote(ensemble, make_loader, device, tta, accelerator.autocast)
        return len(votes.probs) + len(votes.nonfinite) + len(votes.failed)

    decoded = {}  # the same images, decoded once per input group
    for g, group in enumerate(ensemble.groups):
        loader = make_loader(group)
        try:
            decoded[g] = [batch["image"].clone() for batch in loader]
        finally:
            loader.close()
    views = 2 if tta == "hflip" else 1

    def bare_pass() -> int:
        n = 0
        with torch.no_grad():
            for g, group in enumerate(ensemble.groups):
                for images in decoded[g]:
                    out = []
                    for i in group.members:
                        member = ensemble.members[i]
                        x = transforms.to_device(images, device, *member.normalisation, channels_last)
                        for view in ([x, torch.flip(x, dims=[3])] if views == 2 else [x]):
                            with accelerator.autocast():
                                out.append(heads.probabilities(member.model(view), member.card.get("heads", "single")))
                    torch.stack(out, dim=1).cpu()
                    n += len(images)
        return n // max(1, len(ensemble.groups))

    def timed(fn) -> float:
        if device.type == "cuda":  # cuda: time the device's work, not just its queueing
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    bare_pass()  # warm-up: allocator, kernels, page cache
    images = predict_pass()
    totals = {"predict": 0.0, "bare": 0.0}
    for _ in range(rounds):
        totals["predict"] += timed(predict_pass)
        totals["bare"] += timed(bare_pass)
    return PredictBench(str(runs[0]) if len(runs) == 1 else ",".join(map(str, runs)), str(device), len(ensemble.members),
                        images, tta, workers, totals["predict"] / rounds, totals["bare"] / rounds)
