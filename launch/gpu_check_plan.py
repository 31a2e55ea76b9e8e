"""The GPU check's plan and closing table (launch/gpu_check.sh): which sections run, in what
order, what each is expected to cost on the GPU machine, the time budget, and the table the
results file ends with. Standard library only: it runs before anything else is imported.

  python launch/gpu_check_plan.py plan PLAN_TSV [--parent-pid PID]   sizes and SECTIONS from the environment
  python launch/gpu_check_plan.py close PLAN_TSV RECORDS_TSV LOG_DIR

The estimates are for one H200 with 16 cores and the default model (efficientnet_b3 at
150 px); they scale with the sizes (people, folds, steps, workers, batch, cores). What they
assume is written beside each constant below; EST_S='name=seconds ...' replaces any of them
(the seconds a previous run measured, from its table).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# A CUDA process's fixed cost: python and its imports (torch, timm, accelerate, albumentations:
# 10 s on the 2 loaded cores of the development machine, about 4 s on a free core), the CUDA
# context, and cuDNN's autotuning of the first steps (cudnn.benchmark).
START_S = 7.0
LOADER_START_S = 2.0  # a loader's workers start and fill their shuffle buffers
# efficientnet_b3 training at 150 px, bf16, channels_last: timm's published RTX 3090 figure (572
# img/s at 288 px, AMP, channels_last, batch 128) times 3.7 for the pixels, times about 3 for the
# H200 (5x the memory bandwidth, which bounds a depthwise-heavy net; less at small images).
TRAIN_IMG_S = 6000.0
INFER_IMG_S = 20000.0  # the same net's forward, per model, bf16; fp32 (TF32) a third of it
WORKER_IMG_S = 1500.0  # one loader worker: a stored 224x224 JPEG decoded, augmented, cropped (1,564-1,781 measured here)
# Per core: synth and shards build measured 129 and 240 img/s per core on 2 free cores here, and
# about 26 and 45 on a loaded machine; taken as 100 and 180 (hyperthreads share a physical core).
SYNTH_CORE_IMG_S = 100.0
SHARDS_CORE_IMG_S = 180.0
POOL_START_S = 3.0  # a synth or shards build process and its pool
# torch.compile of efficientnet_b3's training graph: dynamo and inductor in one process, the
# Triton kernels built in parallel on the cores; the same graph again comes from the inductor
# cache (here, on CPU: test_efficientnet's compile took 78-119 s cold and 16 s from the cache).
COMPILE_COLD_S = 75.0
COMPILE_WARM_S = 20.0
IMAGES_PER_PERSON = 7  # synth: 5 masks, 1 incorrect, 1 not worn
CLOSE_S = 10  # kept back from a `timeout` limit: a stopped section's 5 s grace, then the table
DEFAULT_BUDGET_S = 420


class PlanError(Exception):
    """Bad settings: one line, exit 2."""


@dataclass(frozen=True)
class Sizes:
    """The sizes gpu_check.sh exports (its header names their defaults)."""

    people: int
    eval_people: int
    folds: int
    fold_steps: int
    steps: int
    workers: tuple[int, ...]
    train_workers: int
    batch: int
    nproc: int

    @classmethod
    def from_env(cls) -> Sizes:
        def number(name: str) -> int:
            value = os.environ.get(name, "")
            if not value.isdigit():
                raise PlanError(f"{name}={value!r}: give a whole number")
            return int(value)

        workers = os.environ.get("WORKERS", "")
        if not re.fullmatch(r"\d+(,\d+)*", workers):
            raise PlanError(f"WORKERS={workers!r}: give loader worker counts such as 4,8,16")
        return cls(number("PEOPLE"), number("EVAL_PEOPLE"), number("FOLDS"), number("FOLD_STEPS"), number("STEPS"),
                   tuple(int(w) for w in workers.split(",")), number("TRAIN_WORKERS"), number("BATCH"), number("NPROC"))

    def train_s(self, steps: float, batch: int | None = None) -> float:
        return steps * (batch or self.batch) / TRAIN_IMG_S

    @property
    def val_images(self) -> int:  # one fold's held-out people
        return self.people * IMAGES_PER_PERSON // max(self.folds, 1)

    @property
    def eval_images(self) -> int:
        return self.eval_people * IMAGES_PER_PERSON

    def predict_s(self, images: int, models: int, rate: float = INFER_IMG_S) -> float:
        """One pass of the ensemble: the loader's workers decode (no augmentation: twice as fast) beside the forwards."""
        decode = images / (max(self.train_workers, 1) * 2 * WORKER_IMG_S)
        return LOADER_START_S + max(images * models / rate, decode)


def _machine(s: Sizes) -> float:
    return 2 + START_S + s.train_s(3)


def _bench_train(s: Sizes, compile_s: float = 0.0) -> float:
    return START_S + 2 + compile_s + s.train_s(2 * (3 + 3 * 20))  # two models; 3 warm-up and 3 rounds of 20 steps each


def _data(s: Sizes) -> float:
    images = (s.people + s.eval_people) * IMAGES_PER_PERSON
    cores = max(s.nproc, 1)
    return 2 * POOL_START_S + images / (SYNTH_CORE_IMG_S * cores) + images / (SHARDS_CORE_IMG_S * cores)


def _bench_epoch(s: Sizes) -> float:
    timed = (s.steps + 10) * s.batch  # 10 warm-up steps
    counts = sum(LOADER_START_S + timed / min(TRAIN_IMG_S, w * WORKER_IMG_S) if w else timed / WORKER_IMG_S for w in s.workers)
    return START_S + LOADER_START_S + counts + 1 + timed / TRAIN_IMG_S  # the in-memory ceiling last


def _fold_runs(s: Sizes) -> float:
    """FOLDS short fold runs side by side on the one GPU (they share it and the cores)."""
    return (START_S + 0.5 * s.folds + LOADER_START_S + s.folds * s.train_s(s.fold_steps)
            + LOADER_START_S + s.folds * s.val_images / INFER_IMG_S + 1)


def _predict(s: Sizes) -> float:
    load = START_S + 0.5 * s.folds  # a process, and the fold models loaded
    bf16 = load + s.predict_s(s.eval_images, s.folds)
    fp32 = load + s.predict_s(s.eval_images, s.folds, INFER_IMG_S / 3)
    bare = s.eval_images * s.folds / INFER_IMG_S
    bench = load + s.predict_s(s.eval_images, 1) + 3 * bare + 3 * s.predict_s(s.eval_images, s.folds)  # decode once, warm-up, 2 rounds
    return _fold_runs(s) + bf16 + fp32 + 2 + bench


def _compile_resume(s: Sizes) -> float:
    first = START_S + LOADER_START_S + COMPILE_COLD_S + s.train_s(3) + 2  # SIGTERM after 3 batches, the state saved
    validate = LOADER_START_S + 2 * s.val_images / INFER_IMG_S  # live and EMA weights
    resumed = START_S + LOADER_START_S + COMPILE_WARM_S + s.train_s(2 * s.fold_steps) + 2 * validate + 2
    return first + resumed + START_S + 1 + s.predict_s(s.eval_images, 1)


def _short_run(steps: int, extra: float = 1.0) -> Callable[[Sizes], float]:
    return lambda s: START_S + LOADER_START_S + s.train_s(steps) + extra


def _batch_sweep(s: Sizes) -> float:
    return START_S + sum(2 + s.train_s(2 * (3 + 10), b) for b in (64, 128, 256))  # new shapes: models, cuDNN autotuning


def _strong(s: Sizes) -> float:
    return START_S + LOADER_START_S + s.train_s(10) + LOADER_START_S + 2 * s.val_images / INFER_IMG_S + 2


@dataclass(frozen=True)
class Section:
    name: str
    proves: str
    target: str
    estimate: Callable[[Sizes], float]
    needs: str = ""  # "data": the shards; "predict": its bf16 and fp32 probabilities


# The default order: what each proves, most valuable first, so that a run stopped by its time
# loses the least. 1 CUDA and a bf16 step; 2 maskdist's step against a bare loop; 3 the real
# loop from shards; 4 predict and its speed; 5 resume and compile; 6 the rest.
SECTIONS = (
    Section("machine", "CUDA works and a bf16 training step runs", "CUDA usable, finite loss", _machine),
    Section("bench_train", "maskdist's step against a bare PyTorch loop", "ratio >= 0.95", _bench_train),
    Section("data", "synthetic data and its shards, on every core", "built", _data),
    Section("bench_epoch", "the real loop from shards at each WORKERS count", "data wait < 5%; >= TARGET_IMG_S img/s", _bench_epoch,
            "data"),
    Section("predict", "FOLDS fold models; predict in bf16 and fp32; bench predict", "ratio >= 0.9", _predict, "data"),
    Section("agreement", "bf16 and fp32 predictions agree", ">= 99% same class", lambda s: 2.0, "predict"),
    Section("compile_resume", "train --compile, SIGTERM mid-epoch (EMA on), --resume, predict its best model",
            "exit 75, resumed, predicts", _compile_resume, "data"),
    Section("sync_debug", "no hidden host synchronisation per step (bf16)", "< 1 sync per 2 steps", _short_run(40), "data"),
    Section("fp16", "fp16 with the scaler: finite loss, steps, no hidden syncs", "finite; < 1 sync per 2 steps", _short_run(40),
            "data"),
    Section("profile", "a torch.profiler trace of training steps", "trace saved", _short_run(20, 5.0), "data"),
    Section("roundtrip", "a saved best model loads back to the same logits", "max difference 0", _short_run(10, 2.0), "data"),
    Section("batch_sweep", "bench train at batch 64, 128, 256", "img/s, peak memory", _batch_sweep),
    Section("strong", "a few steps of the strong preset", "runs", _strong, "data"),
    Section("bench_compile", "maskdist's step against a bare loop, both compiled", "ratio >= 0.95",
            lambda s: _bench_train(s, COMPILE_COLD_S + COMPILE_WARM_S)),
)
BY_NAME = {s.name: s for s in SECTIONS}
DEFAULT = " ".join(s.name for s in SECTIONS)
# names of earlier versions: one section now does what both did, compiling once
ALIASES = {"compile_predict": "compile_resume", "sigterm_resume": "compile_resume"}


def resolve(names: str) -> tuple[list[str], list[str]]:
    """SECTIONS as the section names to run, in its order (aliases resolved, repeats dropped), and notes."""
    order, notes = [], []
    for name in names.split():
        real = ALIASES.get(name, name)
        if real not in BY_NAME:
            raise PlanError(f"unknown section {name!r} in SECTIONS; the sections are: {DEFAULT}")
        if real != name:
            notes.append(f"{name} is now part of {real}")
        if real not in order:
            order.append(real)
    if not order:
        raise PlanError(f"SECTIONS is empty; the sections are: {DEFAULT}")
    return order, notes


def overrides(text: str) -> dict[str, float]:
    """EST_S='name=seconds ...'."""
    found = {}
    for item in text.split():
        name, _, value = item.partition("=")
        if name not in BY_NAME or not re.fullmatch(r"\d+(\.\d+)?", value):
            raise PlanError(f"EST_S: {item!r} is not SECTION=SECONDS with a section of: {DEFAULT}")
        found[name] = float(value)
    return found


def timeout_limit(pid: int) -> float | None:
    """The DURATION of a `timeout [OPTION]... DURATION COMMAND` process ``pid``, in seconds."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not argv or Path(argv[0]).name != "timeout":
        return None
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-k", "-s", "--kill-after", "--signal"):
            next(args, None)  # its value
        elif not arg.startswith("-"):
            match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", arg)
            return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]] if match else None
    return None


def budget(parent_pid: int | None) -> tuple[int, str]:
    given = os.environ.get("BUDGET_S", "")
    if given:
        if not given.isdigit():
            raise PlanError(f"BUDGET_S={given!r}: give whole seconds")
        return int(given), "BUDGET_S"
    limit = timeout_limit(parent_pid) if parent_pid else None
    if limit is not None:
        return max(int(limit) - CLOSE_S, 0), f"the {limit:g} s limit of the `timeout` running this script, less {CLOSE_S} s to close"
    return DEFAULT_BUDGET_S, "the default BUDGET_S"


def plan(args) -> int:
    order, notes = resolve(os.environ.get("SECTIONS") or DEFAULT)
    sizes, forced = Sizes.from_env(), overrides(os.environ.get("EST_S", ""))
    budget_s, why = budget(args.parent_pid)
    estimates = {name: math.ceil(forced.get(name, BY_NAME[name].estimate(sizes))) for name in order}
    rows = [f"budget\t{budget_s}\t{why}"] + [f"section\t{n}\t{estimates[n]}\t{BY_NAME[n].needs or '-'}" for n in order]
    Path(args.out).write_text("\n".join(rows) + "\n")
    total = sum(estimates.values())
    print(f"plan: {len(order)} sections, estimated {total} s for one H200 (EST_S: {', '.join(forced) or 'none'});"
          f" budget {budget_s} s ({why}); data on {sizes.nproc} cores")
    for note in notes:
        print(f"note: {note}")
    print(f"  {'section':<16}{'est. s':>7}{'by':>6}  what it proves")
    running, beyond = 0, []
    for name in order:  # as the run decides: a section that would not fit is skipped, the next ones still may
        fits = running + estimates[name] <= budget_s
        running += estimates[name] if fits else 0
        beyond += [] if fits else [name]
        print(f"  {name:<16}{estimates[name]:>7}{running if fits else '-':>6}  {BY_NAME[name].proves}"
              + ("" if fits else "  [beyond the budget if the estimates hold]"))
    print(f"expected: {len(order) - len(beyond)} sections in {running} s" + (f"; not reached: {' '.join(beyond)}" if beyond else ""))
    return 0


def _read_records(path: Path) -> list[tuple[str, str, str, str]]:
    return [tuple((line.split("\t") + ["", "", ""])[:4]) for line in path.read_text().splitlines() if line.strip()]


def _figure(log: Path) -> tuple[str, bool]:
    """A section's figure (its `figure:` lines, else its checks' details) and whether a check failed."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    failed = any(line.startswith("FAIL ") for line in lines)
    figures = [line[len("figure:"):].strip() for line in lines if line.startswith("figure:")]
    if not figures:
        checks = [line for line in lines if line.startswith(("PASS ", "FAIL "))]
        figures = [line.split(": ", 1)[-1] for line in (checks or lines[-1:])]
    return "; ".join(figures)[:300], failed


def close(args) -> int:
    """The closing table (markdown), the sections not run, and the SECTIONS that would run them."""
    rows = [line.split("\t") for line in Path(args.plan).read_text().splitlines()]
    estimates = {r[1]: int(r[2]) for r in rows if r[0] == "section"}
    order = list(estimates)
    records = {r[0]: r for r in _read_records(Path(args.records))}
    print("| section | result | figure | target | seconds (estimate) |")
    print("|---|---|---|---|---|")
    not_run, stopped = [], []
    for name in order:
        _, rc, seconds, note = records.get(name, (name, "-", "", "not reached"))
        if rc == "-":
            result, figure, shown = "SKIPPED", note, "-"
            not_run.append(name)
        else:
            figure, failed = _figure(Path(args.logs) / f"{name}.log")
            result = "PASS" if rc == "0" and not failed else "FAIL"
            if note:
                figure = f"{note}; {figure}" if figure else note
                stopped.append(name)
            shown = seconds
        target = BY_NAME[name].target.replace("TARGET_IMG_S", os.environ.get("TARGET_IMG_S", "TARGET_IMG_S"))
        cells = [name, result, figure or "-", target, f"{shown} ({estimates[name]})"]
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    print()
    why = {}  # names by the reason they were not run ("budget", "needs the shards", ...)
    for name in not_run:
        why.setdefault(records.get(name, ("", "", "", "not reached"))[3].split(":")[0], []).append(name)
    print("not run: " + ("; ".join(f"{', '.join(names)} ({reason})" for reason, names in why.items()) or "none"))
    if stopped:
        print("stopped: " + ", ".join(stopped))
    again = set(not_run + stopped)
    if not again:
        print("next: nothing left to run")
        return 0
    # what a fresh machine needs before them: the machine check, the data, predict's probabilities
    for name in list(again):
        needs = BY_NAME[name].needs
        again |= {"data", "predict"} if needs == "predict" else ({"data"} if needs else set())
    again.add("machine")
    chosen = [s.name for s in SECTIONS if s.name in again]
    need_s = sum(math.ceil(BY_NAME[n].estimate(Sizes.from_env())) if n not in estimates else estimates[n] for n in chosen)
    print(f"next: SECTIONS={shlex.quote(' '.join(chosen))} (estimated {need_s} s)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan")
    p.add_argument("out")
    p.add_argument("--parent-pid", type=int)
    p = sub.add_parser("close")
    p.add_argument("plan")
    p.add_argument("records")
    p.add_argument("logs")
    args = parser.parse_args()
    try:
        return {"plan": plan, "close": close}[args.command](args)
    except PlanError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
