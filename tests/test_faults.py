"""Long runs survive faults: damaged and flaky shards, kill -9, SIGTERM and resume, a dead rank.

Everything here is real: shards on disk are truncated and tampered with, an HTTP server on
127.0.0.1 answers 503 and drops a connection mid-file, training runs as real processes (and a
real 2-process gloo launch), signals are real signals, and what survives a kill is read from
/proc.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import procs
import pytest
from conftest import accelerate_cmd, launch_env, run_launch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskdist.shards.manifest import open_shard_set
from maskdist.shards.opener import RetryPolicy, ShardReadError
from maskdist.train import checkpoint
from maskdist.train.preemption import PREEMPTED_EXIT

FAST = ["--model", "test_efficientnet", "--resize", "64", "--crop", "48", "--batch-size", "16", "--lr", "0.2",
        "--timeout-s", "60", "--read-backoff-s", "0.05"]


def _train_args(shards, out, fold=0, epochs=1, *extra):
    return ["train", "--shards", str(shards), "--fold", str(fold), "--out", str(out), "--epochs", str(epochs), *FAST, *extra]


def _direct(*args) -> list[str]:
    return [sys.executable, "-m", "maskdist", *args]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard folder as TensorBoard shows it (one accumulator
    over the folder: data an interrupted session wrote after its last save is purged)."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def shard_copy(small_shards, tmp_path) -> Path:
    target = tmp_path / "shards"
    shutil.copytree(small_shards, target)
    return target


def _small_classes(shard_set, fold: int, train_folds: list[int], n: int) -> list[dict]:
    """Fold ``fold``'s shards of the ``n`` smallest classes that also have a shard in every
    other training fold (so skipping one never loses the class, and a class pass reads it)."""
    other = [f for f in train_folds if f != fold]
    candidates = []
    for shard in shard_set.shards("train", [fold], extra=False):
        cls = shard["class"]
        if all(shard_set.shards("train", [f], [cls], extra=False) for f in other) and shard["samples"] >= 2:
            candidates.append(shard)
    return sorted(candidates, key=lambda s: (s["samples"], s["class"]))[:n]


def _tamper_json(path: Path) -> None:
    """Overwrite the second sample's .json bytes in place (same length): the tar stays valid,
    the sample does not decode."""
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".json")][1]
    with open(path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\x00{" * (member.size // 2) + b"}" * (member.size % 2))


# --- damaged shards mid-run --------------------------------------------------------------------


def test_truncated_and_tampered_training_shards_are_skipped_named_and_counted(shard_copy, tmp_path):
    shard_set = open_shard_set(shard_copy)
    truncated, tampered = _small_classes(shard_set, 1, [1, 2], 2)
    path = shard_copy / truncated["path"]
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.4)])  # a partial copy
    _tamper_json(shard_copy / tampered["path"])

    out = tmp_path / "runs"
    result = run_launch(_direct(*_train_args(shard_copy, out, 0, 2, "--workers", "2", "--max-skipped", "0.5")), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    for shard, why in ((truncated, "truncated"), (tampered, "does not decode")):
        lines = [line for line in text.splitlines() if shard["path"] in line and "skipping shard" in line]
        assert len(lines) == 1 and why in lines[0], text[-3000:]  # one warning line per shard
    assert "skipped 2 shard(s)" in result.stdout
    expected = truncated["samples"] + tampered["samples"]
    scalars = _scalars(out / "fold0")
    assert [v for _s, v in scalars["data/skipped_shards"]] == [2.0, 2.0]
    assert [v for _s, v in scalars["data/skipped_samples"]] == [expected, expected]
    data = checkpoint.read_card(out / "fold0")["data"]
    assert data["skipped_shards"] == 2 and data["skipped_samples"] == 2 * expected
    assert sorted(data["skipped"]) == sorted([truncated["path"], tampered["path"]])
    assert all(v["epochs"] == [0, 1] for v in data["skipped"].values())
    # validation stayed exact: every sample of fold 0 once
    oof = pd.read_csv(out / "fold0" / "oof.csv")
    assert len(oof) == shard_set.samples("train", [0], extra=False) and oof["key"].is_unique


def test_shards_skipped_before_an_interruption_stay_skipped_and_counted_after_resume(shard_copy):
    from maskdist import streams

    shard_set = open_shard_set(shard_copy)
    (bad,) = _small_classes(shard_set, 1, [1, 2], 1)
    path = shard_copy / bad["path"]
    original = path.read_bytes()
    with tarfile.open(path) as tar:
        keys = {member.name.rsplit(".", 1)[0] for member in tar.getmembers()}
    path.write_bytes(original[: int(len(original) * 0.4)])  # damaged during epoch 0 ...
    args = dict(batch_size=4, workers=0, seed=0, transform=None, max_skipped=0.5)
    first, steps = streams.train_loader(shard_set, [1, 2], **args)
    first.set_epoch(0)
    for _batch in first:
        pass
    assert set(first.skipped) == {bad["path"]}
    path.write_bytes(original)  # ... and readable again by the time the run resumes
    resumed, _ = streams.train_loader(shard_set, [1, 2], **args)
    resumed.resume_skipped(0, first.skipped)
    resumed.set_epoch(0, start_step=steps // 2)
    seen = {key for batch in resumed for key in batch["key"]}
    assert not seen & keys, "a shard skipped before the interruption was read in the resumed epoch"
    assert resumed.skipped == first.skipped  # and still counted in that epoch's totals
    resumed.set_epoch(1)  # the next epoch starts clean and reads the shard again
    seen = {key for batch in resumed for key in batch["key"]}
    assert seen & keys and resumed.skipped == {}


@pytest.mark.duration(22)
def test_a_class_losing_every_shard_and_the_skip_limit_stop_with_one_line(small_shards, tmp_path):
    lost_set, over_set = tmp_path / "lost", tmp_path / "over"
    shutil.copytree(small_shards, lost_set)
    shutil.copytree(small_shards, over_set)
    shard_set = open_shard_set(small_shards)

    [shard] = _small_classes(shard_set, 1, [1, 2], 1)
    for victim in shard_set.shards("train", [1, 2], [shard["class"]], extra=False):
        (lost_set / victim["path"]).write_bytes(b"")  # every training shard of the class
    lost = run_launch(_direct(*_train_args(lost_set, tmp_path / "a", 0, 1, "--workers", "1", "--max-skipped", "1")), tmp_path)
    assert lost.returncode == 2, lost.stderr[-3000:]
    last = lost.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: class {shard['class']} lost every one of its 2 shard(s)") and "shards verify" in last
    assert "Traceback" not in lost.stderr

    # The limit: one damaged shard is too many at --max-skipped 0.001.
    big = max(shard_set.shards("train", [1], extra=False), key=lambda s: s["samples"])
    (over_set / big["path"]).write_bytes(b"not a tar")
    over = run_launch(_direct(*_train_args(over_set, tmp_path / "b", 0, 1, "--workers", "1", "--max-skipped", "0.001")), tmp_path)
    assert over.returncode == 2
    last = over.stderr.strip().splitlines()[-1]
    assert last.startswith("error: skipped shards hold") and "--max-skipped 0.001" in last and big["path"] in last
    assert "shards verify" in last and "Traceback" not in over.stderr


@pytest.mark.duration(33)
def test_an_unreadable_validation_or_eval_shard_is_a_one_line_error(small_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    shard_set = open_shard_set(shards)
    val = shard_set.shards("train", [0], extra=False)[0]
    (shards / val["path"]).write_bytes((shards / val["path"]).read_bytes()[:700])
    result = run_launch(_direct(*_train_args(shards, tmp_path / "r", 0, 1, "--workers", "2", "--max-steps", "2")), tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and val["path"] in last and "evaluation reads every sample" in last
    assert not (tmp_path / "r" / "fold0" / "model.json").exists()  # no thinner F1 was recorded

    # predict on a damaged eval shard: the same one line, and no submission
    runs = tmp_path / "r2"
    ok = run_launch(_direct(*_train_args(small_shards, runs, 0, 1, "--workers", "0", "--max-steps", "1")), tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    ev = shard_set.shards("eval")[0]
    (shards / ev["path"]).write_bytes((shards / ev["path"]).read_bytes()[:1500])
    info = Path(shard_set.manifest["build"]["eval_dir"]) / "info.csv"
    sub = tmp_path / "sub.csv"
    bad = run_launch(_direct("predict", str(runs / "fold0"), "--shards", str(shards), "--info", str(info), "--out", str(sub),
                             "--workers", "2"), tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ev["path"] in last
    assert not sub.exists()


# --- flaky remote reads --------------------------------------------------------------------------


class _FlakyServer:
    """Serves a folder over HTTP on 127.0.0.1 with planned faults per path, Range requests
    (``bytes=N-``) when ``ranges``, and a log of every request: (path, range start, status)."""

    def __init__(self, root: Path, ranges: bool = True):
        self.root, self.ranges = root, ranges
        self.faults: dict[str, list[str]] = {}  # path -> actions of its next requests: "503" or "drop"
        self.log: list[tuple[str, int | None, int]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rel = self.path.lstrip("/")
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                start = int(match.group(1)) if match and server.ranges else None
                with server.lock:
                    action = server.faults.get(rel, []).pop(0) if server.faults.get(rel) else ""
                path = server.root / rel
                if action == "503" or not path.is_file():
                    status = 503 if action == "503" else 404
                    server.log.append((rel, start, status))
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                body = data[start:] if start is not None else data
                status = 206 if start is not None else 200
                server.log.append((rel, start, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if start is not None:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if action == "drop":  # the connection dies half-way through the file
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("ranges", [True, False])
def test_a_remote_read_retries_and_continues_where_it_stopped(small_shards, ranges):
    shard_set = open_shard_set(small_shards)
    shard = max(shard_set.shards("train"), key=lambda s: s["bytes"])
    expected = (small_shards / shard["path"]).read_bytes()
    with _FlakyServer(small_shards, ranges) as server:
        server.faults[shard["path"]] = ["503", "drop"]
        remote = open_shard_set(server.url, RetryPolicy(tries=3, backoff_s=0.05))
        with remote.open(shard["path"], shard["bytes"]) as stream:
            got = stream.read()
            retries = stream.retries
    assert hashlib.sha256(got).hexdigest() == shard["sha256"] and got == expected
    requests = [entry for entry in server.log if entry[0] == shard["path"]]
    if ranges:  # continued at the byte where the reader stopped, within what the server sent
        assert [status for _p, _s, status in requests] == [503, 200, 206] and retries == 2
        assert 0 < requests[-1][1] <= len(expected) // 2
    else:  # the server ignores Range: curl says so, and the file is re-read from the start,
        # the bytes already delivered skipped
        assert [status for _p, _s, status in requests] == [503, 200, 200, 200] and retries == 3


def test_a_remote_read_gives_up_after_its_tries(small_shards):
    shard = open_shard_set(small_shards).shards("train")[0]
    with _FlakyServer(small_shards) as server:
        server.faults[shard["path"]] = ["503"] * 5
        remote = open_shard_set(server.url, RetryPolicy(tries=3, backoff_s=0.01))
        started = time.monotonic()
        with pytest.raises(ShardReadError, match=r"\(3 tries\)"):
            remote.open(shard["path"], shard["bytes"]).read()
    assert len([e for e in server.log if e[0] == shard["path"]]) == 3
    assert time.monotonic() - started < 5


def test_a_pipe_command_that_fails_once_is_retried(small_shards, tmp_path):
    shard = open_shard_set(small_shards).shards("train")[0]
    marker = tmp_path / "failed-once"
    # the shard's first read fails after writing part of the file; later reads succeed
    command = (f"pipe:case {{}} in *.tar) if [ -e {marker} ]; then cat {small_shards}/{{}}; else touch {marker};"
               f" head -c 700 {small_shards}/{{}}; exit 3; fi;; *) cat {small_shards}/{{}};; esac")
    remote = open_shard_set(command, RetryPolicy(tries=2, backoff_s=0.01))
    with remote.open(shard["path"], shard["bytes"]) as stream:
        got = stream.read()
        assert stream.retries == 1
    assert hashlib.sha256(got).hexdigest() == shard["sha256"]


def test_bytes_a_failed_command_wrote_before_it_exited_are_kept(small_shards):
    shard = max(open_shard_set(small_shards).shards("train"), key=lambda s: s["bytes"])
    # every read of the shard writes its first 700 bytes, then the command fails
    command = f"pipe:case {{}} in *.tar) head -c 700 {small_shards}/{{}}; exit 3;; *) cat {small_shards}/{{}};; esac"
    remote = open_shard_set(command, RetryPolicy(tries=2, backoff_s=0.01))
    with remote.open(shard["path"], shard["bytes"]) as stream:
        proc = stream._raw.proc  # white-box: make the race certain, the command ends before the first read
        proc.wait(timeout=30)
        assert proc.returncode == 3
        with pytest.raises(ShardReadError, match=r"command exited with status 3 at byte 700 \(2 tries\)"):
            stream.read()


def test_training_from_a_flaky_http_server_reads_every_sample(small_shards, tmp_path):
    shard_set = open_shard_set(small_shards)
    train_shards = _small_classes(shard_set, 1, [1, 2], 2)
    val_shard = max(shard_set.shards("train", [0], extra=False), key=lambda s: s["bytes"])
    with _FlakyServer(small_shards) as server:
        server.faults[train_shards[0]["path"]] = ["503"]
        server.faults[train_shards[1]["path"]] = ["drop"]
        server.faults[val_shard["path"]] = ["503", "drop"]
        out = tmp_path / "runs"
        result = run_launch(_direct(*_train_args(server.url, out, 0, 1, "--workers", "2")), tmp_path)
        log = list(server.log)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    statuses = {(p, s) for p, _start, s in log}
    assert (train_shards[0]["path"], 503) in statuses and (val_shard["path"], 503) in statuses
    assert (train_shards[1]["path"], 206) in statuses and (val_shard["path"], 206) in statuses  # resumed by Range
    assert "retry 1 of" in result.stderr
    assert checkpoint.read_card(out / "fold0")["data"]["skipped_shards"] == 0
    oof = pd.read_csv(out / "fold0" / "oof.csv")
    assert len(oof) == shard_set.samples("train", [0], extra=False) and oof["key"].is_unique


# --- every process maskdist starts ends with it ----------------------------------------------------


def _kill9_leaves_nothing(cmd: list[str], tmp_path: Path, workers: int, ready: str | None = None) -> None:
    """Start ``cmd``; once it has ``workers`` worker processes below it (and ``ready`` exists,
    if given), kill -9 it; every process below it must be gone within a few seconds."""
    log = open(tmp_path / "kill9.log", "w")  # noqa: SIM115 (the child writes it until it ends; closed below)
    proc = subprocess.Popen(cmd, env=launch_env(tmp_path), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        def started():
            family = procs.descendants(proc.pid)
            # workers: processes below the forkserver; plus forkserver and resource tracker
            return len(family) >= workers + 2 and (ready is None or Path(ready).exists())

        assert procs.wait_for(started, 180), (tmp_path / "kill9.log").read_text()[-3000:]
        time.sleep(0.5)
        family = procs.descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = procs.wait_gone(family, timeout=10)
        assert not left, f"still running 10 s after kill -9 of {cmd[3:5]}: {procs.describe(left)}"
    finally:
        proc.kill()
        log.close()


def test_kill_9_of_train_leaves_no_process(small_shards, tmp_path):
    cmd = _direct(*_train_args(small_shards, tmp_path / "r", 0, 50, "--workers", "2", "--log-batches"))
    _kill9_leaves_nothing(cmd, tmp_path, workers=2, ready=str(tmp_path / "r" / "fold0" / "batches" / "rank0.txt"))


def test_kill_9_of_predict_leaves_no_process(small_shards, tmp_path):
    runs = tmp_path / "r"
    ok = run_launch(_direct(*_train_args(small_shards, runs, 0, 1, "--workers", "0", "--max-steps", "1")), tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    info = Path(open_shard_set(small_shards).manifest["build"]["eval_dir"]) / "info.csv"
    # many repeats of the eval set through a tiny batch keep predict busy long enough
    cmd = _direct("predict", str(runs / "fold0"), "--shards", str(small_shards), "--info", str(info),
                  "--out", str(tmp_path / "s.csv"), "--workers", "2", "--batch-size", "1", "--tta", "hflip")
    _kill9_leaves_nothing(cmd, tmp_path, workers=2)


def test_kill_9_of_shards_build_leaves_no_process(small_synth, tmp_path):
    cmd = _direct("shards", "build", str(small_synth / "train"), "--eval", str(small_synth / "eval"), "--out",
                  str(tmp_path / "set"), "--workers", "2", "--image-size", "original", "--quiet")
    _kill9_leaves_nothing(cmd, tmp_path, workers=2)


# --- preemption: SIGTERM, save, resume exactly ----------------------------------------------------


def _keys(run_dir: Path) -> list[str]:
    return (run_dir / "batches" / "rank0.txt").read_text().splitlines()


@pytest.mark.duration(45)
def test_sigterm_mid_epoch_then_resume_gives_the_uninterrupted_batches_and_weights(small_shards, tmp_path):
    # with the recipe options whose state must survive too: the EMA weights, mixup's numpy
    # RNG, part heads
    args = ("--workers", "2", "--batch-size", "8", "--log-batches", "--log-every", "3", "--seed", "5",
            "--ema-decay", "0.9", "--mixup", "0.4", "--heads", "parts", "--grad-accum", "2")
    out = tmp_path / "cut"
    proc = subprocess.Popen(_direct(*_train_args(small_shards, out, 0, 2, *args)), env=launch_env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    batch_log = out / "fold0" / "batches" / "rank0.txt"
    assert procs.wait_for(lambda: batch_log.exists() and len(batch_log.read_text().splitlines()) >= 4, 180)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED_EXIT, output[-3000:]
    state = json.loads((out / "fold0" / "state" / "trainer.json").read_text())
    k = state["step"]
    assert state["epoch"] == 0 and not state["epoch_done"] and 4 <= k < state["steps_per_epoch"]
    assert len(_keys(out / "fold0")) == k  # it finished its step, then stopped ...
    assert k % 2 == 0  # ... at the end of an accumulation window: the state holds no gradients
    assert f"saved a resumable state at epoch 0 step {k} (on SIGTERM) in" in output
    seconds = float(re.search(r"\(on SIGTERM\) in ([\d.]+) s", output).group(1))
    assert 0 < seconds < 30

    again = run_launch(_direct(*_train_args(small_shards, out, 0, 2, *args, "--resume")), tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resuming at epoch 0 step {k}" in again.stdout
    whole = tmp_path / "whole"
    straight = run_launch(_direct(*_train_args(small_shards, whole, 0, 2, *args)), tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    assert _keys(out / "fold0") == _keys(whole / "fold0")  # same batches, step for step, k+1 on included
    for weights in ("model.safetensors", "ema-rank0.safetensors"):
        a = load_file(str(out / "fold0" / "state" / weights))
        b = load_file(str(whole / "fold0" / "state" / weights))
        assert a.keys() == b.keys() and all(np.array_equal(a[n].numpy(), b[n].numpy()) for n in a), weights  # bit for bit
    live, ema = (load_file(str(whole / "fold0" / "state" / w)) for w in ("model.safetensors", "ema-rank0.safetensors"))
    assert any(not np.array_equal(live[n].numpy(), ema[n].numpy()) for n in ema if n in live)  # the EMA is its own
    cut, uncut = _scalars(out / "fold0"), _scalars(whole / "fold0")
    for tag in ("train/loss", "train/lr", "val/macro_f1", "train/epoch_loss"):
        steps = [s for s, _v in cut[tag]]
        assert len(steps) == len(set(steps)), tag  # no step logged twice
        assert steps == [s for s, _v in uncut[tag]], tag
    assert [v for _s, v in cut["val/macro_f1"]] == [v for _s, v in uncut["val/macro_f1"]]
    assert [v for _s, v in cut["train/epoch_loss"]] == pytest.approx([v for _s, v in uncut["train/epoch_loss"]], rel=1e-5)


def test_kill_9_during_state_saves_leaves_the_previous_state_loadable(tmp_path):
    """A process that does nothing but save states is killed at several moments; each time
    the state on disk loads and is one of the states it saved, never a mix."""
    script = tmp_path / "saver.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from maskdist.system import distributed
from maskdist.model.factory import create_model
from maskdist.train.state import save_state
accelerator = distributed.make_accelerator()
model = create_model("efficientnet_b0", drop_rate=0.0, warn_random=False)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model, optimizer = accelerator.prepare(model, optimizer)
run = __import__("pathlib").Path(sys.argv[1])
i = 0
while True:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(i))
    save_state(accelerator, run, {{"i": i}})
    print(i, flush=True)
    i += 1
""")
    from maskdist.model.factory import create_model
    from maskdist.system import distributed
    from maskdist.train.state import load_trainer_state

    run = tmp_path / "run"
    for delay in (2.0, 2.7, 3.3):
        proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True,
                                env=launch_env(tmp_path))
        assert procs.wait_for(lambda: (run / "state").exists() or (run / "state.old").exists(), 120)
        time.sleep(delay - 2.0 + 0.05)
        proc.kill()
        proc.wait()
        trainer = load_trainer_state(run)  # restores state.old if the kill fell between the renames
        assert trainer is not None
        accelerator = distributed.make_accelerator()
        model = accelerator.prepare(create_model("efficientnet_b0", drop_rate=0.0, warn_random=False))
        accelerator.load_state(str(run / "state"))
        values = {float(p.detach().flatten()[0]) for p in model.parameters()}
        assert values == {float(trainer["i"])}  # the weights of the state trainer.json describes
        shutil.rmtree(run)


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the training process of ``rank`` below an accelerate launch."""
    for pid, _start in procs.descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"maskdist" in cmdline and b"forkserver" not in cmdline:
            return pid
    return None


@pytest.mark.duration(35)
def test_a_killed_ddp_rank_stops_the_others_and_resume_restarts_cleanly(small_shards, tmp_path):
    out = tmp_path / "runs"
    args = _train_args(small_shards, out, 0, 3, "--workers", "1", "--batch-size", "8", "--log-batches",
                       "--checkpoint-every", "2")
    log = open(tmp_path / "ddp.log", "w")  # noqa: SIM115 (the child writes it until it ends; closed below)
    launch = subprocess.Popen(accelerate_cmd(2, *args), env=launch_env(tmp_path), cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        batches = out / "fold0" / "batches" / "rank1.txt"
        assert procs.wait_for(lambda: batches.exists() and len(batches.read_text().splitlines()) >= 3, 240), \
            (tmp_path / "ddp.log").read_text()[-3000:]
        assert procs.wait_for(lambda: (out / "fold0" / "state").exists(), 120)
        rank1 = _rank_pid(launch.pid, 1)
        assert rank1 is not None
        family = procs.descendants(launch.pid)
        started = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        launch.wait(timeout=90)  # well within the 60 s collective timeout plus shutdown
        elapsed = time.monotonic() - started
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "ddp.log").read_text()
    assert launch.returncode != 0 and elapsed < 75, text[-3000:]
    assert not procs.wait_gone(family, timeout=10), "processes of the launch outlived it"
    errors = [line for line in text.splitlines() if line.startswith("error: ")]  # rank 0's, one line
    assert len(errors) == 1 and errors[0].startswith("error: lost contact with another process of the run"), text[-3000:]
    assert "--resume" in errors[0]
    saved = json.loads((out / "fold0" / "state" / "trainer.json").read_text())

    again = run_launch(accelerate_cmd(2, *args, "--resume"), tmp_path, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming at epoch {saved['epoch']} step {saved['step']}" in again.stdout or saved["epoch_done"]
    final = json.loads((out / "fold0" / "state" / "trainer.json").read_text())
    assert final["epoch"] == 2 and final["epoch_done"]


@pytest.mark.duration(35)
def test_sigterm_to_a_whole_ddp_job_saves_once_on_every_rank_and_resumes(small_shards, tmp_path):
    """SIGTERM to the launcher and to every rank at once (a scheduler signalling every process
    of the job, the launcher forwarding its own copy): the ranks agree on one step, save
    together, exit, and leave no process behind; --resume then finishes the run."""
    out = tmp_path / "runs"
    args = _train_args(small_shards, out, 0, 2, "--workers", "1", "--batch-size", "4", "--log-batches")
    log = open(tmp_path / "ddp.log", "w")  # noqa: SIM115 (the child writes it until it ends; closed below)
    launch = subprocess.Popen(accelerate_cmd(2, *args), env=launch_env(tmp_path), cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        batches = [out / "fold0" / "batches" / f"rank{r}.txt" for r in (0, 1)]
        assert procs.wait_for(lambda: all(b.exists() and len(b.read_text().splitlines()) >= 3 for b in batches), 240), \
            (tmp_path / "ddp.log").read_text()[-3000:]
        ranks = [_rank_pid(launch.pid, r) for r in (0, 1)]
        family = procs.descendants(launch.pid)
        for pid in [launch.pid, *ranks]:
            os.kill(pid, signal.SIGTERM)
        launch.wait(timeout=120)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "ddp.log").read_text()
    assert not procs.wait_gone(family, timeout=10), "processes of the launch outlived it"
    state = json.loads((out / "fold0" / "state" / "trainer.json").read_text())
    assert not state["epoch_done"] and state["world_size"] == 2, text[-3000:]
    k = state["step"]
    assert text.count(f"saved a resumable state at epoch {state['epoch']} step {k} (on SIGTERM)") == 1, text[-3000:]
    assert [len(b.read_text().splitlines()) for b in batches] == [state["epoch"] * state["steps_per_epoch"] + k] * 2
    again = run_launch(accelerate_cmd(2, *args, "--resume"), tmp_path, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for b in batches:  # every step of the run once, none twice, none missing
        steps = [tuple(map(int, line.split()[:2])) for line in b.read_text().splitlines()]
        assert steps == [(e, s) for e in range(2) for s in range(state["steps_per_epoch"])]
