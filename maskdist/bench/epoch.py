"""``maskdist bench epoch``: the real training loop on real shards, at 1..N loader workers,
against the same loop fed from batches already in memory (the ceiling).

It answers "how many loader workers does this model need on this machine": for each worker
count the loop (:func:`maskdist.train.train_epoch`: the training step, the device-side
normalisation and the loop's own measurements, exactly as ``maskdist train`` runs them) trains
``steps`` steps after ``warmup`` untimed ones and reports images/s, the share of wall time it
waited for data, and the CPU the loader processes used (in cores). The ceiling is the same
loop, model and optimiser fed from a handful of decoded batches cycled in memory: no decode,
no wait. The ratio stream / ceiling is the figure to compare across machines.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from maskdist import config as config_mod
from maskdist.errors import MaskdistError


@dataclass
class EpochRun:
    workers: int  # loader workers; -1: the in-memory ceiling
    steps: int
    images: int
    seconds: float
    wait_s: float
    loader_cpu_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_frac(self) -> float:
        return self.wait_s / self.seconds if self.seconds > 0 else 0.0

    @property
    def loader_cores(self) -> float:
        """CPU the loader processes used per second of the run, in cores."""
        return self.loader_cpu_s / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EpochBench:
    shards: str
    model: str
    device: str
    precision: str
    batch_size: int
    crop: int
    runs: list[EpochRun] = field(default_factory=list)
    ceiling: EpochRun | None = None

    def ratio(self, workers: int) -> float:
        run = next(r for r in self.runs if r.workers == workers)
        return run.images_per_s / self.ceiling.images_per_s if self.ceiling and self.ceiling.images_per_s else 0.0

    def workers_needed(self, wait_below: float = 0.05) -> int | None:
        """The fewest workers whose data-wait share is under ``wait_below``; None if none is."""
        good = [r.workers for r in self.runs if r.wait_frac < wait_below]
        return min(good) if good else None

    def describe(self) -> str:
        lines = [f"training loop on {self.shards}: {self.model}, batch {self.batch_size} x {self.crop}x{self.crop}, "
                 f"{self.device}, precision {self.precision}",
                 f"  {'loader':<24}{'steps':>6}{'img/s':>9}{'data wait':>11}{'loader CPU (cores)':>20}{'/ ceiling':>11}"]
        for r in self.runs:
            lines.append(f"  {f'{r.workers} worker(s)':<24}{r.steps:>6}{r.images_per_s:>9.0f}{100 * r.wait_frac:>10.1f}%"
                         f"{r.loader_cores:>20.2f}{self.ratio(r.workers):>11.3f}")
        if self.ceiling:
            c = self.ceiling
            lines.append(f"  {'in memory (ceiling)':<24}{c.steps:>6}{c.images_per_s:>9.0f}{100 * c.wait_frac:>10.1f}%{'-':>20}{1:>11.3f}")
        need = self.workers_needed()
        lines.append("  " + (f"fewest workers with a data-wait share under 5%: {need}" if need is not None
                             else "no worker count tried brings the data-wait share under 5%"))
        return "\n".join(lines)


class _Steps:
    """A training loader that yields exactly ``steps`` batches per epoch, going on into the
    stream's next epochs when its own epoch is shorter (small shard sets)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, steps
        self._epoch = 0

    @property
    def skipped(self) -> dict:
        return self.loader.skipped

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        made, part = 0, 0
        while made < self.steps:
            self.loader.set_epoch(1000 * self._epoch + part)
            for batch in self.loader:
                yield batch
                made += 1
                if made == self.steps:
                    return
            part += 1

    def worker_pids(self) -> list[int]:
        return self.loader.worker_pids()

    def close(self) -> None:
        self.loader.close()


class _MemoryBatches:
    """Decoded batches cycled from memory, with the loader interface the loop uses."""

    def __init__(self, batches: list[dict], steps: int):
        self.batches, self.steps = batches, steps
        self.skipped: dict = {}

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self._start = start_step

    def __iter__(self) -> Iterator[dict]:
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]

    def worker_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        pass


def _cpu_seconds(pids: Sequence[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _timed_epoch(run, epoch: int, steps: int) -> EpochRun:
    from maskdist.train.epoch import train_epoch
    from maskdist.train.meters import EpochTally

    run.steps_per_epoch = steps
    pids = run.train_data.worker_pids()
    cpu = _cpu_seconds(pids)
    tally = EpochTally()
    started = time.perf_counter()
    train_epoch(run, epoch, tally)
    seconds = time.perf_counter() - started
    return EpochRun(-1, tally.steps, tally.images, seconds, tally.wait_s, _cpu_seconds(pids) - cpu)


def bench_epoch(shards: str, workers: Sequence[int] = (1, 2), steps: int = 50, warmup: int = 5, config: str = "cpu_fast",
                fold: int = 0, overrides: dict | None = None, ceiling_batches: int = 8) -> EpochBench:
    """Run the benchmark (see the module docstring) with the training options of ``config``
    (a preset or YAML file) and ``overrides`` (TrainConfig field -> value)."""
    from maskdist.train.run import make_train_loader, setup

    if not workers or min(workers) < 0 or steps < 1 or warmup < 1:
        raise MaskdistError("bench epoch: --workers must be 0 or more, --steps and --warmup 1 or more")
    with tempfile.TemporaryDirectory(prefix="maskdist-bench-") as tmp:
        # pretrained none: a speed benchmark needs no starting weights (and no network)
        cfg = config_mod.load(config, dict(overrides or {}, shards=str(shards), fold=fold, out=tmp, epochs=1,
                                           workers=int(workers[0]), pretrained="none"))
        run = setup(cfg)
        result = EpochBench(str(shards), cfg.model, str(run.accelerator.device), cfg.precision, cfg.batch_size, cfg.crop)
        try:
            for epoch, count in enumerate(workers):
                run.train_data.close()
                loader, _ = make_train_loader(cfg, run.shard_set, run.train_folds, run.accelerator, workers=int(count))
                run.train_data = _Steps(loader, max(steps, warmup))
                _timed_epoch(run, 2 * epoch, warmup)  # worker start, shuffle buffer, caches
                timed = _timed_epoch(run, 2 * epoch + 1, steps)
                timed.workers = int(count)
                result.runs.append(timed)
            run.train_data.set_epoch(0)
            kept = []
            for batch in run.train_data:
                kept.append(batch)
                if len(kept) == ceiling_batches:
                    break
            run.train_data.close()
            run.train_data = _MemoryBatches(kept, steps + warmup)
            _timed_epoch(run, 0, warmup)
            result.ceiling = _timed_epoch(run, 1, steps)
        finally:
            run.close()
    return result
