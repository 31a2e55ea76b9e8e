"""An experiment knows its own configuration: kfold holds the folds to the experiment's plan
(--replan retrains), a subset of folds is a success that names the folds left, a CPU machine
gets the right advice, and the CLI shows what it will do (grouped help with a preset's
values, --print-config, --dry-run). Real processes and files throughout."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from conftest import launch_env

from maskdist import config as config_mod
from maskdist.cli import main
from maskdist.cli.train import PRESET_NAMES

FAST = ["--model", "test_efficientnet", "--resize", "64", "--crop", "48", "--batch-size", "16", "--workers", "1",
        "--epochs", "1", "--max-steps", "2", "--lr", "0.2", "--timeout-s", "120"]


def _kfold(small_shards, out, tmp_path, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "maskdist", "kfold", "--shards", str(small_shards), "--out", str(out), "--cpu", *FAST, *extra]
    return subprocess.run(cmd, env=launch_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.duration(35)
def test_kfold_holds_folds_to_the_plan_and_a_subset_succeeds(small_shards, tmp_path):
    out = tmp_path / "runs"
    first = _kfold(small_shards, out, tmp_path, "--folds", "0")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "fold(s) 1, 2 of" in first.stdout and "still to train" in first.stdout  # the folds left, no prediction
    assert not (out / "submission.csv").exists()
    plan = yaml.safe_load((out / "experiment.yaml").read_text())
    assert plan["lr"] == 0.2 and "workers" not in plan  # training settings only; run-only ones may differ
    # each warning one line, once, without a Python source location
    assert first.stderr.count("warning: test_efficientnet starts from random weights") == 1
    assert ".py:" not in first.stderr and "Traceback" not in first.stderr

    changed = _kfold(small_shards, out, tmp_path, "--folds", "0", "--lr", "0.05", "--drop-rate", "0.3")
    assert changed.returncode == 2 and "--lr 0.2 -> 0.05" in changed.stderr and "--drop-rate 0.4 -> 0.3" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1 and "--replan" in changed.stderr

    same_but_run_only = _kfold(small_shards, out, tmp_path, "--folds", "0", "--log-every", "1", "--workers", "0")
    assert same_but_run_only.returncode == 0 and "fold 0: finished earlier, reusing" in same_but_run_only.stdout

    replanned = _kfold(small_shards, out, tmp_path, "--folds", "0", "--lr", "0.05", "--replan")
    assert replanned.returncode == 0, replanned.stdout[-2000:] + replanned.stderr[-2000:]
    assert "reusing" not in replanned.stdout and "training on 1 process(es)" in replanned.stdout
    assert yaml.safe_load((out / "experiment.yaml").read_text())["lr"] == 0.05
    assert config_mod.load(out / "fold0" / "config.yaml").lr == 0.05
    launches = (out / "fold0" / "launches.jsonl").read_text().splitlines()
    assert len(launches) == 2  # both configurations the fold ran under are kept

    # a manual train into the experiment is held to the plan too
    runner = CliRunner()
    manual = runner.invoke(main, ["train", "--shards", str(small_shards), "--out", str(out), "--fold", "1", *FAST])
    assert manual.exit_code == 2 and "--lr 0.05 -> 0.2" in manual.output

    # --print-config is exactly the config.yaml a run writes
    printed = runner.invoke(main, ["train", "--config", str(out / "plans" / "fold0.yaml"), "--print-config"])
    assert printed.exit_code == 0 and printed.output == (out / "fold0" / "config.yaml").read_text()


def test_kfold_without_cpu_on_a_machine_without_gpus_says_cpu(small_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = CliRunner().invoke(main, ["kfold", "--shards", str(small_shards), "--out", str(tmp_path / "r"),
                                       "--processes", "2", *FAST])
    assert result.exit_code == 2 and "add --cpu" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_parallel_folds_get_gpus_of_their_own(small_shards, tmp_path, monkeypatch):
    """Read back the launches --dry-run prints: the GPUs are those CUDA_VISIBLE_DEVICES lists
    (no GPU exists here; the plan is what a 4-GPU machine would run)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    runner = CliRunner()

    def launches(*extra) -> dict[int, str]:
        result = runner.invoke(main, ["kfold", "--shards", str(small_shards), "--out", str(tmp_path / "r"), "--dry-run",
                                      *extra, *FAST])
        assert result.exit_code == 0, result.output
        # the launches name plan files that only a real run writes, and the output says so
        assert f"reads its fold's configuration from {tmp_path / 'r' / 'plans'}/fold<K>.yaml, which kfold writes" in result.output
        lines = [line for line in result.output.splitlines() if line.startswith("fold ")]
        return {int(line.split(":")[0][5:]): line for line in lines}

    two_by_two = launches("--parallel-folds", "2", "--processes", "2")
    assert "CUDA_VISIBLE_DEVICES=0,1 " in two_by_two[0] and "CUDA_VISIBLE_DEVICES=2,3 " in two_by_two[1]
    assert "CUDA_VISIBLE_DEVICES=0,1 " in two_by_two[2] and "--num_processes 2" in two_by_two[0]
    one_each = launches("--parallel-folds", "3")
    assert [one_each[k].split("CUDA_VISIBLE_DEVICES=")[1].split()[0] for k in range(3)] == ["0", "1", "2"]
    chosen = launches("--parallel-folds", "2", "--gpus", "3,1")
    assert "CUDA_VISIBLE_DEVICES=3 " in chosen[0] and "CUDA_VISIBLE_DEVICES=1 " in chosen[1]
    too_many = runner.invoke(main, ["kfold", "--shards", str(small_shards), "--out", str(tmp_path / "r"), "--dry-run",
                                    "--parallel-folds", "3", "--processes", "2", *FAST])
    assert too_many.exit_code == 2 and "needs 6 GPUs; 4 available" in too_many.output
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_train_help_groups_options_and_shows_the_presets_values():
    runner = CliRunner()
    plain = " ".join(runner.invoke(main, ["train", "--help"]).output.split())  # as one line: help wraps anywhere
    preset = " ".join(runner.invoke(main, ["train", "--config", "cpu_fast", "--help"]).output.split())
    for group in config_mod.GROUPS:
        assert f"{group} options:" in plain
    assert "[default: 'efficientnet_b3']" in plain and "[from cpu_fast: 'test_efficientnet']" in preset
    assert "[from cpu_fast: 1]" in preset.split("--workers")[1].split("--")[0]  # the preset's 1 worker, not 4
    assert tuple(sorted(PRESET_NAMES)) == tuple(config_mod.presets())  # every preset is named in --config's help
    assert all(name in plain.split("--config")[1].split("--print-config")[0] for name in PRESET_NAMES)


def test_the_demo_process_count_does_not_depend_on_load(monkeypatch):
    from maskdist import demo

    counts = set()
    for load in (0.0, 1.3, 7.9):
        monkeypatch.setattr("os.getloadavg", lambda load=load: (load, load, load), raising=False)
        counts.add(demo.demo_processes(cores=2))
    assert counts == {(2, "2 usable core(s)")}
    assert demo.demo_processes(cores=1)[0] == 1


def test_layout_writes_its_report_and_synth_is_quiet_off_a_terminal(small_synth, tmp_path):
    runner = CliRunner()
    report = tmp_path / "layout.json"
    result = runner.invoke(main, ["layout", str(small_synth / "train"), "--json", str(report)])
    assert result.exit_code == 0 and report.is_file()
    import json

    data = json.loads(report.read_text())
    assert data["train"]["images"] > 0 and sum(data["images_per_fold"].values()) == data["train"]["images"]
    assert data["train"]["counts"] == {k: v for k, v in data["train"]["counts"].items() if v > 0}
    # no progress bar in a log (not a terminal), and the overwrite hint is the flag alone
    out = tmp_path / "s"
    made = subprocess.run([sys.executable, "-m", "maskdist", "synth", str(out), "--people", "6", "--eval-people", "2"],
                          capture_output=True, text=True, timeout=300, env=launch_env(tmp_path))
    assert made.returncode == 0 and "img/s" not in made.stderr and "\r" not in made.stderr
    again = runner.invoke(main, ["synth", str(out), "--people", "6", "--quiet"])
    assert again.exit_code == 2 and "pass --overwrite to replace it" in again.output and "overwrite=True" not in again.output
