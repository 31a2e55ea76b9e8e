"""--log-with: accelerate's trackers beside TensorBoard, with the same scalars and
hyperparameters. MLflow's file store writes locally without a server; its records are read
back through MLflow's own client and compared with the TensorBoard events of the same run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import launch_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskdist.errors import MaskdistError
from maskdist.train import trackers


@pytest.mark.duration(8)
def test_mlflow_beside_tensorboard_gets_the_same_scalars_and_hyperparameters(small_shards, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store: local, no server
    store = f"file:{tmp_path / 'mlruns'}"
    env = launch_env(tmp_path) | {"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"}
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "maskdist", "train", "--config", "cpu_fast", "--shards", str(small_shards), "--fold", "0",
           "--out", str(out), "--epochs", "1", "--max-steps", "4", "--log-every", "2", "--resize", "64", "--crop", "48",
           "--batch-size", "8", "--workers", "0", "--val-workers", "0", "--log-with", "tensorboard,mlflow"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    client = mlflow.tracking.MlflowClient(store)
    experiment = client.get_experiment_by_name("exp")  # the experiment folder's name
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "fold0"
    shown = {}  # TensorBoard's scalars of the run (its event files: the scalars', the hparams')
    for path in (out / "fold0" / "tb").rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            shown.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    tags = [t for t in shown if t.startswith(("train/", "val/"))]
    assert "train/loss" in tags and "val/macro_f1" in tags and any("<30" in t for t in tags)
    for tag in tags:
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag.replace("<", "lt"))]
        logged, expected = sorted(logged), sorted(shown[tag])
        assert [step for step, _ in logged] == [step for step, _ in expected], tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    config = json.loads(json.dumps(run.data.params))
    assert config["lr"] == "0.4" and config["model"] == "test_efficientnet" and config["log_with"] == "tensorboard,mlflow"
    card = json.loads((out / "fold0" / "model.json").read_text())
    assert run.data.metrics["hparams/best_macro_f1"] == pytest.approx(card["metrics"]["macro_f1"])


def test_log_with_names_are_checked():
    assert trackers.parse("tensorboard") == [] and trackers.parse(" tensorboard , tensorboard ") == []
    with pytest.raises(MaskdistError, match="not a tracker accelerate knows"):
        trackers.parse("tensorboard,neptune")
    with pytest.raises(MaskdistError, match=r"not installed \(pip install aim\)"):
        trackers.parse("aim")  # accelerate knows it; this environment does not have it
