"""The Python-level checks of launch/gpu_check.sh: each prints one ``PASS name: ...`` or
``FAIL name: ...`` line (against its target) and exits 0 or 1.

  python launch/gpu_check.py machine [--model M --batch-size B --crop C --precision P --allow-cpu]
  python launch/gpu_check.py sync-debug SHARDS --precision bf16 [--model M --batch-size B --resize R --crop C]
  python launch/gpu_check.py fp16 SHARDS [...]
  python launch/gpu_check.py roundtrip SHARDS [...]
  python launch/gpu_check.py agreement PROBS_A.npz PROBS_B.npz
  python launch/gpu_check.py profile SHARDS OUT_DIR [...]
  python launch/gpu_check.py batch-sweep --batches 64,128,256 [--model M --crop C --precision P]
  python launch/gpu_check.py summary bench-train|bench-epoch|bench-predict [--target T] < BENCH_JSON
  python launch/gpu_check.py target NAME VALUE OP TARGET [UNIT]

A ``figure: ...`` line is what the closing table shows for the section (gpu_check_plan.py).
"""
from __future__ import annotations

import argparse
import json
import math
import operator
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def verdict(name: str, ok: bool, detail: str) -> int:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return 0 if ok else 1


def figure(text: str) -> None:
    print(f"figure: {text}", flush=True)


def _gpus() -> str:
    """nvidia-smi's view: name, memory and driver of each GPU."""
    if not shutil.which("nvidia-smi"):
        return "no nvidia-smi"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi failed: {err}"
    return "; ".join(out.stdout.split("\n")).strip("; ") or f"nvidia-smi: {out.stderr.strip()[:200]}"


def machine(args) -> int:
    """What the figures ran on; stop at once, with the reason, when CUDA cannot be used; then
    a few training steps of the model in the check's precision."""
    import psutil
    import torch

    gpus = _gpus()
    print(f"GPU (nvidia-smi): {gpus}")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"
    print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN {cudnn}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cores: {usable} usable by this process (os.cpu_count() {os.cpu_count()}); OMP_NUM_THREADS "
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; memory {psutil.virtual_memory().total / 2**30:.0f} GiB")
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").is_dir() else None
    print(f"/dev/shm: {shm.total / 2**30:.1f} GiB, {shm.free / 2**30:.1f} GiB free" if shm else "/dev/shm: none")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU 0: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute {props.major}.{props.minor},"
              f" bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, {torch.cuda.device_count()} GPU(s)")
        status = verdict("cuda", True, f"{torch.cuda.device_count()} GPU(s) usable")
        device, where = torch.device("cuda"), f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        reason = ("this torch has no CUDA" if torch.version.cuda is None else
                  "torch.cuda.is_available() is False: no GPU visible, or a driver older than this torch's CUDA needs")
        status = verdict("cuda", False, reason)
        if not args.allow_cpu:
            figure(f"CUDA not usable: {reason}; {gpus}")
            return status
        device, where = torch.device("cpu"), "no CUDA (ALLOW_CPU: the step on the CPU)"
    stepped, detail = _precision_step(args, device)
    figure(f"{where}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}; {usable} cores; {detail}")
    return status or stepped


def _precision_step(args, device) -> tuple[int, str]:
    """Three training steps of the model on random images, as training runs them on ``device``
    (cuDNN tuned, channels_last on CUDA): the loss is finite and the weights move."""
    import torch

    from maskdist.model.factory import create_model
    from maskdist.system import cuda

    name = f"{'fp32' if args.precision == 'no' else args.precision} step"
    cuda.tune(device)
    torch.manual_seed(0)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = create_model(args.model, warn_random=False).to(device, memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    x = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 18, (args.batch_size,), device=device)
    before = [p.detach().clone() for p in model.parameters()]
    losses, seconds = [], []
    for _ in range(3):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())  # also waits for the step
        seconds.append(time.perf_counter() - started)
    moved = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    ok = all(math.isfinite(v) for v in losses) and moved > 0
    detail = (f"{name} {1000 * min(seconds[1:]):.0f} ms at batch {args.batch_size} x {args.crop}x{args.crop}"
              f" (first {seconds[0]:.1f} s)")
    return verdict(name, ok, f"{args.model} on {device.type}: loss {', '.join(f'{v:.3f}' for v in losses)},"
                   f" {moved} parameter tensors updated; {detail}"), detail


def _run(args, steps: int, precision: str):
    """A real fold run (maskdist's setup and epoch loop) for ``steps`` steps."""
    from maskdist import config as config_mod
    from maskdist.train.epoch import train_epoch
    from maskdist.train.meters import EpochTally
    from maskdist.train.run import setup

    overrides = dict(shards=args.shards, out=tempfile.mkdtemp(), model=args.model, batch_size=args.batch_size,
                     resize=args.resize, crop=args.crop, precision=precision, workers=args.workers, max_steps=steps,
                     log_every=max(1, steps // 2), epochs=1, pretrained="none")  # speed and correctness: no download
    cfg = config_mod.load(args.config, overrides)
    run = setup(cfg)
    return run, lambda epoch: train_epoch(run, epoch, EpochTally())


def _syncs_in(epoch_fn) -> tuple[list[str], object]:
    """Run one epoch under torch's sync debug mode; the synchronising calls it warned of, and the epoch's tally."""
    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            tally = epoch_fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)], tally


def _sync_verdict(precision: str, syncs: list[str], steps: int) -> int:
    # the log windows read their figures once per window (an event, one window late); anything per step is a regression
    per_step = len(syncs) / max(steps, 1)
    return verdict(f"sync-debug {precision}", per_step < 0.5,
                   f"{len(syncs)} synchronising call(s) in {steps} steps (target: fewer than one per two steps)"
                   + (f"; first: {syncs[0][:160]}" if syncs else ""))


def sync_debug(args) -> int:
    """No hidden host synchronisation per step: steps under torch's sync debug mode."""
    run, epoch = _run(args, args.steps, args.precision)
    try:
        epoch(0)  # warm-up: cuDNN autotuning, the first log window
        syncs, _ = _syncs_in(lambda: epoch(1))
    finally:
        run.close()
    return _sync_verdict(args.precision, syncs, args.steps)


def fp16(args) -> int:
    """fp16 with the GradScaler: finite losses, the optimiser really steps, and (the scaler reads
    its inf check on the host unless the optimiser is fused) no hidden per-step synchronisation."""
    import torch

    run, epoch = _run(args, args.steps, "fp16")
    try:
        before = [p.detach().clone() for p in run.module.parameters()]
        first = epoch(0)
        syncs, second = _syncs_in(lambda: epoch(1))
        moved = sum(not torch.equal(a, b) for a, b in zip(before, run.module.parameters()))
        scaler = getattr(run.accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else float("nan")
        loss = (first.loss_sum + second.loss_sum) / max(first.steps + second.steps, 1)
    finally:
        run.close()
    ok = math.isfinite(loss) and moved > 0 and math.isfinite(scale)
    status = verdict("fp16", ok, f"mean loss {loss:.4f}, {moved} parameter tensors updated, loss scale {scale:g}")
    return _sync_verdict("fp16", syncs, args.steps) or status


def roundtrip(args) -> int:
    """A best model saved after real training steps loads back (onto the device, as predict
    loads it) to the logits of the model in memory."""
    import torch

    from maskdist.train import checkpoint

    run, epoch = _run(args, args.steps, args.precision)
    try:
        epoch(0)
        module = run.module.eval()
        card = checkpoint.model_card(run.cfg.model, run.cfg.resize, run.cfg.crop, run.mean, run.std, 58, 0, 0,
                                     {"macro_f1": 0.0}, run.cfg.drop_rate, heads=run.cfg.heads)
        checkpoint.save(run.run_dir, module, card)
        loaded, _ = checkpoint.load(run.run_dir, run.accelerator.device)
        x = torch.rand(8, 3, run.cfg.crop, run.cfg.crop, device=run.accelerator.device)
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            loaded = loaded.to(memory_format=torch.channels_last)
        with torch.no_grad():
            diff = (module(x) - loaded(x)).abs().max().item()
    finally:
        run.close()
    return verdict("checkpoint round trip", diff == 0.0, f"max logit difference {diff:g} (target 0)")


def agreement(args) -> int:
    """bf16 and fp32 predictions of the same models agree."""
    import numpy as np

    a, b = np.load(args.a)["probs"], np.load(args.b)["probs"]
    same = float((a.argmax(1) == b.argmax(1)).mean())
    diff = float(np.abs(a - b).max())
    figure(f"{100 * same:.2f}% same class over {len(a)} images, max probability difference {diff:.4f}")
    return verdict("bf16 vs fp32 predict", same >= 0.99, f"{100 * same:.2f}% same class (target 99%), max probability"
                   f" difference {diff:.4f}")


def profile(args) -> int:
    """A short torch.profiler trace of training steps, saved beside the results."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    run, epoch = _run(args, args.steps, args.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        epoch(0)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with torch_profile(activities=activities) as prof:
            epoch(1)
        trace = out / "train_steps.trace.json"
        prof.export_chrome_trace(str(trace))
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                                          row_limit=15)
        (out / "train_steps.top_ops.txt").write_text(table)
    finally:
        run.close()
    figure(f"trace of {args.steps} steps, {trace.stat().st_size / 2**20:.1f} MB, top ops in {out.name}/train_steps.top_ops.txt")
    return verdict("profile", trace.is_file(), f"trace {trace} ({trace.stat().st_size / 2**20:.1f} MB), top ops in"
                   f" {out / 'train_steps.top_ops.txt'}")


def batch_sweep(args) -> int:
    """bench train's figures at each batch size, in one process (the allocator's peak reset between)."""
    import torch

    from maskdist.bench.train import run

    rows = []
    for batch in args.batches:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result = run(args.model, batch, args.crop, steps=10, rounds=1, precision=args.precision)
        rate = batch / result.maskdist_step_s
        peak = f"peak {result.peak_memory_mb:.0f} MB" if result.peak_memory_mb is not None else "no CUDA peak"
        print(f"batch {batch}: {rate:.0f} img/s, {peak}, ratio to the bare loop {result.ratio:.3f}", flush=True)
        rows.append(f"{batch}: {rate:.0f} img/s, {peak.replace('peak ', '')}")
    figure("; ".join(rows))
    return 0


def summary(args) -> int:
    """PASS/FAIL lines and the figure of a `maskdist bench ... --json` output read from stdin."""
    data = json.load(sys.stdin)
    if args.kind in ("bench-train", "bench-predict"):
        name = "bench train ratio" if args.kind == "bench-train" else "bench predict ratio"
        if args.kind == "bench-train":
            rates = (f"maskdist {data['batch_size'] / data['maskdist_step_s']:.0f} img/s, bare "
                     f"{data['batch_size'] / data['bare_step_s']:.0f} img/s at batch {data['batch_size']}")
            if data.get("peak_memory_mb") is not None:
                rates += f", peak {data['peak_memory_mb']:.0f} MB"
        else:
            rates = (f"predict {data['images'] / data['predict_s']:.0f} img/s, bare forward {data['images'] / data['bare_s']:.0f}"
                     f" img/s, {data['models']} models, {data['images']} images")
        figure(f"ratio {data['ratio']:.3f} ({rates})")
        return verdict(name, data["ratio"] >= args.target, f"{data['ratio']:g} (target >= {args.target:g})")
    status = 0
    for workers, wait in data["data_wait_frac"].items():
        rate = data["images_per_s"][workers]
        status |= verdict(f"bench epoch {workers} workers data wait", wait < 0.05, f"{100 * wait:.1f}% (target < 5%), {rate:.0f} img/s")
    best_workers, best = max(data["images_per_s"].items(), key=lambda item: item[1])
    waits = ", ".join(f"{w}: {100 * v:.1f}%" for w, v in data["data_wait_frac"].items())
    ceiling = data.get("ceiling_images_per_s")
    figure(f"best {best:.0f} img/s at {best_workers} workers" + (f" (ceiling {ceiling:.0f} in memory)" if ceiling else "")
           + f"; data wait {waits}")
    return verdict("bench epoch img/s", best >= args.target, f"{best:.0f} (target >= {args.target:.0f})") or status


def target(args) -> int:
    """Compare a measured VALUE with a TARGET: ``target NAME VALUE >= 5000 img/s``."""
    ops = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
    value = float(args.value)
    return verdict(args.name, ops[args.op](value, float(args.target)), f"{value:g} {args.unit} (target {args.op} {args.target})")


def json_field(args) -> int:
    """Print a field of a JSON document read from stdin (for the shell script)."""
    data = json.load(sys.stdin)
    for key in args.path.split("."):
        data = data[key]
    print(data)
    return 0


def _model_options(p, batch: bool = True) -> None:
    p.add_argument("--model", default="efficientnet_b3")
    if batch:
        p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--crop", type=int, default=150)
    p.add_argument("--precision", default="bf16")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="check", required=True)
    p = sub.add_parser("machine")
    _model_options(p)
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, still run the step (on the CPU)")
    for name in ("sync-debug", "fp16", "profile", "roundtrip"):
        p = sub.add_parser(name)
        p.add_argument("shards")
        if name == "profile":
            p.add_argument("out")
        p.add_argument("--config", default="recipe")
        _model_options(p)
        p.add_argument("--resize", type=int, default=224)
        p.add_argument("--workers", type=int, default=8)
        p.add_argument("--steps", type=int, default=20)
    p = sub.add_parser("agreement")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("batch-sweep")
    _model_options(p, batch=False)
    p.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[64, 128, 256])
    p = sub.add_parser("summary")
    p.add_argument("kind", choices=("bench-train", "bench-epoch", "bench-predict"))
    p.add_argument("--target", type=float, required=True)
    p = sub.add_parser("target")
    for field in ("name", "value", "op", "target"):
        p.add_argument(field)
    p.add_argument("unit", nargs="?", default="")
    sub.add_parser("json").add_argument("path")
    args = parser.parse_args()
    checks = {"machine": machine, "sync-debug": sync_debug, "fp16": fp16, "roundtrip": roundtrip, "agreement": agreement,
              "profile": profile, "batch-sweep": batch_sweep, "summary": summary, "target": target, "json": json_field}
    try:
        return checks[args.check](args)
    except Exception as err:  # noqa: BLE001 (a failed check is a FAIL line, and the script goes on)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return verdict(args.check, False, f"{type(err).__name__}: {first[:300]}")


if __name__ == "__main__":
    sys.exit(main())
