"""The GPU path's fixes that can be proven on a CPU: --compile end to end (inductor runs on
CPU), the /dev/shm check against a real small tmpfs, the shared-`--out` check refusing a
machine that sees another folder, the NHWC batches a channels_last model gets on CUDA, and
launch/gpu_check.sh run CPU-sized (its plan, its budget, its closing table).
No GPU exists here; nothing is mocked."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import procs
import pytest
import torch
from conftest import REPO, free_port, launch_env
from safetensors.torch import load_file, save_file

from maskdist import streams
from maskdist.data import transforms
from maskdist.shards.manifest import open_shard_set
from maskdist.train import checkpoint
from maskdist.train.preemption import PREEMPTED_EXIT

FAST = ["--model", "test_efficientnet", "--resize", "64", "--crop", "48", "--batch-size", "16", "--lr", "0.2",
        "--timeout-s", "120", "--workers", "1"]


def _direct(*args) -> list[str]:
    return [sys.executable, "-m", "maskdist", *args]


def _train(shards, out, *extra) -> list[str]:
    return _direct("train", "--shards", str(shards), "--fold", "0", "--out", str(out), *FAST, *extra)


@pytest.mark.duration(90)
def test_compile_trains_resumes_and_predicts_like_an_uncompiled_load(small_shards, tmp_path):
    out = tmp_path / "runs"
    args = ("--epochs", "2", "--max-steps", "4", "--compile", "--ema-decay", "0.9", "--log-batches")
    run = subprocess.Popen(_train(small_shards, out, *args), env=launch_env(tmp_path), cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    batches = out / "fold0" / "batches" / "rank0.txt"
    assert procs.wait_for(lambda: batches.exists() and len(batches.read_text().splitlines()) >= 5, 400)
    procs.signal_frozen(run.pid, signal.SIGTERM)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == PREEMPTED_EXIT, output[-3000:]
    again = subprocess.run(_train(small_shards, out, *args, "--resume"), env=launch_env(tmp_path), cwd=tmp_path,
                           capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    saved = load_file(str(out / "fold0" / "best.safetensors"))
    assert not any(name.startswith(("_orig_mod.", "module.")) for name in saved)  # the plain module's names
    ema = load_file(str(out / "fold0" / "state" / "ema-rank0.safetensors"))
    assert set(ema) == set(saved)  # the EMA averages the plain module, not the compiled wrapper

    submission = tmp_path / "submission.csv"
    predicted = subprocess.run(_direct("predict", str(out / "fold0"), "--shards", str(small_shards), "--out", str(submission),
                                       "--workers", "0"), env=launch_env(tmp_path), cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    probs = np.load(submission.with_name("submission.probs.npz"))["probs"]
    # the same weights in a fresh, uncompiled model give the same probabilities
    model, card = checkpoint.load(out / "fold0")
    loader = streams.eval_loader(open_shard_set(small_shards), "eval", 64, workers=0,
                                 transform=transforms.build_transform("none", card["image"]["resize"], card["image"]["crop"]))
    rows = {}
    with torch.no_grad():
        for batch in loader:
            x = transforms.to_device(batch["image"], "cpu", card["normalisation"]["mean"], card["normalisation"]["std"])
            for row, p in zip(batch["row"].tolist(), torch.softmax(model(x), 1).numpy()):
                rows[row] = p
    expected = np.stack([rows[r] for r in sorted(rows)])
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_weights_saved_through_a_wrapper_still_load(small_shards, tmp_path):
    """Best models written by earlier --compile runs have `_orig_mod.` in every name."""
    from maskdist.model.factory import create_model

    model = create_model("test_efficientnet", warn_random=False).eval()
    run_dir = tmp_path / "fold0"
    checkpoint.save(run_dir, model, checkpoint.model_card("test_efficientnet", 64, 48, (0.5,) * 3, (0.25,) * 3, 58, 0, 0,
                                                          {"macro_f1": 0.0}, 0.4))
    plain = load_file(str(run_dir / checkpoint.WEIGHTS))
    save_file({f"_orig_mod.{name}": t for name, t in plain.items()}, str(run_dir / checkpoint.WEIGHTS))
    loaded, _card = checkpoint.load(run_dir)
    x = torch.rand(2, 3, 48, 48)
    torch.testing.assert_close(loaded(x), model(x))


def test_nhwc_batches_hold_the_nchw_pixels(small_shards):
    """On CUDA the loaders hand a channels_last model NHWC batches (same shape, same pixels)."""
    tf = transforms.build_transform("none", 64, 48)
    plain = next(iter(streams.eval_loader(small_shards, "eval", 8, workers=0, transform=tf)))["image"]
    nhwc = next(iter(streams.eval_loader(small_shards, "eval", 8, workers=1, transform=tf, channels_last=True)))["image"]
    assert nhwc.shape == plain.shape and torch.equal(nhwc, plain)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(memory_format=torch.channels_last)
    x = transforms.to_device(nhwc, "cpu", channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert transforms.to_device(nhwc, "cpu").is_contiguous()  # an NCHW model gets NCHW


def _unshare_available() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(not _unshare_available(), reason="needs `unshare -m` (root) for a private mount")


@needs_unshare
def test_a_small_dev_shm_is_refused_before_any_worker_starts(small_shards, tmp_path):
    # a private 1 MB tmpfs over /dev/shm for this one command: Docker's default is 64 MB
    cmd = " ".join(_train(small_shards, tmp_path / "runs", "--epochs", "1", "--batch-size", "128"))
    result = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {cmd}"],
                            env=launch_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and re.search(r"/dev/shm has [01] MB free", error[0]) and "--shm-size" in error[0] and "--ipc=host" in error[0]
    # the same loaders fit a larger one
    loader, _ = streams.train_loader(small_shards, [1, 2], 128, workers=1, transform=transforms.build_transform("none", 64, 48))
    need = streams.check_shared_memory([loader], processes=1)
    assert need == (1 * 2 + 1) * 128 * 3 * 48 * 48
    loader.close()


@needs_unshare
@pytest.mark.duration(30)
def test_a_machine_that_sees_another_out_folder_is_refused(small_shards, tmp_path):
    """Two machines on one host; the second sees a private tmpfs where the first sees --out,
    as with a node-local --out on a cluster."""
    port = str(free_port())
    out = tmp_path / "runs"
    out.mkdir()
    launches = []
    for machine in (0, 1):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                  "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                  "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "maskdist", "train", "--shards", str(small_shards),
                  "--fold", "0", "--out", str(out), "--epochs", "1", *FAST]
        if machine == 1:
            launch = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {out} && exec {' '.join(launch)}"]
        launches.append(subprocess.Popen(launch, env=launch_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        outputs = [p.communicate(timeout=240)[0] for p in launches]
    finally:
        for p in launches:
            p.kill()
    assert all(p.returncode != 0 for p in launches), outputs
    joined = "\n".join(outputs)
    assert "is not one folder for the whole launch: rank 1 on" in joined and "cannot see the lock" in joined, joined[-3000:]
    assert not (out / "fold0" / "model.json").exists() and not (out / "fold0" / ".maskdist.lock").exists()


def test_the_loop_logs_every_window_once_and_in_order(tmp_path):
    """Log windows are read one window late on CUDA; here (CPU) at once: every window's
    figures arrive, in step order, with its own lr."""
    from maskdist.train.meters import EpochTally, WindowMeter, fold_window, settle

    class Acc:
        num_processes = 1
        device = torch.device("cpu")

    tally = EpochTally()
    window = WindowMeter(torch.device("cpu"))
    for i in range(3):
        window.add(torch.tensor(float(i)), torch.tensor(2.0), 8, 0.01)
    figures = settle(fold_window(window, tally, Acc()), tally)
    assert figures["loss"] == pytest.approx(1.0) and figures["grad_norm"] == pytest.approx(2.0)
    assert tally.steps == 3 and tally.images == 24 and tally.loss_sum == pytest.approx(3.0)
    assert json.dumps(figures)  # plain floats, as trackers need


GPU_CHECK = REPO / "launch" / "gpu_check.sh"
# the default order: what each section proves, most valuable first
DEFAULT_ORDER = ["machine", "bench_train", "data", "bench_epoch", "predict", "agreement", "compile_resume", "sync_debug", "fp16",
                 "profile", "roundtrip", "batch_sweep", "strong", "bench_compile"]
CPU_SIZED = dict(ALLOW_CPU="1", PEOPLE="24", EVAL_PEOPLE="8", MODEL="test_efficientnet", BATCH="8", CROP="48", RESIZE="64",
                 PRECISION="no", TRAIN_WORKERS="1", WORKERS="1", STEPS="2", FOLD_STEPS="2", FOLDS="2")
CORES = len(os.sched_getaffinity(0))


def _gpu_check_env(tmp_path, **settings) -> dict:
    env = launch_env(tmp_path)  # OMP_NUM_THREADS=1, as many launchers set it
    for name in ("SECTIONS", "BUDGET_S", "EST_S", "NPROC", "DRY_RUN"):
        env.pop(name, None)
    env.update(PY=sys.executable, **settings)
    return env


def _table(results: str) -> dict[str, list[str]]:
    """The closing table's rows by section: result, figure, target, seconds (estimate)."""
    closing = results.split("\n== results\n")[1]
    rows = [line.split(" | ") for line in closing.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    return {row[0][2:]: [*row[1:-1], row[-1].rstrip(" |")] for row in rows}


def _end(script: subprocess.Popen, seen: dict) -> None:
    """Whatever the outcome, end the script and every process seen below it (by id): a broken
    script must not leave them running."""
    if script.poll() is None:
        script.kill()
    for pid, _start in procs.wait_gone(sorted(seen), 0):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    script.wait()


def _plan(tmp_path, *prefix, **settings) -> list[str]:
    run = subprocess.run([*prefix, "bash", str(GPU_CHECK)], env=_gpu_check_env(tmp_path, DRY_RUN="1", **settings), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_the_gpu_check_plans_the_most_valuable_sections_first_within_its_budget(tmp_path):
    lines = _plan(tmp_path, "timeout", "-k", "10", "435")
    order = [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("  section")]
    assert order == DEFAULT_ORDER
    # the budget follows the limit the script runs under, keeping 10 s to write its table
    assert "budget 425 s (the 435 s limit of the `timeout` running this script, less 10 s to close)" in lines[0]
    # data is built on every core, whatever OMP_NUM_THREADS says (nproc would say 1 here)
    assert lines[0].endswith(f"data on {CORES} cores")
    # on the GPU machine (16 cores), at the default sizes, everything but the second compiled graph is expected
    # within the default 420 s; that one runs when the sections before it beat their estimates
    lines = _plan(tmp_path, NPROC="16")
    assert "budget 420 s (the default BUDGET_S)" in lines[0]
    expected = re.fullmatch(r"expected: 13 sections in (\d+) s; not reached: bench_compile", lines[-1])
    assert expected and int(expected[1]) <= 420, lines[-1]
    # a section's estimate can be replaced (a previous run's seconds); old names run the section that replaced them
    lines = _plan(tmp_path, SECTIONS="machine sigterm_resume compile_predict", EST_S="compile_resume=500", BUDGET_S="300")
    assert [line.split()[:2] for line in lines if line.startswith("  ") and not line.startswith("  section")] == [
        ["machine", "10"], ["compile_resume", "500"]]
    assert lines[-1].endswith("not reached: compile_resume")
    bad = subprocess.run(["bash", str(GPU_CHECK)], env=_gpu_check_env(tmp_path, DRY_RUN="1", SECTIONS="machine warp"), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "gpu_check: unknown section 'warp' in SECTIONS; the sections are: machine bench_train" in bad.stderr


@pytest.mark.duration(90)
def test_the_gpu_check_runs_cpu_sized_in_value_order_skips_what_its_budget_cannot_fit_and_ends_with_a_table(tmp_path):
    """No GPU here: the machine check fails (ALLOW_CPU=1 lets the run go on), and the sections after it
    run in the default order. Every section after agreement is estimated beyond BUDGET_S (EST_S), so
    each is skipped with its reason, listed as not run, and named in the SECTIONS for the next run."""
    late = DEFAULT_ORDER[6:]
    env = _gpu_check_env(tmp_path, BUDGET_S="3000", EST_S=" ".join(f"{name}=9999" for name in late), **CPU_SIZED)
    result = subprocess.run(["bash", str(GPU_CHECK), str(tmp_path / "check")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = (tmp_path / "check" / "gpu_check_results.txt").read_text()
    assert result.stdout.rstrip().endswith("gpu_check_results.txt")
    # the machine first: what every figure ran on
    first = results.splitlines()[:8]
    assert first[0].startswith("== machine (") and any(line.startswith("torch ") and "cuDNN" in line for line in first)
    assert any(line.startswith(f"cores: {CORES} usable") for line in first) and any(line.startswith("/dev/shm: ") for line in first)
    assert "FAIL cuda: torch.cuda.is_available() is False" in results
    assert re.search(r"^PASS fp32 step: test_efficientnet on cpu: loss [\d.]+, [\d.]+, [\d.]+, \d+ parameter tensors updated", results, re.M)
    headers = re.findall(r"^== (\w+) \(", results, re.M)
    assert headers == DEFAULT_ORDER  # every section, skipped or not, in the default order
    for name in late:
        assert f"SKIPPED {name}: budget: estimated 9999 s, " in results

    table = _table(results)
    assert list(table) == DEFAULT_ORDER
    assert table["machine"][0] == "FAIL" and table["machine"][1].startswith("no CUDA (ALLOW_CPU: the step on the CPU)")
    assert table["data"][0] == "PASS" and table["data"][1].startswith(f"224 images (24 + 8 people), {CORES} processes: synth ")
    assert re.fullmatch(r"ratio [\d.]+ \(maskdist \d+ img/s, bare \d+ img/s at batch 8\)", table["bench_train"][1])
    assert re.fullmatch(r"best \d+ img/s at 1 workers \(ceiling \d+ in memory\); data wait 1: [\d.]+%", table["bench_epoch"][1])
    assert re.fullmatch(r"ratio [\d.]+ \(predict \d+ img/s, bare forward \d+ img/s, 2 models, 56 images\)", table["predict"][1])
    assert table["agreement"][:3] == ["PASS", "100.00% same class over 56 images, max probability difference 0.0000", ">= 99% same class"]
    for name in DEFAULT_ORDER[:6]:
        assert table[name][0] in ("PASS", "FAIL") and float(table[name][3].split()[0]) > 0  # ran, and timed
    for name in late:
        assert table[name][0] == "SKIPPED" and table[name][1].startswith("budget: estimated 9999 s, ") and table[name][3] == "- (9999)"
    assert "macro F1" in results  # predict's submission was scored

    closing = results.split("\n== results\n")[1].splitlines()
    assert closing[-2] == f"not run: {', '.join(late)} (budget)"
    again = ["machine", "data", *late]
    estimate = sum(int(table[name][3].split("(")[1].rstrip(")")) for name in again)
    assert closing[-1] == f"next: SECTIONS='{' '.join(again)}' (estimated {estimate} s)"


def test_a_section_past_the_budget_is_stopped_with_its_processes_and_the_table_is_still_written(tmp_path):
    """data (a synth of 7,700 images on 2 processes, well over a minute here) starts with a few seconds of
    BUDGET_S left; it is stopped at the budget with every process it started, and the run still ends
    with its table. The sections after it lack the shards and predict's output: skipped, saying so."""
    env = _gpu_check_env(tmp_path, **dict(CPU_SIZED, PEOPLE="1000", EVAL_PEOPLE="100", NPROC="2"), SECTIONS="data bench_epoch agreement",
                         BUDGET_S="8", EST_S="data=1")
    started = time.monotonic()
    script = subprocess.Popen(["bash", str(GPU_CHECK), str(tmp_path / "check")], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    seen = {}  # every process below the script, with its command line when first seen
    try:
        while script.poll() is None and time.monotonic() - started < 300:
            for ident in procs.descendants(script.pid):
                seen.setdefault(ident, procs.describe([ident]))
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        output = script.communicate(timeout=1)[0] if script.poll() is not None else ""
        left = procs.wait_gone(sorted(seen), 10)
    finally:
        _end(script, seen)
    assert script.returncode == 0, output[-3000:]
    assert any("maskdist synth" in command for command in seen.values()), seen
    assert not left, left
    assert elapsed < 60, elapsed  # the budget, the stop's grace and the table; the synth alone would take minutes
    results = (tmp_path / "check" / "gpu_check_results.txt").read_text()
    table = _table(results)
    assert table["data"][0] == "FAIL" and table["data"][1].startswith("stopped at the budget after ")
    assert float(table["data"][3].split()[0]) < 8 + 5 + 5  # stopped at its limit, killed at most 5 s later
    assert table["bench_epoch"][:2] == ["SKIPPED", "needs the shards: run data before it"]
    assert table["agreement"][:2] == ["SKIPPED", "needs predict's two predictions: run predict before it"]
    closing = results.split("\n== results\n")[1].splitlines()
    assert closing[-3] == "not run: bench_epoch (needs the shards); agreement (needs predict's two predictions)"
    assert closing[-2] == "stopped: data"
    assert closing[-1].startswith(f"next: SECTIONS={shlex.quote('machine data bench_epoch predict agreement')} (estimated ")


def test_a_sigterm_stops_the_running_section_with_its_processes_and_still_writes_the_table(tmp_path):
    """As a `timeout` around the whole script does at its limit: the section running (data's synth) is
    stopped with every process it started, and the results still end with the table before the exit."""
    env = _gpu_check_env(tmp_path, **dict(CPU_SIZED, PEOPLE="1000", EVAL_PEOPLE="100", NPROC="2"), SECTIONS="data bench_epoch")
    script = subprocess.Popen(["bash", str(GPU_CHECK), str(tmp_path / "check")], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    seen = {}

    def synth_running() -> bool:
        for ident in procs.descendants(script.pid):
            seen.setdefault(ident, procs.describe([ident]))
        return any("maskdist synth" in command for command in seen.values())

    try:
        assert procs.wait_for(synth_running, 120, every=0.1), seen
        script.send_signal(signal.SIGTERM)
        output = script.communicate(timeout=60)[0]
        left = procs.wait_gone(sorted(seen), 10)
    finally:
        _end(script, seen)
    assert script.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert not left, left
    results = (tmp_path / "check" / "gpu_check_results.txt").read_text()
    table = _table(results)
    assert table["data"][0] == "FAIL" and table["data"][1].startswith("stopped by signal 15 after ")
    assert table["bench_epoch"][:2] == ["SKIPPED", "not reached: stopped by signal 15"]
    assert results.rstrip().splitlines()[-1].startswith("next: SECTIONS='machine data bench_epoch' (estimated ")
