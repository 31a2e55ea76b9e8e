"""``maskdist bench options``: each recipe option alone, and all of them (the ``strong``
preset's options), against the recipe, on the same shard set, fold and budget, over seeds.

Every run is a fresh ``maskdist train`` process (the base config, the variant's options, one
seed) on fold ``fold``; its best epoch's validation macro F1 and part F1 come from the run's
``model.json``. The table gives mean and standard deviation over the seeds, and each
variant's difference from the recipe: the question is whether an option helps at a fixed
budget, on this data, not what it could reach when tuned.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maskdist.errors import MaskdistError
from maskdist.train import checkpoint

# Each option as the strong preset sets it (maskdist/presets/strong.yaml).
OPTIONS = {
    "ema": ["--ema-decay", "0.999"],
    "parts": ["--heads", "parts"],
    "focal+f1": ["--loss", "focal+f1", "--f1-weight", "0.3"],
    "mixup+cutmix": ["--mixup", "0.2", "--cutmix", "1.0", "--label-smoothing", "0.1"],
    "drop-path": ["--drop-path", "0.1"],
    "strong-augment": ["--augment", "strong"],
}
VARIANTS = {"recipe": [], **OPTIONS, "strong": [arg for args in OPTIONS.values() for arg in args]}
PARTS = ("mask", "gender", "age")


@dataclass
class VariantResult:
    name: str
    args: list[str]
    macro_f1: list[float] = field(default_factory=list)  # one per seed
    part_f1: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PARTS})
    seconds: list[float] = field(default_factory=list)

    @staticmethod
    def _spread(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"


@dataclass
class OptionsBench:
    shards: str
    config: str
    fold: int
    seeds: list[int]
    results: list[VariantResult]

    def describe(self, markdown: bool = False) -> str:
        base = next((r for r in self.results if r.name == "recipe"), None)
        rows = []
        for r in self.results:
            delta = statistics.mean(r.macro_f1) - statistics.mean(base.macro_f1) if base else float("nan")
            rows.append([r.name, VariantResult._spread(r.macro_f1), f"{delta:+.4f}"]
                        + [VariantResult._spread(r.part_f1[p]) for p in PARTS] + [f"{statistics.mean(r.seconds):.0f}"])
        head = ["variant", "macro F1 (mean ± sd)", "vs recipe", "mask F1", "gender F1", "age F1", "s/run"]
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
            lines = [f"options vs recipe on {self.shards}, config {self.config}, fold {self.fold}, seeds {self.seeds}"]
            lines += ["  " + "  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head] + rows]
        return "\n".join(lines)


def bench_options(shards: str, out: str | Path, variants: Sequence[str] = tuple(VARIANTS), seeds: Sequence[int] = (0, 1, 2),
                  config: str = "cpu_fast", fold: int = 0, extra: Sequence[str] = (), echo=print) -> OptionsBench:
    """Run every (variant, seed) not finished in ``out`` yet (re-running continues), then read them all."""
    import time

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise MaskdistError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    out = Path(out)
    results = []
    for name in variants:
        result = VariantResult(name, VARIANTS[name])
        for seed in seeds:
            run_out = out / f"{name}-seed{seed}"
            card_path = run_out / f"fold{fold}" / checkpoint.MODEL_JSON
            timing = run_out / "seconds.txt"
            if not card_path.is_file() or not timing.is_file():
                if run_out.exists():  # interrupted: run it again whole, so its time is a whole run's
                    shutil.rmtree(run_out)
                cmd = [sys.executable, "-m", "maskdist", "train", "--config", config, "--shards", str(shards), "--fold", str(fold),
                       "--out", str(run_out), "--seed", str(seed), *VARIANTS[name], *extra]
                echo(f"[{name} seed {seed}] {' '.join(cmd[3:])}")
                started = time.perf_counter()
                log = run_out.with_suffix(".log")
                run_out.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as handle:
                    rc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode
                if rc != 0:
                    raise MaskdistError(f"{name} seed {seed} failed (exit {rc}): see {log}")
                timing.write_text(f"{time.perf_counter() - started:.1f}\n")
            card = json.loads(card_path.read_text())
            result.macro_f1.append(float(card["metrics"]["macro_f1"]))
            for part in PARTS:
                result.part_f1[part].append(float(card["metrics"]["part_f1"][part]))
            result.seconds.append(float(timing.read_text()))
        results.append(result)
    return OptionsBench(str(shards), config, fold, list(seeds), results)
