"""Runs on shared machines: one writer per fold folder, a disk that fills up mid-run, a
damaged resumable state, Ctrl-C, and no process left behind after a normal exit. Real
processes, real locks on real files, a real (small) tmpfs for the full disk."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import procs
import psutil
import pytest
from conftest import accelerate_cmd, launch_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maskdist.system.lock import LOCK_NAME, FolderLock, LockHeld, check_free
from maskdist.train.preemption import PREEMPTED_EXIT

FAST = ["--model", "test_efficientnet", "--resize", "64", "--crop", "48", "--batch-size", "8", "--lr", "0.2",
        "--timeout-s", "120", "--workers", "1", "--log-batches"]


def _args(shards, out, fold=0, epochs=2, *extra) -> list[str]:
    return ["train", "--shards", str(shards), "--fold", str(fold), "--out", str(out), "--epochs", str(epochs), *FAST, *extra]


def _direct(*args) -> list[str]:
    return [sys.executable, "-m", "maskdist", *args]


def _start(cmd, tmp_path, log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 (the child writes it until it ends)
    return subprocess.Popen(cmd, env=launch_env(tmp_path), cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_as_from_a_terminal)


def _as_from_a_terminal() -> None:
    """Ctrl-C reaches a command started from a terminal with SIGINT at its default; a suite run
    in the background by a non-interactive shell inherits SIGINT ignored, which a child would
    keep (and never see the Ctrl-C these tests send)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _group_alive(pgid: int) -> list[int]:
    """Processes still in process group ``pgid`` (the group a command was started in)."""
    alive = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def _group_commands(pgid: int) -> list[str]:
    """The command lines of the processes still in group ``pgid``, for a failure message."""
    commands = []
    for pid in _group_alive(pgid):
        with contextlib.suppress(psutil.Error):
            commands.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:200]}")
    return commands


def _steps(run_dir: Path) -> dict[tuple[str, str], str]:
    """(epoch, step) -> keys of every batch in a batch log; a re-run step keeps its last line."""
    out = {}
    for line in (run_dir / "batches" / "rank0.txt").read_text().splitlines():
        epoch, step, keys = line.split(" ", 2)
        out[(epoch, step)] = keys
    return out


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.duration(40)
def test_a_second_run_into_a_held_fold_refuses_and_the_first_finishes_intact(small_shards, tmp_path):
    out = tmp_path / "runs"
    first = _start(accelerate_cmd(2, *_args(small_shards, out, 0, 3)), tmp_path, tmp_path / "first.log")
    lock = out / "fold0" / LOCK_NAME
    assert procs.wait_for(lambda: lock.exists() and json.loads(lock.read_text() or "{}").get("pid"), 180), \
        (tmp_path / "first.log").read_text()[-2000:]
    holder = json.loads(lock.read_text())
    # the two ranks share the one lock: its holder is rank 0, a child of the launcher
    ranks = [p.pid for p in psutil.Process(first.pid).children(recursive=True) if "maskdist" in " ".join(p.cmdline())]
    assert holder["pid"] in ranks and holder["host"] == socket.gethostname()
    os.killpg(first.pid, signal.SIGSTOP)  # hold the first run still, so it surely is running while the second starts
    try:
        second = subprocess.run(_direct(*_args(small_shards, out, 0, 3)), env=launch_env(tmp_path), cwd=tmp_path,
                                capture_output=True, text=True, timeout=120, start_new_session=True)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert _errors(second.stderr) == [line for line in second.stderr.splitlines() if line.strip()]  # one line
    assert f"is in use by pid {holder['pid']} on {holder['host']}" in second.stderr
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    card = json.loads((out / "fold0" / "model.json").read_text())
    assert card["finished"] and not lock.exists()
    assert len((out / "fold0" / "launches.jsonl").read_text().splitlines()) == 1  # the refused run wrote nothing
    assert procs.wait_for(lambda: not _group_alive(first.pid), 10), _group_commands(first.pid)


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    folder = tmp_path / "fold0"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def plant(host: str, pid: int, age_s: float = 0.0) -> None:
        (folder / LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "pid_started": 0.0, "started": time.time(),
                                                    "command": "maskdist train", "token": "old"}))
        if age_s:
            os.utime(folder / LOCK_NAME, (time.time() - age_s,) * 2)

    plant(socket.gethostname(), dead.pid)  # this host, its process gone
    with FolderLock(folder) as lock:
        lock.acquire()
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(LockHeld, match=f"in use by pid {os.getpid()}"):
            FolderLock(folder).acquire()
        check_free(folder, allowed={lock.token})  # our own children may write under it
    assert not (folder / LOCK_NAME).exists()
    plant("another-host", 12345)  # another host, heartbeat fresh: live
    with pytest.raises(LockHeld, match="another-host"):
        FolderLock(folder).acquire(wait_s=0.5)
    plant("another-host", 12345, age_s=600)  # another host, no heartbeat for 10 minutes: gone
    FolderLock(folder).acquire().release()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()[:200]}): the full-disk test needs root")


@pytest.mark.duration(45)
def test_a_full_disk_stops_in_one_line_and_resume_gives_the_uninterrupted_batches(small_shards, tmp_path):
    # the uninterrupted reference, started in its own process group: a normal exit leaves
    # no process of it behind (the forkserver ends before it returns; multiprocessing's
    # resource tracker ends when it reads its pipe's end, a moment after, on a busy machine)
    whole = tmp_path / "whole"
    ref = _start(_direct(*_args(small_shards, whole, 0, 2, "--checkpoint-every", "2")), tmp_path, tmp_path / "ref.log")
    assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    assert procs.wait_for(lambda: not _group_alive(ref.pid), 10), _group_commands(ref.pid)

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "16m")
    try:
        out = disk / "runs"
        cut = _start(_direct(*_args(small_shards, out, 0, 2, "--checkpoint-every", "2")), tmp_path, tmp_path / "cut.log")
        batches = out / "fold0" / "batches" / "rank0.txt"
        assert procs.wait_for(lambda: batches.exists() and len(batches.read_text().splitlines()) >= 3, 180)
        filler = disk / "filler"
        with open(filler, "wb") as handle:  # the disk fills up
            try:
                while True:
                    handle.write(b"\0" * (1 << 16))
            except OSError:
                pass
        assert cut.wait(timeout=180) == 2, (tmp_path / "cut.log").read_text()[-3000:]
        output = (tmp_path / "cut.log").read_text()
        assert "Traceback" not in output and len(_errors(output)) == 1, output[-3000:]
        assert "no space left on the device writing" in _errors(output)[0] and str(out) in _errors(output)[0]
        assert not list(out.rglob("*.tmp")) and not (out / "fold0" / "state.tmp").exists()  # nothing half-written
        filler.unlink()  # space freed: the run continues from its last good state
        again = subprocess.run(_direct(*_args(small_shards, out, 0, 2, "--checkpoint-every", "2", "--resume")),
                               env=launch_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert _steps(out / "fold0") == _steps(whole / "fold0")
        assert json.loads((out / "fold0" / "model.json").read_text())["finished"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _tb_steps(run_dir: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_torch_saves_short_write_on_a_full_disk_counts_as_a_full_disk(tmp_path):
    """torch.save reports a failed write as "unexpected pos" without the errno; on a full
    filesystem that is a full disk, elsewhere it stays what it is."""
    import torch

    from maskdist.system.fileio import is_disk_full

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1m")
    try:
        with pytest.raises(Exception) as caught:  # noqa: PT011 (torch raises RuntimeError or OSError, by version)
            torch.save({"w": torch.zeros(1 << 20)}, disk / "big.pt")  # 4 MB into 1 MB
        assert is_disk_full(caught.value, disk)
        assert not is_disk_full(RuntimeError("unexpected pos 1 vs 2"), tmp_path)  # the same words with space to spare
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_changed_byte_of_the_same_size_is_caught_by_its_hash_and_the_state_before_it_is_used(tmp_path):
    """The sizes alone would miss it: one byte flipped in place. A trainer.json that does not
    parse falls back the same way when the fold's status is read."""
    from maskdist.train.state import choose_state, fold_status, state_files, state_problem

    def saved(folder: Path, step: int) -> Path:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(os.urandom(4096))
        trainer = {"epoch": 0, "step": step, "epoch_done": False, "files": state_files(folder)}
        (folder / "trainer.json").write_text(json.dumps(trainer))
        return folder

    run = tmp_path / "fold0"
    state, before = saved(run / "state", 8), saved(run / "state.old", 4)
    assert state_problem(state) is None and state_problem(before) is None
    data = bytearray((state / "model.safetensors").read_bytes())
    data[100] ^= 0xFF
    (state / "model.safetensors").write_bytes(bytes(data))
    assert state_problem(state) == f"{state / 'model.safetensors'} differs from what the save wrote (sha256)"
    chosen, trainer, warning = choose_state(run)
    assert chosen == before and trainer["step"] == 4 and "sha256" in warning

    (state / "trainer.json").write_text("{not json")
    status = fold_status(run)
    assert status.state == "interrupted" and status.step == 4  # read from state.old


@pytest.mark.duration(45)
def test_ctrl_c_saves_a_damaged_state_falls_back_and_resume_keeps_its_settings(small_shards, tmp_path):
    out = tmp_path / "runs"
    args = _args(small_shards, out, 0, 2, "--checkpoint-every", "2", "--log-every", "1")
    run = _start(_direct(*args), tmp_path, tmp_path / "cut.log")
    batches = out / "fold0" / "batches" / "rank0.txt"
    assert procs.wait_for(lambda: batches.exists() and len(batches.read_text().splitlines()) >= 5, 180)
    procs.signal_frozen(run.pid, signal.SIGINT)  # Ctrl-C: finish the step, save, stop
    assert run.wait(timeout=120) == PREEMPTED_EXIT, (tmp_path / "cut.log").read_text()[-3000:]
    output = (tmp_path / "cut.log").read_text()
    assert "Ctrl-C (SIGINT) received" in output and "`--resume` continues" in output and "Traceback" not in output
    fold = out / "fold0"
    state = json.loads((fold / "state" / "trainer.json").read_text())
    assert not state["epoch_done"] and (fold / "state.old" / "trainer.json").is_file()

    # --resume may not change what the fold trains (a run-only setting may change)
    changed = subprocess.run(_direct(*args, "--resume", "--lr", "0.01"), env=launch_env(tmp_path), cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "--lr 0.2 -> 0.01" in changed.stderr and "interrupted at epoch 0 step" in changed.stderr

    # both copies damaged: one line naming them; one damaged: the one before it is used
    both = tmp_path / "both"
    shutil.copytree(out, both)
    for name in ("state", "state.old"):
        model = both / "fold0" / name / "model.safetensors"
        model.write_bytes(model.read_bytes()[:100])
    broken = subprocess.run(_direct(*_args(small_shards, both, 0, 2, "--checkpoint-every", "2", "--log-every", "1", "--resume")),
                            env=launch_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert "state/model.safetensors" in broken.stderr and "state.old/model.safetensors" in broken.stderr
    assert "--overwrite" in broken.stderr

    damaged = fold / "state" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    again = subprocess.run(_direct(*args, "--resume", "--workers", "2"), env=launch_env(tmp_path), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"warning: {damaged} has 100 bytes" in again.stdout + again.stderr
    assert "resuming from the state before it" in again.stdout + again.stderr
    steps = _tb_steps(fold, "train/loss")
    assert len(steps) == len(set(steps)) and steps == sorted(steps)  # TensorBoard shows no step twice
    assert json.loads((fold / "model.json").read_text())["finished"]


def test_ctrl_c_of_shards_build_leaves_nothing_half_written(small_synth, tmp_path):
    out = tmp_path / "shards"
    build = _start(_direct("shards", "build", str(small_synth / "train"), "--out", str(out), "--workers", "2"), tmp_path,
                   tmp_path / "build.log")
    assert procs.wait_for(lambda: any(p.name.startswith(".shards.partial") for p in tmp_path.iterdir()), 120)
    build.send_signal(signal.SIGINT)
    assert build.wait(timeout=60) == 130
    output = (tmp_path / "build.log").read_text()
    assert "Traceback" not in output and "interrupted (Ctrl-C)" in output
    assert not out.exists() and not any(p.name.startswith(".shards") for p in tmp_path.iterdir())
    assert procs.wait_for(lambda: not _group_alive(build.pid), 10), _group_commands(build.pid)
