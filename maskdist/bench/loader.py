"""Loader benchmark: the shard stream against a plain webdataset pipeline on the same shards
and a plain "folder of JPEGs" loader on the same images.

:func:`bench_loader` measures, for 1 and N DataLoader workers:

* the shard stream (:func:`maskdist.streams.train_loader`, class-balanced, uint8 batches;
  normalisation is left to the device, as in training): images/s after the first batch
  (worker start and shuffle-buffer fill excluded), the per-class share of what it yielded
  against the requested mixture, and the RSS of each worker sampled over the run;
* a plain webdataset pipeline over the same training shards (``wds.WebDataset``, resampled
  shards, its tar iteration, the same shuffle buffer, decode and transform into the same
  uint8 batches, ``wds.WebLoader`` with the same workers): the ratio stream / webdataset is
  the end-to-end margin of maskdist's strict tar reader and mixing over webdataset's own
  reading, the figure behind the reader decision in docs/design.md;
* the baseline the competition's reference code uses: PIL open of the original images
  (found through the manifest's ``build.train_dir`` + each sample's ``relpath``, or under
  ``folder``), torchvision Resize(224) + CenterCrop(150) + ToTensor + Normalize, through a
  shuffled torch DataLoader; same images, same counts, same worker counts;

and the ratios stream / baseline (the figure to report) and stream / webdataset.
``maskdist bench loader`` prints them.
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskdist import streams
from maskdist.data.transforms import RECIPE_MEAN, RECIPE_STD
from maskdist.errors import MaskdistError
from maskdist.shards.manifest import ShardSet, open_shard_set
from maskdist.system import parallel


@dataclass
class RunResult:
    name: str
    workers: int
    images: int
    seconds: float
    class_counts: list[int]
    rss_mb: dict[int, list[float]] = field(default_factory=dict)  # worker pid -> samples over the run

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def shares(self) -> list[float]:
        total = sum(self.class_counts)
        return [n / total if total else 0.0 for n in self.class_counts]


@dataclass
class BenchResult:
    shards: str
    batch_size: int
    samples: int
    alpha: float
    expected_shares: list[float]
    stream_runs: list[RunResult]
    baseline_runs: list[RunResult]
    image_note: str
    webdataset_runs: list[RunResult] = field(default_factory=list)

    def ratio(self, workers: int, against: str = "baseline") -> float:
        """Stream images/s over the baseline's (``against="webdataset"``: over webdataset's)."""
        others = self.webdataset_runs if against == "webdataset" else self.baseline_runs
        ours = next(r for r in self.stream_runs if r.workers == workers)
        base = next(r for r in others if r.workers == workers)
        return ours.images_per_s / base.images_per_s if base.images_per_s else math.inf

    def describe(self) -> str:
        lines = [f"loader benchmark on {self.shards}: {self.samples} images per run, batch {self.batch_size}, alpha {self.alpha:g}",
                 f"  {self.image_note}", "", f"  {'loader':<34}{'workers':>8}{'img/s':>10}{'img/s/worker':>14}"]
        for r in self.stream_runs + self.webdataset_runs + self.baseline_runs:
            lines.append(f"  {r.name:<34}{r.workers:>8}{r.images_per_s:>10.0f}{r.images_per_s / max(1, r.workers):>14.0f}")
        lines.append("")
        for r in self.stream_runs:
            lines.append(f"  ratio shard stream / folder baseline, {r.workers} worker(s): {self.ratio(r.workers):.2f}x")
        for r in self.stream_runs if self.webdataset_runs else []:
            lines.append(f"  ratio shard stream / webdataset pipeline, {r.workers} worker(s): {self.ratio(r.workers, 'webdataset'):.3f}x")
        lines += ["", f"  class shares (%): requested / shard stream ({self.stream_runs[-1].workers} workers) / baseline"]
        ours, base = self.stream_runs[-1].shares(), self.baseline_runs[-1].shares()
        worst = 0.0
        for c, e in enumerate(self.expected_shares):
            worst = max(worst, abs(ours[c] - e))
            lines.append(f"    class {c:2d}: {100 * e:6.2f} {100 * ours[c]:6.2f} {100 * base[c]:6.2f}")
        lines.append(f"  largest gap stream vs requested: {100 * worst:.2f} percentage points"
                     f" over {sum(self.stream_runs[-1].class_counts)} samples")
        lines += ["", "  worker RSS (MB): at start / at end / max over the timed run"]
        for r in self.stream_runs + self.webdataset_runs + self.baseline_runs:
            for pid, values in r.rss_mb.items():
                if values:
                    lines.append(f"    {r.name} ({r.workers} w) pid {pid}: {values[0]:.0f} / {values[-1]:.0f} / {max(values):.0f}")
        return "\n".join(lines)


def _rss_mb(pids: list[int]) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
    return out


def _measure(name: str, workers: int, samples: int, batches, pids, num_classes: int) -> RunResult:
    """Pull batches until ``samples`` images came after the first batch; time and count them."""
    counts = [0] * num_classes
    rss: dict[int, list[float]] = {}
    images, start, n_batches = 0, None, 0
    for batch in batches:
        if start is None:  # the first batch pays for worker start and buffer fill
            start = time.perf_counter()
            continue
        labels = batch["label"].tolist()
        images += len(labels)
        for c in labels:
            counts[c] += 1
        n_batches += 1
        if n_batches % 10 == 1:
            for pid, mb in _rss_mb(pids()).items():
                rss.setdefault(pid, []).append(mb)
        if images >= samples:
            break
    seconds = time.perf_counter() - start if start is not None else 0.0
    for pid, mb in _rss_mb(pids()).items():
        rss.setdefault(pid, []).append(mb)
    return RunResult(name, workers, images, seconds, counts, rss)


def _is_sample_field(name: str) -> bool:
    """Members the webdataset pipeline reads: a sample's image and json (never a pickle)."""
    from maskdist.shards.format import FIELDS

    return name.rsplit(".", 1)[-1] in FIELDS


def _webdataset_loader(shard_set: ShardSet, workers: int, batch_size: int, shuffle_buffer: int, transform, seed: int):
    """The same shards, decode and batches through a plain webdataset pipeline."""
    import webdataset as wds

    from maskdist.shards.format import TRAIN_BATCH_FIELDS

    collate = functools.partial(streams.collate, transform=transform, fields=TRAIN_BATCH_FIELDS)
    dataset = (wds.WebDataset(shard_set.urls("train", extra=False), resampled=True, shardshuffle=False, nodesplitter=None,
                              select_files=_is_sample_field, seed=seed)
               .shuffle(shuffle_buffer)
               .batched(batch_size, collation_fn=collate, partial=False))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=parallel.worker_init(),
                         multiprocessing_context=parallel.context() if workers else None,
                         persistent_workers=workers > 0)


def _stream_batches(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


class _FolderDataset(torch.utils.data.Dataset):
    """The reference code's loader: PIL + torchvision transforms, float normalised on the CPU."""

    def __init__(self, paths: list[str], labels: list[int], resize: int, crop: int):
        from torchvision import transforms as T

        self.paths, self.labels = paths, labels
        self.transform = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(),
                                    T.Normalize(mean=RECIPE_MEAN, std=RECIPE_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            image = self.transform(im.convert("RGB"))
        return {"image": image, "label": self.labels[i]}


def _originals(shard_set: ShardSet, folder: str | Path | None) -> tuple[list[str], list[int]]:
    """Original image paths and training labels of the training selection, via the json."""
    import json

    root = Path(folder) if folder is not None else None
    if root is None:
        train_dir = shard_set.manifest.get("build", {}).get("train_dir")
        if not train_dir:
            raise MaskdistError("the manifest does not say where the original images are: pass --folder")
        root = Path(train_dir)
    paths, labels = [], []
    for shard in shard_set.shards("train", None, extra=False):
        for sample in streams.read_shard(shard_set, shard["path"]):
            meta = json.loads(sample["json"])
            paths.append(str(root / meta["relpath"]))
            labels.append(int(meta["label"]))
    missing = [p for p in paths[:50] if not Path(p).is_file()]
    if missing:
        raise MaskdistError(f"original image {missing[0]} not found: pass --folder (the training folder the set was built from)")
    return paths, labels


def bench_loader(shards: str | Path | ShardSet, workers: int = 2, samples: int = 3000, batch_size: int = 64,
                 folder: str | Path | None = None, alpha: float = 0.0, seed: int = 0, shuffle_buffer: int = 1000,
                 resize: int = 224, crop: int = 150) -> BenchResult:
    """Run the benchmark (see the module docstring); 1 and ``workers`` DataLoader workers."""
    from maskdist.data.transforms import build_transform

    shard_set = shards if isinstance(shards, ShardSet) else open_shard_set(shards)
    if workers < 1 or samples < 1 or batch_size < 1:
        raise MaskdistError("--workers, --samples and --batch-size must be 1 or more")
    counts = shard_set.class_counts(None, extra=False)
    expected = streams.class_probabilities(counts, alpha)
    worker_counts = sorted({1, int(workers)})
    transform = build_transform("recipe", resize=resize, crop=crop)

    stream_runs = []
    for w in worker_counts:
        loader, _ = streams.train_loader(shard_set, None, batch_size, workers=w, seed=seed, alpha=alpha,
                                        transform=transform, shuffle_buffer=shuffle_buffer, extra=False)
        try:
            stream_runs.append(_measure("shard stream (cv2, uint8)", w, samples, _stream_batches(loader),
                                        loader.worker_pids, shard_set.num_classes))
        finally:
            loader.close()

    webdataset_runs = []
    for w in worker_counts:
        loader = _webdataset_loader(shard_set, w, batch_size, shuffle_buffer, transform, seed)
        torch_loader = loader.pipeline[0]  # WebLoader wraps a torch DataLoader
        try:
            webdataset_runs.append(_measure(
                "webdataset pipeline (same decode)", w, samples, iter(loader),
                lambda tl=torch_loader: [p.pid for p in getattr(getattr(tl, "_iterator", None), "_workers", [])], shard_set.num_classes))
        finally:
            parallel.stop_workers(torch_loader)
        loader = torch_loader = None  # free the pipeline before the next one starts

    paths, labels = _originals(shard_set, folder)
    rng = random.Random(seed)
    order = []
    while len(order) < samples + batch_size:  # the reference code: shuffle, epoch after epoch
        order += rng.sample(range(len(paths)), len(paths))
    order = order[: samples + batch_size]
    dataset = _FolderDataset([paths[i] for i in order], [labels[i] for i in order], resize, crop)
    baseline_runs = []
    for w in worker_counts:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=w)
        batches = iter(loader)
        baseline_runs.append(_measure("folder baseline (PIL, torchvision)", w, samples, batches,
                                      lambda it=batches: [p.pid for p in getattr(it, "_workers", [])], shard_set.num_classes))
        del batches, loader

    with_size = next(iter(_image_size(paths[:1])), None)
    note = (f"shards store JPEGs {stored_size_text(shard_set.manifest.get('image', {}))}; the baseline reads the originals"
            + (f" ({with_size[0]}x{with_size[1]} HxW)" if with_size else ""))
    return BenchResult(str(shard_set.location), batch_size, samples, alpha, expected, stream_runs, baseline_runs, note, webdataset_runs)


def stored_size_text(image: dict) -> str:
    """How a manifest's ``image`` entry says the shards were sized."""
    if image.get("size"):
        return f"at exactly {image['size'][0]}x{image['size'][1]} HxW (aspect not kept)"
    if image.get("short_side"):
        return f"at shorter side {image['short_side']}"
    return "at their original size"


def _image_size(paths: list[str]) -> list[tuple[int, int]]:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append((im.height, im.width))
    return out
