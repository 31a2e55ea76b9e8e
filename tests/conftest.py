"""Shared fixtures: small synthetic datasets written once per test session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maskdist.train.kfold import free_port  # noqa: F401  (tests import it from here)


def pytest_collection_modifyitems(items):
    """Longest tests first (their ``duration`` marker), the rest in file order: with ``-n 2``
    both workers then finish together instead of one running the long tail alone."""
    def seconds(item) -> float:
        marker = item.get_closest_marker("duration")
        return marker.args[0] if marker else 0.0

    items.sort(key=seconds, reverse=True)


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory) -> Path:
    """A small synthetic competition folder (train + eval), written once. Do not modify it:
    copy it with ``synth_copy`` first."""
    from maskdist.data.synth import write_dataset

    out = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(out, people=40, eval_people=12, seed=3, workers=1)
    return out


@pytest.fixture
def synth_copy(small_synth, tmp_path) -> Path:
    """A private, modifiable copy of ``small_synth``."""
    target = tmp_path / "data"
    shutil.copytree(small_synth, target)
    return target


# --- training fixtures ----------------------------------------------------------------------


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_shards(small_synth, tmp_path_factory) -> Path:
    """Shards of ``small_synth`` (3 folds, images stored at 64 px short side for speed)."""
    from maskdist.shards import build_shards

    out = tmp_path_factory.mktemp("shards") / "small"
    build_shards(small_synth / "train", out, eval_dir=small_synth / "eval", folds=3, seed=0, image_size=64, workers=1)
    return out


EXPERIMENT_FOLDS = 3
EXPERIMENT_TRAIN = ["--model", "test_efficientnet", "--resize", "64", "--crop", "48", "--batch-size", "16", "--workers", "0",
                    "--lr", "0.2", "--epochs", "1", "--max-steps", "3"]


@pytest.fixture(scope="session")
def trained_experiment(small_shards, tmp_path_factory) -> Path:
    """A k-fold experiment of tiny models on ``small_shards`` (every fold, one seed). Tests that
    use it share the xdist group ``predict-experiment`` (one worker trains it); copy it before
    writing into it."""
    out = tmp_path_factory.mktemp("exp") / "runs"
    env = launch_env(out.parent)
    for fold in range(EXPERIMENT_FOLDS):
        cmd = [sys.executable, "-m", "maskdist", "train", "--shards", str(small_shards), "--fold", str(fold), "--out", str(out),
               *EXPERIMENT_TRAIN]  # one seed for every fold: the experiment's plan holds it
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out.parent)
        assert result.returncode == 0, result.stderr[-3000:]
    return out


def launch_env(tmp_path: Path) -> dict:
    """Environment for launched processes: CPU DDP, no stale accelerate config, no GPU."""
    env = dict(os.environ)
    env.update(ACCELERATE_USE_CPU="1", HF_HOME=str(tmp_path / "hf"), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def accelerate_cmd(processes: int, *args: str) -> list[str]:
    """``accelerate launch`` of ``python -m maskdist ARGS`` on ``processes`` CPU processes (gloo)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes == 1:
        return launcher + ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "-m", "maskdist", *args]
    return launcher + ["--config_file", str(REPO / "launch" / "cpu_ddp.yaml"), "--num_processes", str(processes),
                       "--main_process_port", str(free_port()), "-m", "maskdist", *args]


def run_launch(cmd: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a launch; a hang becomes a failure after ``timeout`` seconds."""
    return subprocess.run(cmd, env=launch_env(tmp_path), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
