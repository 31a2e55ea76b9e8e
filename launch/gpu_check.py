"""The Python-level checks of launch/gpu_check.sh: each prints one ``PASS name: ...`` or
``FAIL name: ...`` line (against its target) and exits 0 or 1.

  python launch/gpu_check.py machine
  python launch/gpu_check.py sync-debug SHARDS --precision bf16 [--model M --batch-size B --resize R --crop C]
  python launch/gpu_check.py fp16 SHARDS [...]
  python launch/gpu_check.py roundtrip SHARDS [...]
  python launch/gpu_check.py agreement PROBS_A.npz PROBS_B.npz
  python launch/gpu_check.py profile SHARDS OUT_DIR [...]
  python launch/gpu_check.py target NAME VALUE OP TARGET [UNIT]
"""
from __future__ import annotations

import argparse
import json
import operator
import shutil
import sys
import tempfile
import warnings
from pathlib import Path


def verdict(name: str, ok: bool, detail: str) -> int:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return 0 if ok else 1


def machine(_args) -> int:
    """Stop at once, with the reason, when CUDA cannot be used; print what the figures ran on."""
    import torch

    print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}")
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").is_dir() else None
    print(f"/dev/shm: {shm.total / 2**30:.1f} GiB, {shm.free / 2**30:.1f} GiB free" if shm else "/dev/shm: none")
    if not torch.cuda.is_available():
        reason = ("this torch has no CUDA" if torch.version.cuda is None else
                  "torch.cuda.is_available() is False: no GPU visible, or a driver older than this torch's CUDA needs")
        return verdict("cuda", False, reason)
    props = torch.cuda.get_device_properties(0)
    driver = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else "?"
    print(f"GPU 0: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute {props.major}.{props.minor}, driver {driver},"
          f" bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, {torch.cuda.device_count()} GPU(s)")
    return verdict("cuda", True, f"{torch.cuda.device_count()} GPU(s) usable")


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


def sync_debug(args) -> int:
    """No hidden host synchronisation per step: steps under torch's sync debug mode."""
    import torch

    run, epoch = _run(args, args.steps, args.precision)
    try:
        epoch(0)  # warm-up: cuDNN autotuning, the first log window
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                epoch(1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    finally:
        run.close()
    # the log windows read their figures once per window (an event, one window late); anything per step is a regression
    per_step = len(syncs) / max(args.steps, 1)
    return verdict(f"sync-debug {args.precision}", per_step < 0.5,
                   f"{len(syncs)} synchronising call(s) in {args.steps} steps (target: fewer than one per two steps)"
                   + (f"; first: {syncs[0][:160]}" if syncs else ""))


def fp16(args) -> int:
    """fp16 with the GradScaler: finite gradient norms, and the optimiser really steps."""
    import math

    import torch

    run, epoch = _run(args, args.steps, "fp16")
    try:
        before = [p.detach().clone() for p in run.module.parameters()]
        tally = epoch(0)
        moved = sum(not torch.equal(a, b) for a, b in zip(before, run.module.parameters()))
        scaler = getattr(run.accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else float("nan")
        loss = tally.loss_sum / max(tally.steps, 1)
    finally:
        run.close()
    ok = math.isfinite(loss) and moved > 0 and math.isfinite(scale)
    return verdict("fp16", ok, f"mean loss {loss:.4f}, {moved} parameter tensors updated, loss scale {scale:g}")


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
    return verdict("profile", trace.is_file(), f"trace {trace} ({trace.stat().st_size / 2**20:.1f} MB), top ops in"
                   f" {out / 'train_steps.top_ops.txt'}")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="check", required=True)
    sub.add_parser("machine")
    for name in ("sync-debug", "fp16", "profile", "roundtrip"):
        p = sub.add_parser(name)
        p.add_argument("shards")
        if name == "profile":
            p.add_argument("out")
        p.add_argument("--config", default="recipe")
        p.add_argument("--model", default="efficientnet_b3")
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--resize", type=int, default=224)
        p.add_argument("--crop", type=int, default=150)
        p.add_argument("--workers", type=int, default=8)
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--precision", default="bf16")
    p = sub.add_parser("agreement")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("target")
    for field in ("name", "value", "op", "target"):
        p.add_argument(field)
    p.add_argument("unit", nargs="?", default="")
    sub.add_parser("json").add_argument("path")
    args = parser.parse_args()
    checks = {"machine": machine, "sync-debug": sync_debug, "fp16": fp16, "roundtrip": roundtrip, "agreement": agreement,
              "profile": profile, "target": target, "json": json_field}
    try:
        return checks[args.check](args)
    except Exception as err:  # noqa: BLE001 (a failed check is a FAIL line, and the script goes on)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return verdict(args.check, False, f"{type(err).__name__}: {first[:300]}")


if __name__ == "__main__":
    sys.exit(main())
