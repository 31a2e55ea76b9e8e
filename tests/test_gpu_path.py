"""The GPU path's fixes that can be proven on a CPU: --compile end to end (inductor runs on
CPU), the /dev/shm check against a real small tmpfs, the shared-`--out` check refusing a
machine that sees another folder, and the NHWC batches a channels_last model gets on CUDA.
No GPU exists here; nothing is mocked."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import numpy as np
import procs
import pytest
import torch
from conftest import free_port, launch_env
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
