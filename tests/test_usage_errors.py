"""Usage mistakes are one line before torch loads, and a command that cannot run leaves
nothing behind: no fold folder, no experiment plan, no lock. Real processes, real shards."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, free_port, launch_env

from maskdist import config as config_mod
from maskdist.bench import cli as bench_cli
from maskdist.errors import MaskdistError
from maskdist.train import run_folder, trackers

# `python -m maskdist` with torch made unimportable: what a usage error must not need.
WITHOUT_TORCH = (sys.executable, "-c", "import sys; sys.modules['torch'] = None; from maskdist.cli import main;"
                 " sys.argv[0] = 'maskdist'; main()")
FAST = ["--model", "test_efficientnet", "--resize", "64", "--crop", "48", "--workers", "0", "--lr", "0.2", "--timeout-s", "120"]


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (done.returncode, done.stderr[-2000:])
    return lines[0]


@pytest.mark.duration(25)
def test_every_usage_error_is_one_line_without_torch_and_writes_nothing(small_shards, small_synth, tmp_path):
    cases = bench_cli.cases(tmp_path, str(small_shards))
    # a folder of photos is not a shard set
    cases.append(bench_cli.Case("train: not a shard set", ("train", "--shards", str(small_synth), "--out", str(tmp_path / "runs")),
                                "manifest.json"))
    env = launch_env(tmp_path)
    for case in cases:
        _times, done = bench_cli.run_case(case, env=env, python=WITHOUT_TORCH, cwd=tmp_path)
        assert case.says in _one_line_error(done), case.name
    assert not (tmp_path / "runs").exists()  # no experiment folder, fold folder, plan or lock


def test_the_fold_error_names_folds_that_train(small_shards, tmp_path):
    """Its advice (the folds the set has) is advice that works: the named last fold passes the same checks."""
    env = launch_env(tmp_path)
    train = ("train", "--shards", str(small_shards), "--out", str(tmp_path / "runs"), "--print-config")
    refused = subprocess.run([*WITHOUT_TORCH, *train[:-1], "--fold", "3"], env=env, capture_output=True, text=True)
    assert "folds 0..2" in _one_line_error(refused)
    from maskdist.cli import usage

    usage.check_train(config_mod.load(None, {"shards": str(small_shards), "fold": "2", "out": str(tmp_path / "runs")}))
    assert not (tmp_path / "runs").exists()


@pytest.mark.duration(40)
def test_a_run_that_fails_on_its_weights_writes_no_plan_and_the_corrected_run_needs_no_replan(small_shards, tmp_path):
    """Offline, hub weights that are not in the cache stop the run after torch loaded; the
    experiment's plan and the fold folder are not written, so the corrected command runs as is."""
    env = launch_env(tmp_path) | {"HF_HUB_OFFLINE": "1"}
    out = tmp_path / "runs"
    base = [sys.executable, "-m", "maskdist", "train", "--shards", str(small_shards), "--fold", "0", "--out", str(out),
            "--epochs", "1", "--max-steps", "1", *FAST]
    failed = subprocess.run([*base, "--pretrained", "hub", "--batch-size", "16"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))
    corrected = subprocess.run([*base, "--pretrained", "none", "--batch-size", "8"], env=env, capture_output=True, text=True,
                               timeout=300)
    assert corrected.returncode == 0, corrected.stderr[-3000:]
    assert (out / "experiment.yaml").is_file() and (out / "fold0" / "best.safetensors").is_file()


def test_a_fold_folder_a_run_never_started_in_is_no_fold(tmp_path):
    """What older versions left after a refused run (a launch record, no configuration) does not block the experiment."""
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold0" / "config.yaml").write_text("fold: '0'\n")
    (tmp_path / "fold3").mkdir()
    (tmp_path / "fold3" / "launches.jsonl").write_text("{}\n")
    assert run_folder.experiment_runs(tmp_path) == [tmp_path / "fold0"]
    (tmp_path / "fold0" / "config.yaml").unlink()
    with pytest.raises(MaskdistError, match="holds no fold<K> folders: train the folds first"):
        run_folder.experiment_runs(tmp_path)


@pytest.mark.parametrize("flag, value", [
    ("lr", -1.0), ("lr", 0.0), ("momentum", -0.1), ("momentum", 1.0), ("weight_decay", -1.0), ("gamma", -1.0),
    ("label_smoothing", 1.0), ("label_smoothing", -0.1), ("warmup_epochs", -1.0), ("min_lr", -1e-4), ("min_lr", 1.0),
])
def test_optimiser_and_loss_values_out_of_range_are_refused_by_name(flag, value):
    with pytest.raises(MaskdistError, match=f"--{flag.replace('_', '-')} must"):
        config_mod.load(None, {"shards": "s", flag: value})
    config_mod.load(None, {"shards": "s"})  # the defaults pass


def test_mlflow_without_a_usable_store_is_refused_up_front(monkeypatch):
    if trackers._mlflow_major() is None or trackers._mlflow_major() < 3:
        pytest.skip("MLflow 3 is not installed (MLflow 2 has a default store)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(MaskdistError, match="set MLFLOW_TRACKING_URI"):
        trackers.check_names("tensorboard,mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:mlruns")
    with pytest.raises(MaskdistError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        trackers.check_names("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert trackers.check_names("mlflow") == ["mlflow"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    assert trackers.check_names("mlflow") == ["mlflow"]


def test_the_tracker_list_is_accelerates():
    from accelerate.utils import LoggerType

    assert set(trackers.KNOWN) == {t.value for t in LoggerType if t.value != "all"}


def test_onnx_export_without_the_onnx_extra_is_one_line(tmp_path):
    """The extra's absence is simulated: onnx made unimportable in the subprocess (it is installed here)."""
    run = tmp_path / "fold0"
    run.mkdir()
    (run / "model.json").write_text("{}")
    script = ("import sys; sys.modules['onnx'] = None; from maskdist.cli import main; sys.argv[0] = 'maskdist'; main()")
    done = subprocess.run([sys.executable, "-c", script, "export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
                          env=launch_env(tmp_path), capture_output=True, text=True, cwd=REPO)
    assert "[onnx] extra" in _one_line_error(done) and "pip install 'maskdist[onnx]'" in done.stderr
    assert not (tmp_path / "m.onnx").exists()


WRITE_UNTIL_FULL = """
import sys
import time
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.event_file_writer import EventFileWriter
if sys.argv[2] == "quiet":
    from maskdist.system.writer_threads import quiet_disk_full_in_writers
    quiet_disk_full_in_writers()
writer = EventFileWriter(sys.argv[1], flush_secs=0.05)
try:
    for _ in range(200):
        writer.add_event(Event(file_version="x" * 20000))  # the writer thread writes; this raises what it met
        time.sleep(0.02)  # the thread's turn
    print("never full")
except OSError as err:
    print(f"main thread: errno {err.errno}")
"""


@pytest.mark.duration(8)
def test_a_full_disk_in_tensorboards_writer_thread_prints_no_traceback(tmp_path):
    """A real 64 KiB tmpfs (mounting needs root: skipped otherwise) filled by TensorBoard's own writer thread."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        runs = {}
        for mode in ("plain", "quiet"):
            folder = disk / mode
            folder.mkdir()
            runs[mode] = subprocess.run([sys.executable, "-c", WRITE_UNTIL_FULL, str(folder), mode], env=launch_env(tmp_path),
                                        capture_output=True, text=True, timeout=120)
            for f in folder.iterdir():
                f.unlink()
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    for mode, done in runs.items():
        assert "main thread: errno 28" in done.stdout, (mode, done.stdout, done.stderr[-2000:])
    assert "Exception in thread" in runs["plain"].stderr  # what the hook is for: the thread tells it too
    assert "Traceback" not in runs["quiet"].stderr and "Exception in thread" not in runs["quiet"].stderr, runs["quiet"].stderr


@pytest.mark.duration(20)
def test_a_gpu_launch_on_a_machine_without_gpus_says_so_once(small_shards, tmp_path):
    """accelerate's multi-GPU launcher, 2 processes, no GPU visible and no ACCELERATE_USE_CPU: the
    first rank says it in one line, the other ends with the same status in silence (the
    launcher's own report of a failed child follows: it is accelerate's, not maskdist's)."""
    env = launch_env(tmp_path) | {"CUDA_VISIBLE_DEVICES": ""}
    env.pop("ACCELERATE_USE_CPU")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "maskdist", "train", "--shards", str(small_shards), "--out", str(tmp_path / "runs")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and "0 GPU(s)" in said[0] and "ACCELERATE_USE_CPU=1" in said[0], done.stderr[-3000:]
    assert not (tmp_path / "runs").exists()
