"""Training under real launches: 2-process CPU DDP (gloo), kill and resume, TensorBoard
events read back, atomic checkpoints."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import accelerate_cmd, launch_env, run_launch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskdist import metrics
from maskdist.shards.manifest import open_shard_set
from maskdist.train import checkpoint

FAST = ["--model", "test_efficientnet", "--resize", "64", "--crop", "48", "--batch-size", "16", "--workers", "1",
        "--lr", "0.2", "--log-every", "2", "--timeout-s", "120"]


def _train_args(shards, out, fold=0, epochs=2, *extra):
    return ["train", "--shards", str(shards), "--fold", str(fold), "--out", str(out), "--epochs", str(epochs), *FAST, *extra]


def _events(run_dir):
    files = sorted((run_dir / "tb").rglob("events.out.tfevents.*"))
    accumulators = []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        acc.Reload()
        accumulators.append(acc)
    return accumulators


def _has_plugin(acc, name: str) -> bool:
    try:
        return bool(acc.PluginTagToContent(name))
    except KeyError:
        return False


# Its tests form one unit for the scheduler (xdist_group), so the run is made once.
@pytest.fixture(scope="module")
def ddp_run(small_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    result = run_launch(accelerate_cmd(2, *_train_args(small_shards, tmp / "runs", 1, 2, "--max-steps", "6")), tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "runs" / "fold1", result


@pytest.mark.xdist_group("train-ddp-run")
@pytest.mark.duration(50)
def test_two_process_ddp_trains_and_validates_each_sample_once(ddp_run, small_shards):
    run_dir, result = ddp_run
    assert "2 process(es)" in result.stdout
    assert re.search(r"^epoch 1: loss [\d.]+, \d+ img/s, data wait [\d.]+%, val macro F1", result.stdout, re.M)
    shard_set = open_shard_set(small_shards)
    oof = pd.read_csv(run_dir / "oof.csv")
    assert oof["key"].is_unique
    assert len(oof) == shard_set.samples("train", [1], extra=False)
    assert set(oof["fold"]) == {1}
    people_in_fold = {k.split("/")[0] for k in oof["key"]}
    assert len(people_in_fold) * 7 >= len(oof)
    probs = oof[[f"p{c:02d}" for c in range(18)]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert (oof["pred"] == probs.argmax(axis=1)).all()
    card = checkpoint.read_card(run_dir)
    assert card["fold"] == 1 and card["architecture"] == "test_efficientnet" and card["image"] == {"resize": 64, "crop": 48}
    # the card's F1 is the F1 of the saved out-of-fold predictions
    assert card["metrics"]["macro_f1"] == pytest.approx(metrics.score(oof["label_true"], oof["pred"]).macro_f1)
    model, _ = checkpoint.load(run_dir)
    assert model.get_classifier().out_features == 18
    state = json.loads((run_dir / "state" / "trainer.json").read_text())
    assert state["epoch"] == 1 and state["steps_per_epoch"] == 6


@pytest.mark.xdist_group("train-ddp-run")
def test_the_start_line_says_how_the_lr_was_scaled(ddp_run):
    _, result = ddp_run  # --lr 0.2 at the default --base-batch 256; 2 processes x 16
    assert "lr 0.025 (--lr 0.2 scaled to the global batch 32 from --base-batch 256)" in result.stdout


@pytest.mark.xdist_group("train-ddp-run")
def test_tensorboard_events_hold_the_promised_tags(ddp_run):
    run_dir, _ = ddp_run
    scalars, images = set(), set()
    values = {}
    for acc in _events(run_dir):
        tags = acc.Tags()
        scalars |= set(tags["scalars"])
        images |= set(tags["images"])
        for tag in tags["scalars"]:
            values[tag] = [e.value for e in acc.Scalars(tag)]
    for tag in ("train/loss", "train/lr", "train/images_per_s", "val/macro_f1", "val/part_f1/mask", "val/part_f1/gender",
                "val/part_f1/age", "val/class_f1/00_wear_male_<30"):
        assert tag in scalars, tag
    assert sum(t.startswith("val/class_f1/") for t in scalars) == 18
    assert {"val/confusion", "train/augmented_batch"} <= images
    assert len(values["val/macro_f1"]) == 2  # one per epoch, from the main process only
    assert all(v > 0 for v in values["train/images_per_s"])
    # train/loss is the mean over each log window (2 steps here); the epoch loss is the mean of
    # the epoch's steps, so the step-weighted mean of its windows
    steps = {tag: [e.step for e in acc.Scalars(tag)] for acc in _events(run_dir) for tag in acc.Tags()["scalars"]}
    assert steps["train/loss"] == [2, 4, 6, 8, 10, 12] and steps["train/epoch_loss"] == [6, 12]
    windows = list(zip(steps["train/loss"], values["train/loss"]))
    per_epoch = [np.mean([v for s, v in windows if e * 6 < s <= (e + 1) * 6]) for e in range(2)]
    assert values["train/epoch_loss"] == pytest.approx(per_epoch, rel=1e-5)
    # the loop measures itself: every log window, with sane values
    for tag in ("train/data_wait_frac", "train/step_s", "train/grad_norm", "train/images_per_s_per_process",
                "memory/main_rss_mb", "memory/loader_worker0_rss_mb", "train/epoch_data_wait_frac"):
        assert tag in scalars, tag
    assert all(0.0 <= v <= 1.0 for v in values["train/data_wait_frac"] + values["train/epoch_data_wait_frac"])
    assert all(0 < v < 60 for v in values["train/step_s"]) and all(np.isfinite(v) and v > 0 for v in values["train/grad_norm"])
    # 2 processes: all images/s is the sum of both
    assert all(a > b for a, b in zip(values["train/images_per_s"], values["train/images_per_s_per_process"]))
    assert all(100 < v < 100_000 for v in values["memory/main_rss_mb"] + values["memory/loader_worker0_rss_mb"])
    assert values["data/skipped_shards"] == [0.0, 0.0] and values["data/skipped_samples"] == [0.0, 0.0]
    # one cosine over the run (no restarts configured): the lr only falls
    assert all(a > b for a, b in zip(values["train/lr"], values["train/lr"][1:]))
    # hparams live in the fold's own run, with the metric they produced: one run per fold
    runs = {p.parent for p in (run_dir / "tb").rglob("events.out.tfevents.*")}
    assert runs == {run_dir / "tb"}
    hparams = [acc.PluginTagToContent("hparams") for acc in _events(run_dir) if _has_plugin(acc, "hparams")]
    assert hparams and any(b"test_efficientnet" in content for h in hparams for content in h.values())


@pytest.mark.duration(33)
def test_killed_run_resumes_to_the_same_epoch_count(small_shards, tmp_path):
    out = tmp_path / "runs"
    cmd = accelerate_cmd(1, *_train_args(small_shards, out, 0, 3, "--max-steps", "4"))
    proc = subprocess.Popen(cmd, env=launch_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    trainer = out / "fold0" / "state" / "trainer.json"
    deadline = time.time() + 240
    while not trainer.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    import os

    os.killpg(proc.pid, signal.SIGKILL)  # a real kill of the launcher and its worker processes
    proc.wait()
    first = json.loads(trainer.read_text())
    assert first["epoch"] < 2, "the kill came too late to test resuming"
    # a resume with other settings is refused in words that say where the fold stands, then what would change
    changed = subprocess.run([sys.executable, "-m", "maskdist", *_train_args(small_shards, out, 0, 3, "--max-steps", "4", "--resume",
                                                                            "--lr", "0.1")],
                             env=launch_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    stopped = f"after epoch {first['epoch']}" if first["epoch_done"] else f"at epoch {first['epoch']} step {first['step']}"
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert (f"fold 0 in {out / 'fold0'} (interrupted {stopped} of 3 epochs) was started with other settings, and --resume would"
            " change them: --lr 0.2 -> 0.1") in changed.stderr
    again = run_launch(accelerate_cmd(1, *_train_args(small_shards, out, 0, 3, "--max-steps", "4", "--resume")), tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"epochs {first['epoch'] + 1}..2" in again.stdout
    assert json.loads(trainer.read_text())["epoch"] == 2
    assert checkpoint.read_card(out / "fold0")["epoch"] <= 2


@pytest.mark.xdist_group("train-ddp-run")
def test_refuses_to_overwrite_a_trained_fold_and_bad_folds(ddp_run, small_shards, tmp_path):
    run_dir, _ = ddp_run
    # under the launcher: the launcher exits non-zero, the message is the child's one line
    again = run_launch(accelerate_cmd(1, *_train_args(small_shards, run_dir.parent, 1, 2, "--max-steps", "6")), tmp_path)
    assert again.returncode != 0 and "fold 1 in" in again.stderr and "is finished (2 epochs): pass --overwrite" in again.stderr
    # without a launcher: exit status 2 and one line, no traceback
    direct = [sys.executable, "-m", "maskdist", *_train_args(small_shards, tmp_path / "r", 7, 1)]
    bad = subprocess.run(direct, env=launch_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "--fold 7 does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_multi_gpu_launcher_without_cuda_is_refused(small_shards, tmp_path):
    """accelerate's multi-GPU launcher without ACCELERATE_USE_CPU starts lone processes."""
    env = launch_env(tmp_path)
    env.pop("ACCELERATE_USE_CPU")
    cmd = accelerate_cmd(2, *_train_args(small_shards, tmp_path / "r", 0, 1))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0 and "ACCELERATE_USE_CPU=1" in result.stderr


@pytest.mark.duration(27)
def test_two_machines_on_one_host(small_shards, tmp_path):
    """--num_machines 2 with one process each: one launch per machine rank, as on a cluster."""
    port = str(__import__("conftest").free_port())
    out = tmp_path / "runs"
    procs = []
    for machine in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "maskdist",
               *_train_args(small_shards, out, 2, 1, "--max-steps", "3")]
        procs.append(subprocess.Popen(cmd, env=launch_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "2 process(es)" in outputs[0]
    oof = pd.read_csv(out / "fold2" / "oof.csv")
    assert oof["key"].is_unique and len(oof) == open_shard_set(small_shards).samples("train", [2], extra=False)


@pytest.mark.duration(30)
def test_every_recipe_option_through_two_process_ddp_with_one_ema_on_both_ranks(small_shards, tmp_path):
    """Part heads, EMA, focal+F1, mixup and cutmix, drop-path and the strong augmentation, all
    at once, under a real 2-process gloo launch."""
    options = ["--heads", "parts", "--ema-decay", "0.9", "--loss", "focal+f1", "--f1-weight", "0.3", "--mixup", "0.2",
               "--cutmix", "1.0", "--drop-path", "0.1", "--augment", "strong", "--label-smoothing", "0.1"]
    out = tmp_path / "runs"
    result = run_launch(accelerate_cmd(2, *_train_args(small_shards, out, 0, 1, "--max-steps", "5", *options)), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and ", EMA " in result.stdout
    run_dir = out / "fold0"
    state = json.loads((run_dir / "state" / "trainer.json").read_text())
    # the EMA, and the live weights with their BatchNorm statistics (averaged over the ranks at
    # the epoch's end), are the same on both ranks, and best.safetensors holds them
    assert len(state["ema_checksums"]) == 2 and state["ema_checksums"][0] == state["ema_checksums"][1]
    assert len(state["live_checksums"]) == 2 and state["live_checksums"][0] == state["live_checksums"][1]
    card = checkpoint.read_card(run_dir)
    assert card["heads"] == "parts" and card["weights"] in ("live", "ema") and card["metrics"]["weights"] == card["weights"]
    saved = load_file(str(run_dir / "best.safetensors"))
    assert sum(float(t.double().sum()) for t in saved.values() if t.is_floating_point()) == pytest.approx(
        state[f"{card['weights']}_checksums"][0], rel=1e-12)
    running_var = [k for k in saved if k.endswith("running_var")]
    assert running_var  # the model has BatchNorm statistics to keep equal
    oof = pd.read_csv(run_dir / "oof.csv")
    probs = oof[[f"p{c:02d}" for c in range(18)]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4) and len(oof) == open_shard_set(small_shards).samples("train", [0], extra=False)
    model, _ = checkpoint.load(run_dir)  # a parts model comes back from its card
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 8)
    scalars = set()
    for acc in _events(run_dir):
        scalars |= set(acc.Tags()["scalars"])
    assert {"val_ema/macro_f1", "val/macro_f1"} <= scalars


# The on-disk contracts, pinned: a change here breaks run folders and shard sets that users
# already have, so it must be a deliberate one (with a reader that still takes the old form).
RUN_FOLDER_FILES = {"best.safetensors", "config.yaml", "launches.jsonl", "model.json", "oof.csv", "state", "state.old", "tb"}
MODEL_CARD_KEYS = {"age_cut", "architecture", "class_code", "classes", "confusion", "data", "drop_rate", "epoch", "fold",
                   "format", "format_version", "heads", "image", "metric_age_cut", "metrics", "normalisation", "num_classes",
                   "train_folds", "weights", "finished", "epochs", "pretrained", "nonfinite_validation"}
TRAINER_STATE_KEYS = {"best", "epoch", "epoch_done", "files", "live_checksums", "skipped", "step", "steps_per_epoch", "tallies",
                      "world_size"}
OOF_COLUMNS = ["key", "fold", "label_true", "label", "pred"] + [f"p{c:02d}" for c in range(18)]
MANIFEST_KEYS = {"age_cut", "build", "eval_skipped_rows", "folds", "format", "format_version", "image", "num_classes", "shards",
                 "totals"}
SHARD_ENTRY_KEYS = {"bytes", "class", "class_counts", "fold", "path", "samples", "sha256", "split"}


@pytest.mark.xdist_group("train-ddp-run")
def test_run_folder_and_manifest_keep_their_file_names_and_keys(ddp_run, small_shards):
    run_dir, _ = ddp_run
    assert {p.name for p in run_dir.iterdir()} == RUN_FOLDER_FILES
    card = checkpoint.read_card(run_dir)
    assert set(card) == MODEL_CARD_KEYS and card["format"] == "maskdist-model" and card["format_version"] == 1
    assert set(json.loads((run_dir / "state" / "trainer.json").read_text())) == TRAINER_STATE_KEYS
    assert list(pd.read_csv(run_dir / "oof.csv", nrows=1).columns) == OOF_COLUMNS
    manifest = json.loads((small_shards / "manifest.json").read_text())
    assert set(manifest) == MANIFEST_KEYS and manifest["format_version"] == 1
    assert all(set(entry) == SHARD_ENTRY_KEYS for entry in manifest["shards"])
    assert set(manifest["totals"]) == {"train", "train_true", "eval"}


@pytest.mark.duration(25)
def test_non_finite_validation_logits_are_never_best_and_a_run_without_a_finite_epoch_stops(small_shards, tmp_path):
    """Pretrained weights whose first BatchNorm holds a NaN variance: training (batch statistics)
    stays finite, the eval-mode logits do not. No epoch may be best, and the run ends in one line."""
    import timm
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()}
    state["bn1.running_var"][:] = float("nan")
    save_file(state, str(tmp_path / "broken.safetensors"))
    out = tmp_path / "runs"
    args = [sys.executable, "-m", "maskdist", *_train_args(small_shards, out, 0, 2, "--max-steps", "1", "--workers", "0"),
            "--pretrained", str(tmp_path / "broken.safetensors")]
    result = subprocess.run(args, env=launch_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    samples = open_shard_set(small_shards).samples("train", [0], extra=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: epoch")]
    assert warnings == [f"warning: epoch {e}: non-finite validation logits (NaN or inf) on {samples} of {samples} samples with the"
                        " live weights: the epoch is not a candidate for best (likely causes: a learning rate too high (--lr),"
                        " fp16 overflow (--precision bf16 or no) or broken pretrained weights (--pretrained))" for e in (0, 1)]
    assert "*best*" not in result.stdout and re.search(r"^epoch 1: loss [\d.]+,", result.stdout, re.M)  # the loss was finite
    assert result.stderr.strip().splitlines()[-1] == (
        "error: fold 0: every epoch's validation gave non-finite logits (NaN or inf), so there is no best model to save; likely"
        " causes: a learning rate too high (--lr), fp16 overflow (--precision bf16 or no) or broken pretrained weights"
        " (--pretrained); change one and train the fold again with --overwrite")
    assert not (out / "fold0" / checkpoint.WEIGHTS).exists() and not (out / "fold0" / checkpoint.MODEL_JSON).exists()
    values = {tag: [e.value for e in acc.Scalars(tag)] for acc in _events(out / "fold0") for tag in acc.Tags()["scalars"]}
    assert values["val/nonfinite_samples"] == [samples, samples]


@pytest.mark.duration(30)
def test_a_non_finite_epoch_after_a_finite_best_is_not_best_and_is_recorded_in_the_model_card(small_shards, tmp_path):
    """A fold interrupted after a finite epoch 0 whose saved weights then hold a NaN BatchNorm
    variance: the resumed epoch 1 validates to non-finite logits (its F1, counting them as class
    0, may even be higher). It must not replace the best model, and the card must say so."""
    from safetensors.torch import save_file

    out = tmp_path / "runs"
    args = [sys.executable, "-m", "maskdist", *_train_args(small_shards, out, 0, 2, "--max-steps", "1", "--workers", "0")]
    first = subprocess.run(args, env=launch_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = out / "fold0"
    # back to the state saved after epoch 0 (kept as state.old), its weights broken as a bad step would leave them
    import shutil

    shutil.rmtree(run_dir / "state")
    (run_dir / "state.old").rename(run_dir / "state")
    trainer = json.loads((run_dir / "state" / "trainer.json").read_text())
    assert (trainer["epoch"], trainer["epoch_done"]) == (0, True)
    trainer.pop("files")  # the sizes and hashes of the files changed here (a state from before they were recorded)
    (run_dir / "state" / "trainer.json").write_text(json.dumps(trainer))
    weights = load_file(str(run_dir / "state" / "model.safetensors"))
    weights["bn1.running_var"][:] = float("nan")
    save_file(weights, str(run_dir / "state" / "model.safetensors"))
    card = checkpoint.read_card(run_dir) | {"finished": False, "epoch": 0}
    (run_dir / checkpoint.MODEL_JSON).write_text(json.dumps(card))
    best_before = (run_dir / checkpoint.WEIGHTS).read_bytes()

    resumed = subprocess.run(args + ["--resume"], env=launch_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    samples = open_shard_set(small_shards).samples("train", [0], extra=False)
    assert f"warning: epoch 1: non-finite validation logits (NaN or inf) on {samples} of {samples} samples" in resumed.stdout
    assert "*best*" not in resumed.stdout and (run_dir / checkpoint.WEIGHTS).read_bytes() == best_before
    card = checkpoint.read_card(run_dir)
    assert card["epoch"] == 0 and card["nonfinite_validation"] == {"1": {"samples": samples, "live": samples}}
    values = {tag: [e.value for e in acc.Scalars(tag)] for acc in _events(run_dir) for tag in acc.Tags()["scalars"]}
    assert values["val/nonfinite_samples"][-1] == samples
