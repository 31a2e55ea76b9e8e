"""``maskdist demo``: the whole flow on built-in synthetic data, on this machine's CPUs.

synth -> shards build -> k folds trained (2-process CPU DDP with two cores or more) ->
ensemble prediction -> score against the hidden answers. Each stage writes into one work
folder and is skipped when its output is already complete (every output appears
atomically; a half-trained fold resumes), so re-running the demo continues where it stopped.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maskdist import config as config_mod
from maskdist.data import synth
from maskdist.infer import scoring
from maskdist.infer.predict import probs_path
from maskdist.shards.format import MANIFEST
from maskdist.train import kfold
from maskdist.train.run import RANDOM_INIT_CHOSEN
from maskdist.train.state import fold_finished

_IMPORTED = time.monotonic()


def process_seconds() -> float:
    """Seconds since this process started, its Python and library start-up included (what a
    user waited for); since this module's import where /proc cannot say."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a container or job sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def demo_processes(cores: int | None = None) -> tuple[int, str]:
    """CPU processes per fold and why: 2 with two cores or more, else 1. It depends on the
    machine, never on its momentary load, so the demo's global batch, scaled lr and scores
    are the same on every run of one machine."""
    cores = usable_cores() if cores is None else cores
    processes = 2 if cores >= 2 else 1
    return processes, f"{cores} usable core(s)"


@dataclass
class DemoOptions:
    workdir: Path = Path("demo")
    people: int = 300
    eval_people: int = 120
    folds: int = 5
    seed: int = 0
    config: str = "cpu_fast"
    processes: int = 0  # 0: 2 with two usable cores or more, else 1
    epochs: int | None = None  # None: the preset's
    workers: int = 2


def _stage(name: str, done: bool, run: Callable[[], object], echo: Callable[[str], None]) -> None:
    if done:
        echo(f"[{name}] already done, reusing it")
        return
    started = time.perf_counter()
    echo(f"[{name}] ...")
    result = run()
    if result is not None and hasattr(result, "describe"):
        echo(result.describe())
    echo(f"[{name}] done in {time.perf_counter() - started:.1f} s")


def run_demo(options: DemoOptions, echo: Callable[[str], None] = print) -> dict:
    """Run every stage; returns the figures and paths it printed."""
    from maskdist.shards import build_shards

    work = Path(options.workdir)
    data, shard_dir, runs = work / "data", work / "shards", work / "runs"
    submission = runs / "submission.csv"
    _stage(
        "synth", (data / "synth.json").is_file(),
        lambda: synth.write_dataset(data, people=options.people, eval_people=options.eval_people, seed=options.seed,
                                    workers=options.workers, overwrite=data.exists()),
        echo,
    )
    _stage(
        "shards", (shard_dir / MANIFEST).is_file(),
        lambda: build_shards(data / "train", shard_dir, eval_dir=data / "eval", folds=options.folds, seed=options.seed,
                             workers=options.workers, overwrite=shard_dir.exists()),
        echo,
    )
    processes, why = (options.processes, "--processes") if options.processes else demo_processes()
    train_config = config_mod.load(options.config, {"shards": str(shard_dir), "out": str(runs), "seed": options.seed,
                                                    "epochs": options.epochs})
    random_init = train_config.pretrained == "none"
    plan = kfold.KFoldPlan(shards=str(shard_dir), out=runs, train=train_config, processes=processes, cpu=True,
                           submission=submission, env={RANDOM_INIT_CHOSEN: "1"} if random_init else {})
    echo(f"[train] {options.folds} folds, preset {options.config}, {processes} CPU process(es) per fold ({why})"
         + (f"; {train_config.model} from random weights, so nothing is downloaded (scores are an untrained"
            " start's)" if random_init else ""))
    _stage("train + predict", submission.is_file() and all(fold_finished(runs / f"fold{k}") for k in range(options.folds)),
           lambda: kfold.run(plan, echo), echo)

    oof = scoring.oof_scores(runs)
    ensemble = scoring.score_submission(submission, data / "eval_answers.csv")
    versus = scoring.ensemble_and_folds(probs_path(submission), data / "eval_answers.csv")
    fold_f1 = {k: s.macro_f1 for k, s in sorted(oof["folds"].items())}
    echo("")
    echo("per-fold validation macro F1: " + ", ".join(f"{k}: {v:.4f}" for k, v in fold_f1.items()))
    echo(f"out-of-fold macro F1 (cross-validated): {oof['oof'].macro_f1:.4f}  ({oof['samples']} training images)")
    echo(f"ensemble macro F1 on the hidden eval answers: {ensemble.macro_f1:.4f}  ({ensemble.samples} eval images)")
    echo(f"single fold models on the same answers: mean {versus['fold_mean']:.4f} ("
         + ", ".join(f"{k}: {v:.4f}" for k, v in versus["folds"].items()) + ")")
    echo(f"  parts: mask {ensemble.part_f1['mask']:.3f}, gender {ensemble.part_f1['gender']:.3f}, age {ensemble.part_f1['age']:.3f}")
    echo(f"submission: {submission}")
    echo(f"TensorBoard logs: {runs}/fold*/tb   view them with: tensorboard --logdir {runs}")
    echo(f"demo finished in {process_seconds():.0f} s")
    return {"fold_f1": fold_f1, "oof_f1": oof["oof"].macro_f1, "ensemble_f1": ensemble.macro_f1, "fold_eval_f1": versus["folds"],
            "submission": submission, "runs": runs, "shards": shard_dir, "data": data}
