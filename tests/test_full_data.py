"""The full-data model (--fold all): every fold's samples, no validation and no OOF, its epoch
count from the folds' best epochs, a mid-epoch resume as a fold has, and the experiment's
out-of-fold figures untouched by it. A real k-fold experiment and real processes."""
from __future__ import annotations

import json
import math
import signal
import statistics
import subprocess
import sys

import numpy as np
import pandas as pd
import procs
import pytest
from conftest import launch_env

from maskdist.infer import scoring
from maskdist.infer.scoring import FULL_DATA_FOLD
from maskdist.system.lock import FolderLock
from maskdist.train.preemption import PREEMPTED_EXIT

FAST = ["--model", "test_efficientnet", "--resize", "64", "--crop", "48", "--batch-size", "8", "--workers", "1",
        "--max-steps", "4", "--lr", "0.2", "--timeout-s", "120"]


@pytest.fixture(scope="module")
def experiment(small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "runs"
    cmd = [sys.executable, "-m", "maskdist", "kfold", "--shards", str(small_shards), "--out", str(out), "--cpu", "--epochs", "3",
           *FAST]
    result = subprocess.run(cmd, env=launch_env(out.parent), capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


@pytest.mark.xdist_group("full-data")
@pytest.mark.duration(60)
def test_the_full_data_model_trains_on_every_fold_for_the_folds_epochs_and_resumes(experiment, small_shards, tmp_path):
    before = scoring.oof_scores(experiment)
    train = [sys.executable, "-m", "maskdist", "train", "--shards", str(small_shards), "--out", str(experiment), "--fold", "all",
             "--epochs-from", str(experiment), "--epochs", "3", "--log-batches", *FAST]
    run = subprocess.Popen(train, env=launch_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    batches = experiment / "all" / "batches" / "rank0.txt"
    assert procs.wait_for(lambda: batches.exists() and len(batches.read_text().splitlines()) >= 1, 240)
    procs.signal_frozen(run.pid, signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    assert run.returncode == PREEMPTED_EXIT, output[-2000:]
    state = json.loads((experiment / "all" / "state" / "trainer.json").read_text())
    # stopped inside an epoch: before its last step or, on a loaded machine, after it but before the epoch's end
    assert not state["epoch_done"] and 0 < state["step"] <= state["steps_per_epoch"]

    again = subprocess.run([*train, "--resume"], env=launch_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resuming at epoch {state['epoch']} step {state['step']}" in again.stdout

    # its epochs are one past the median of the folds' best epochs, whatever --epochs said; the
    # best epochs are counted from 0 as the fold lines and model.json count them
    best = [json.loads((experiment / f"fold{k}" / "model.json").read_text())["epoch"] for k in range(3)]
    card = json.loads((experiment / "all" / "model.json").read_text())
    assert card["epochs"] == math.ceil(statistics.median(best)) + 1 == card["epochs_from"]["epochs"]
    assert card["epochs_from"]["best_epoch"] == {f"fold{k}": best[k] for k in range(3)}
    assert f"({', '.join(f'fold{k} epoch {best[k]}' for k in range(3))})" in again.stdout
    assert card["validation"] is False and card["finished"] and card["fold"] == "all" and card["train_folds"] == [0, 1, 2]
    assert card["epoch"] == card["epochs"] - 1  # the last epoch's model, not a "best" one
    assert not (experiment / "all" / "oof.csv").exists()
    # every step once, and keys of every fold: each fold's samples are its oof.csv keys
    steps = [tuple(line.split(" ", 2)[:2]) for line in batches.read_text().splitlines()]
    assert len(steps) == len(set(steps)) == card["epochs"] * state["steps_per_epoch"]
    keys = {k for line in batches.read_text().splitlines() for k in line.split(" ", 2)[2].split()}
    folds_of = {key: fold for fold in range(3) for key in pd.read_csv(experiment / f"fold{fold}" / "oof.csv")["key"]}
    assert {folds_of[k] for k in keys if k in folds_of} == {0, 1, 2}
    # the out-of-fold figures ignore it: it has no out-of-fold rows
    after = scoring.oof_scores(experiment)
    assert after["oof"].macro_f1 == before["oof"].macro_f1 and after["samples"] == before["samples"]


@pytest.mark.xdist_group("full-data")
def test_epochs_from_an_unfinished_experiment_is_refused(experiment, small_shards, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "fold0").symlink_to(experiment / "fold0")
    (partial / "fold1").mkdir()  # a fold that never finished
    result = subprocess.run([sys.executable, "-m", "maskdist", "train", "--shards", str(small_shards), "--out",
                             str(tmp_path / "o"), "--fold", "all", "--epochs-from", str(partial), *FAST],
                            env=launch_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "fold(s) fold1 are not finished" in result.stderr and "Traceback" not in result.stderr
    wrong = subprocess.run([sys.executable, "-m", "maskdist", "train", "--shards", str(small_shards), "--out", str(tmp_path / "o"),
                            "--fold", "1", "--epochs-from", str(experiment), *FAST], env=launch_env(tmp_path), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "--epochs-from goes with --fold all" in wrong.stderr


def _maskdist(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "maskdist", *map(str, args)], env=launch_env(cwd), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def full_model(experiment, small_shards):
    """The experiment's full-data model (trained by the first test; here when it ran alone)."""
    if not (experiment / "all" / "best.safetensors").is_file():
        trained = _maskdist("train", "--shards", small_shards, "--out", experiment, "--fold", "all", "--epochs", "1", *FAST,
                            cwd=experiment.parent)
        assert trained.returncode == 0, trained.stderr[-2000:]
    return experiment / "all"


@pytest.mark.xdist_group("full-data")
@pytest.mark.duration(40)
def test_predict_takes_the_full_data_model_alone_and_beside_the_folds(experiment, full_model, small_shards, tmp_path):
    common = ["--shards", small_shards, "--workers", "0", "--decisions", "argmax"]
    alone = _maskdist("predict", full_model, "--out", tmp_path / "alone.csv", *common, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert " x 1 model on 1 process (full precision, TTA none, uniform weights): " in alone.stdout  # not "1 models ... (no)"
    solo = np.load(tmp_path / "alone.probs.npz")
    assert solo["folds"].tolist() == [FULL_DATA_FOLD]
    assert [m["fold"] for m in json.loads((tmp_path / "alone.predict.json").read_text())["members"]] == ["all"]

    beside = _maskdist("predict", experiment, full_model, "--full-weight", "0.4", "--out", tmp_path / "beside.csv", *common,
                       cwd=tmp_path)
    assert beside.returncode == 0, beside.stderr[-2000:]
    both = np.load(tmp_path / "beside.probs.npz")
    assert both["folds"].tolist() == [0, 1, 2, FULL_DATA_FOLD]
    np.testing.assert_allclose(both["weights"], [0.2, 0.2, 0.2, 0.4], atol=1e-6)  # 0.4 to it, the rest shared by the folds
    assert both["image_id"].tolist() == solo["image_id"].tolist()
    np.testing.assert_allclose(both["fold_probs"][:, 3], solo["probs"], atol=1e-5)  # the same model's vote
    np.testing.assert_allclose(both["probs"], 0.4 * solo["probs"] + 0.6 * both["fold_probs"][:, :3].mean(axis=1), atol=1e-5)

    folds_only = _maskdist("predict", experiment, "--out", tmp_path / "folds.csv", *common, cwd=tmp_path)
    assert folds_only.returncode == 0 and "(the full-data model) does not vote: name it too" in folds_only.stderr
    assert np.load(tmp_path / "folds.probs.npz")["folds"].tolist() == [0, 1, 2]

    pointless = _maskdist("predict", full_model, "--full-weight", "0.4", "--out", tmp_path / "x.csv", *common, cwd=tmp_path)
    assert pointless.returncode == 2 and "--full-weight needs a full-data model beside its experiment's folds" in pointless.stderr
    assert not (tmp_path / "x.csv").exists()

    # oof says it leaves the full-data model out, and refuses it named alone
    figures = _maskdist("oof", experiment, cwd=tmp_path)
    assert figures.returncode == 0 and "the full-data model has no out-of-fold rows" in figures.stderr
    named = _maskdist("oof", full_model, cwd=tmp_path)
    assert named.returncode == 2 and "has no out-of-fold predictions" in named.stderr and "Traceback" not in named.stderr


@pytest.mark.xdist_group("full-data")
def test_predict_refuses_an_out_folder_a_live_run_holds(experiment, small_shards, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    with FolderLock(held, command="a test standing in for a live run").acquire():  # this test process is the live holder
        refused = _maskdist("predict", experiment, "--shards", small_shards, "--out", held / "sub.csv", cwd=tmp_path)
    assert refused.returncode == 2 and f"{held} is in use by" in refused.stderr and "Traceback" not in refused.stderr
    assert not list(held.glob("sub*"))


@pytest.mark.xdist_group("full-data")
@pytest.mark.duration(40)
def test_kfold_full_lets_the_full_data_model_vote_and_scores_it(experiment, full_model, small_shards, small_synth, tmp_path):
    """kfold --full trains OUT/all (reused here) and it votes in kfold's own submission as one
    more fold, scored alone where answers are given; export says it leaves it out."""
    submission = tmp_path / "sub.csv"
    ran = subprocess.run([sys.executable, "-m", "maskdist", "kfold", "--shards", str(small_shards), "--out", str(experiment), "--cpu",
                          "--epochs", "3", *FAST, "--full", "--submission", str(submission), "--answers",
                          str(small_synth / "eval_answers.csv")],
                         env=launch_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    voted = np.load(tmp_path / "sub.probs.npz")
    assert voted["folds"].tolist() == [0, 1, 2, FULL_DATA_FOLD]
    np.testing.assert_allclose(voted["weights"], [0.25] * 4, atol=1e-6)  # one more fold
    assert "does not vote" not in ran.stderr
    assert "the full-data model as one more fold" in ran.stdout
    alone = scoring.ensemble_and_folds(tmp_path / "sub.probs.npz", small_synth / "eval_answers.csv")["full_data"]
    assert f"the full-data model alone: {alone:.4f}" in ran.stdout

    exported = _maskdist("export", experiment, "--format", "timm", "--out", tmp_path / "timm", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert f"note: {experiment / 'all'} (the full-data model) is not exported: name it too" in exported.stderr
