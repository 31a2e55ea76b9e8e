"""The loop measures itself, and the benchmark commands print what they promise.

Real shards, real loader workers, the real training loop; the benchmarks run as the CLI runs
them, on tiny data, and their JSON is checked for figures that a broken implementation would
not produce (a data-wait share outside [0, 1], ratios that do not follow from the timings,
memory samples missing the workers).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import launch_env, run_launch

from maskdist import config as config_mod
from maskdist.train import EpochTally, setup, train_epoch  # the package exports these names

TINY = {"model": "test_efficientnet", "batch_size": 8, "resize": 64, "crop": 48, "lr": 0.1, "timeout_s": 60}


def _wait_share(shards: Path, tmp_path: Path, resize: int, steps: int = 12) -> float:
    cfg = config_mod.load(None, dict(TINY, shards=str(shards), out=str(tmp_path / f"r{resize}"), workers=1, resize=resize,
                                     max_steps=steps, log_every=steps, epochs=1))
    run = setup(cfg)
    try:
        train_epoch(run, 0, EpochTally())  # warm-up: worker start, shuffle buffer
        tally = train_epoch(run, 1, EpochTally())
    finally:
        run.close()
    assert tally.steps == steps and tally.images == steps * 8
    share = tally.wait_s / tally.busy_s
    assert 0.0 <= share <= 1.0
    return share


def test_the_data_wait_share_rises_when_a_slow_transform_starves_the_loop(small_shards, tmp_path):
    fast = _wait_share(small_shards, tmp_path, resize=64)
    # The same loop and model, but every image is first blown up to 6000x6000 on the
    # loader's single worker: the model now waits for its batches.
    with pytest.warns(UserWarning, match="enlarged"):
        slow = _wait_share(small_shards, tmp_path, resize=6000)
    assert slow > 0.25 and slow > 2 * fast, (fast, slow)


def _cli(*args: str, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "maskdist", *args], env=launch_env(tmp_path), cwd=tmp_path,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.duration(45)
def test_bench_train_and_epoch_print_their_ratios(small_shards, tmp_path):
    train = json.loads(_cli("bench", "train", "--model", "test_efficientnet", "--batch-size", "8", "--crop", "48",
                            "--steps", "3", "--rounds", "1", "--json", tmp_path=tmp_path).stdout)
    assert train["ratio"] == pytest.approx(train["bare_step_s"] / train["maskdist_step_s"])

    out = _cli("bench", "epoch", str(small_shards), "--workers", "0,1", "--steps", "6", "--warmup", "2",
               "--model", "test_efficientnet", "--batch-size", "8", "--resize", "64", "--crop", "48", "--json",
               tmp_path=tmp_path).stdout
    data = json.loads(out)
    assert [r["workers"] for r in data["runs"]] == [0, 1]
    for run in data["runs"]:
        assert run["steps"] == 6 and run["images"] == 48
        assert 0.0 <= data["data_wait_frac"][str(run["workers"])] <= 1.0
    ceiling = data["ceiling"]
    assert ceiling["steps"] == 6 and data["ceiling_images_per_s"] > 0
    assert ceiling["wait_s"] < 0.2 * ceiling["seconds"]  # the ceiling waits for nothing
    for workers, ratio in data["ratios"].items():
        assert ratio == pytest.approx(data["images_per_s"][workers] / data["ceiling_images_per_s"])
    # 0 workers decode in the loop's own process, so no loader process burns CPU; 1 worker
    # does the decoding elsewhere
    assert data["loader_cores"]["0"] == 0.0 and data["loader_cores"]["1"] > 0.0
    text = _cli("bench", "epoch", str(small_shards), "--workers", "1", "--steps", "3", "--warmup", "1", "--model",
                "test_efficientnet", "--batch-size", "8", "--resize", "64", "--crop", "48", tmp_path=tmp_path).stdout
    assert "in memory (ceiling)" in text and "data wait" in text and "/ ceiling" in text


@pytest.mark.duration(70)
def test_bench_predict_and_memory(small_shards, tmp_path):
    runs = tmp_path / "runs"
    trained = run_launch([sys.executable, "-m", "maskdist", "train", "--shards", str(small_shards), "--fold", "0", "--out",
                          str(runs), "--epochs", "1", "--max-steps", "2", "--workers", "0", "--model", "test_efficientnet",
                          "--resize", "64", "--crop", "48", "--batch-size", "8"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    info = json.loads((small_shards / "manifest.json").read_text())["build"]["eval_dir"] + "/info.csv"
    data = json.loads(_cli("bench", "predict", str(runs / "fold0"), "--shards", str(small_shards), "--info", info,
                           "--workers", "1", "--batch-size", "8", "--rounds", "1", "--json", tmp_path=tmp_path).stdout)
    assert data["images"] == json.loads((small_shards / "manifest.json").read_text())["totals"]["eval"]
    assert data["models"] == 1 and data["ratio"] == pytest.approx(data["bare_s"] / data["predict_s"])
    assert 0 < data["ratio"] < 10

    csv = tmp_path / "memory.csv"
    watched = _cli("bench", "memory", "--every", "0.2", "--csv", str(csv), "--", sys.executable, "-m", "maskdist", "train",
                   "--shards", str(small_shards), "--fold", "1", "--out", str(tmp_path / "m"), "--epochs", "1",
                   "--max-steps", "12", "--workers", "2", "--model", "test_efficientnet", "--resize", "64", "--crop", "48", "--batch-size", "8",
                   tmp_path=tmp_path).stdout
    assert "exit status 0" in watched
    import pandas as pd

    samples = pd.read_csv(csv)
    by_role = samples.groupby("role")["pid"].nunique().to_dict()
    assert by_role.get("main") == 1 and by_role.get("worker", 0) >= 2 and by_role.get("forkserver") == 1, by_role
    main = samples[samples["role"] == "main"]
    assert len(main) >= 5 and main["seconds"].is_monotonic_increasing  # sampled during the run, not only at its ends
    assert (samples["rss_mb"] > 1).all()


@pytest.mark.duration(40)
def test_bench_options_reports_each_variant_against_the_recipe_and_continues(small_shards, tmp_path):
    out = tmp_path / "options"
    args = ["bench", "options", str(small_shards), "--out", str(out), "--variants", "recipe,parts", "--seeds", "0",
            "--epochs", "1", "--max-steps", "2", "--workers", "0", "--resize", "64", "--crop", "48", "--batch-size", "8"]
    first = _cli(*args, "--markdown", tmp_path=tmp_path).stdout
    cards = {name: json.loads((out / f"{name}-seed0" / "fold0" / "model.json").read_text()) for name in ("recipe", "parts")}
    assert cards["parts"]["heads"] == "parts" and cards["recipe"]["heads"] == "single"  # the variant's option reached train
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in first.splitlines()
            if line.startswith("| recipe") or line.startswith("| parts")}
    for name, card in cards.items():
        assert rows[name][0] == f"{card['metrics']['macro_f1']:.4f} ± 0.0000"
    delta = cards["parts"]["metrics"]["macro_f1"] - cards["recipe"]["metrics"]["macro_f1"]
    assert rows["recipe"][1] == "+0.0000" and rows["parts"][1] == f"{delta:+.4f}"
    # Re-running continues: a finished run is read, not run again; an interrupted one (no
    # timing written) is run again whole.
    recipe_log, parts_log = out / "recipe-seed0.log", out / "parts-seed0.log"
    before = recipe_log.stat().st_mtime_ns, parts_log.stat().st_mtime_ns
    (out / "parts-seed0" / "seconds.txt").unlink()
    second = _cli(*args, tmp_path=tmp_path).stdout
    assert "[recipe seed 0]" not in second and "[parts seed 0]" in second
    assert recipe_log.stat().st_mtime_ns == before[0] and parts_log.stat().st_mtime_ns != before[1]
    assert (out / "parts-seed0" / "seconds.txt").is_file() and "options vs recipe" in second
