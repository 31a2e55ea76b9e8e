"""A loader worker killed from outside (what the OOM killer does) and a diverged loss stop a
run in one line, with the steps done before them saved; ``--resume`` then gives the batches
of an uninterrupted run.

Everything is real: training and predict run as processes, the worker is found in /proc below
the forkserver and gets a real SIGKILL while its owner is frozen (SIGSTOP), so the kill lands
mid-pass however loaded the machine is.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import procs
import pytest
from conftest import launch_env, run_launch

from maskdist.shards.manifest import open_shard_set
from maskdist.system.worker_death import WORKER_DIED_EXIT

FAST = ["--model", "test_efficientnet", "--resize", "64", "--crop", "48", "--lr", "0.2", "--timeout-s", "60"]
# 2 epochs of 5 steps of 4; validation reads its fold in batches of 4 (about 20 of them)
ARGS = ["--fold", "0", "--epochs", "2", "--max-steps", "5", "--batch-size", "4", "--seed", "5", "--log-batches", *FAST]


def _direct(*args) -> list[str]:
    return [sys.executable, "-m", "maskdist", *args]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _loader_workers(owner: int) -> list[int]:
    """Pids of the loader workers ``owner`` started: the forkserver's children."""
    tree = procs.children_map()
    servers = [p for p in tree.get(owner, []) if b"forkserver" in _cmdline(p)]
    return sorted(child for server in servers for child in tree.get(server, []))


def _kill_worker_frozen(owner: int, pid: int) -> None:
    """kill -9 a worker while its owner is frozen: the owner then finds it dead mid-pass."""
    os.kill(owner, signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(owner, signal.SIGCONT)


def _kill_second_worker(proc: subprocess.Popen) -> tuple[int, str]:
    """Once ``proc`` has two loader workers, kill -9 the younger (pids grow; for training the
    older is the training loader's, which lives all run); (its pid, ``proc``'s stderr)."""
    try:
        assert procs.wait_for(lambda: len(_loader_workers(proc.pid)) >= 2, 180)
        worker = _loader_workers(proc.pid)[1]
        _kill_worker_frozen(proc.pid, worker)
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == WORKER_DIED_EXIT, stderr[-3000:]
    assert "Traceback" not in stderr
    return worker, stderr


def _batches(run: Path) -> list[str]:
    return (run / "fold0" / "batches" / "rank0.txt").read_text().splitlines()


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def uninterrupted(small_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "runs"
    result = run_launch(_direct("train", "--shards", str(small_shards), "--out", str(out), *ARGS, "--workers", "1"),
                        out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _start(small_shards, out: Path, tmp_path: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(_direct("train", "--shards", str(small_shards), "--out", str(out), *ARGS, *extra),
                            env=launch_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _resume_matches(small_shards, out: Path, uninterrupted: Path, tmp_path: Path, *extra) -> None:
    again = run_launch(_direct("train", "--shards", str(small_shards), "--out", str(out), *ARGS, *extra, "--resume"), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _batches(out) == _batches(uninterrupted)  # every batch once, in the uninterrupted order
    best = json.loads((out / "fold0" / "model.json").read_text())["metrics"]
    assert best == json.loads((uninterrupted / "fold0" / "model.json").read_text())["metrics"]


@pytest.mark.duration(40)
def test_kill_9_of_a_training_worker_saves_the_steps_done_and_resume_continues_exactly(small_shards, uninterrupted, tmp_path):
    out = tmp_path / "runs"
    proc = _start(small_shards, out, tmp_path, "--workers", "1")
    try:
        assert procs.wait_for(lambda: (out / "fold0" / "batches" / "rank0.txt").exists() and len(_batches(out)) >= 2
                              and _loader_workers(proc.pid), 180)
        _kill_worker_frozen(proc.pid, _loader_workers(proc.pid)[0])
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == WORKER_DIED_EXIT, stderr[-3000:]
    assert "Traceback" not in stderr and "Aborted" not in stderr
    state = json.loads((out / "fold0" / "state" / "trainer.json").read_text())
    done = len(_batches(out))  # the batches it trained on before the worker died: none lost
    assert (state["epoch"], state["step"], state["epoch_done"]) == (0, done, False) and 2 <= done < 5
    line = _last_line(stderr)
    assert line.startswith("error: a worker of the training loader (pid ") and "was killed by SIGKILL" in line, stderr[-3000:]
    assert "out-of-memory" in line and "dmesg" in line and "--workers" in line and "--batch-size" in line
    assert f"saved a resumable state at epoch 0 step {done}; resume with: maskdist train" in line and line.endswith("--resume")
    _resume_matches(small_shards, out, uninterrupted, tmp_path, "--workers", "1")


@pytest.mark.duration(35)
def test_kill_9_of_a_validation_worker_saves_the_epochs_steps_and_resume_validates_it(small_shards, uninterrupted, tmp_path):
    out = tmp_path / "runs"
    # the validation worker starts for its pass, beside the training one
    val_worker, stderr = _kill_second_worker(_start(small_shards, out, tmp_path, "--workers", "1", "--val-workers", "1"))
    state = json.loads((out / "fold0" / "state" / "trainer.json").read_text())
    assert (state["epoch"], state["step"], state["epoch_done"]) == (0, 5, False)
    assert not (out / "fold0" / "model.json").exists()  # no epoch was scored on part of its fold
    line = _last_line(stderr)
    assert line.startswith(f"error: a worker of the validation loader (pid {val_worker}) was killed by SIGKILL"), stderr[-3000:]
    assert "saved a resumable state at epoch 0 step 5; resume with: maskdist train" in line
    _resume_matches(small_shards, out, uninterrupted, tmp_path, "--workers", "1", "--val-workers", "1")


@pytest.mark.duration(15)
def test_kill_9_of_a_predict_worker_is_one_line_and_writes_nothing(small_shards, uninterrupted, tmp_path):
    info = Path(open_shard_set(small_shards).manifest["build"]["eval_dir"]) / "info.csv"
    sub = tmp_path / "s.csv"
    # a tiny batch and TTA keep predict busy long enough to be caught mid-pass
    proc = subprocess.Popen(_direct("predict", str(uninterrupted / "fold0"), "--shards", str(small_shards), "--info", str(info),
                                    "--out", str(sub), "--workers", "2", "--batch-size", "1", "--tta", "hflip"),
                            env=launch_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker, stderr = _kill_second_worker(proc)
    assert _last_line(stderr).startswith(f"error: a worker of the prediction loader (pid {worker}) was killed by SIGKILL")
    assert _last_line(stderr).endswith("nothing was written: run the same command again")
    assert not sub.exists() and not list(tmp_path.glob("s*.csv*"))


# --- a diverged loss ------------------------------------------------------------------------------


@pytest.mark.duration(12)
def test_a_non_finite_training_loss_stops_at_once_with_the_state_before_it(small_shards, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from maskdist.model.factory import create_model

    model = create_model("test_efficientnet", drop_rate=0.0, warn_random=False)
    weights = {name: value.clone().contiguous() for name, value in model.state_dict().items()}
    stem = next(name for name, value in weights.items() if value.ndim == 4)
    weights[stem][0, 0, 0, 0] = float("nan")  # one poisoned weight: every logit, so the loss, is NaN
    poisoned = tmp_path / "poisoned.safetensors"
    save_file(weights, str(poisoned))

    out = tmp_path / "runs"
    args = _direct("train", "--shards", str(small_shards), "--out", str(out), *ARGS, "--workers", "0",
                   "--pretrained", str(poisoned))
    result = run_launch(args, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = _last_line(result.stderr)
    assert line.startswith("error: the training loss is nan at epoch 0 step 0: the run diverged (lower --lr"), line
    assert "saved a resumable state at epoch 0 step 0; resume with: maskdist train" in line and line.endswith("--resume")
    assert len(_batches(out)) == 1  # it stopped on the first batch, not after the epoch
    state = json.loads((out / "fold0" / "state" / "trainer.json").read_text())
    assert (state["epoch"], state["step"], state["epoch_done"]) == (0, 0, False)
    saved = load_file(str(out / "fold0" / "state" / "model.safetensors"))
    # the weights before the step: the poisoned one as loaded, the others not turned to NaN by an update
    assert sum(int(torch.isnan(v).sum()) for v in saved.values() if v.is_floating_point()) == 1
    again = run_launch(args + ["--resume"], tmp_path)  # the state loads; the same weights diverge the same way
    assert again.returncode == 2 and "resuming at epoch 0 step 0" in again.stdout, again.stderr[-3000:]


def test_a_killed_resource_tracker_leaves_no_traceback(tmp_path):
    """Locks registered with multiprocessing's resource tracker, the tracker killed, the locks
    released: the tracker multiprocessing starts again knows none of their names."""
    script = tmp_path / "tracker.py"
    script.write_text(f"""
import gc, os, signal, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from multiprocessing import resource_tracker
from maskdist.system import parallel
locks = [parallel.context(preload=()).Lock() for _ in range(3)]  # named semaphores, registered
os.kill(resource_tracker._resource_tracker._pid, signal.SIGKILL)
time.sleep(0.3)
del locks  # unregistered: the first call starts a new tracker
gc.collect()
print("done", flush=True)
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=launch_env(tmp_path))
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "KeyError" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("resource tracker was killed") == 1, result.stderr
