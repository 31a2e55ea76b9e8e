"""``maskdist bench cli``: how long each command takes to report a usage mistake.

Each case is a real ``python -m maskdist`` process with a mistake in its arguments (a missing
folder, a fold the shard set lacks, an option left out, a value out of range, a tracker
without its environment). A usage error should come before torch loads: in well under a
second. The cases are also what the tests run with torch made unimportable.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    says: str  # a fragment of the one-line error
    unset: tuple[str, ...] = ()  # environment variables the case runs without


def cases(work: Path, shards: str | None = None) -> list[Case]:
    """The usage mistakes, with paths under ``work`` (an empty experiment folder ``work/empty``
    is made); with ``shards`` (a shard set folder), the ones checked against its manifest too."""
    empty = work / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    nope = str(work / "nope")
    train = ("train", "--shards", shards or nope, "--out", str(work / "runs"))
    found = [
        Case("oof: missing folder", ("oof", nope), "not found"),
        Case("predict: missing folder", ("predict", nope, "--eval-dir", nope), "not found"),
        Case("predict: neither --shards nor --eval-dir", ("predict", str(empty)), "--eval-dir"),
        Case("predict: experiment without folds", ("predict", str(empty), "--eval-dir", str(work)), "holds no fold"),
        Case("classify: missing photo", ("classify", str(empty), nope + ".jpg"), "not found"),
        Case("score: missing files", ("score", nope + ".csv", nope + "-answers.csv"), "not found"),
        Case("pseudo-label: missing folder", ("pseudo-label", nope, nope), "not found"),
        Case("audit: missing folder", ("audit", nope), "not found"),
        Case("export: missing folder", ("export", nope, "--format", "timm", "--out", nope), "not found"),
        Case("train: missing shard set", ("train", "--shards", nope, "--out", str(work / "runs")), "not found"),
        Case("train: --lr -1", (*train, "--lr", "-1"), "--lr"),
        Case("train: --weight-decay -1", (*train, "--weight-decay", "-1"), "--weight-decay"),
        Case("train: unknown tracker", (*train, "--log-with", "nosuch"), "--log-with"),
        Case("train: mlflow without its store", (*train, "--log-with", "tensorboard,mlflow"), "MLFLOW_TRACKING_URI",
             unset=("MLFLOW_TRACKING_URI",)),
        Case("train: missing weights file", (*train, "--pretrained", nope + ".safetensors"), "not found"),
        Case("kfold: missing shard set", ("kfold", "--shards", nope, "--out", str(work / "runs")), "not found"),
    ]
    if shards:
        found.append(Case("train: a fold the set lacks", (*train, "--fold", "99"), "does not exist"))
    return found


def run_case(case: Case, env: dict | None = None, python: tuple[str, ...] = (sys.executable, "-m", "maskdist"),
             cwd: Path | None = None) -> tuple[tuple[float, float], subprocess.CompletedProcess]:
    """Seconds to the usage error (wall, and the CPU time the process used), and the finished process."""
    env = dict(os.environ if env is None else env)
    for name in case.unset:
        env.pop(name, None)
    began, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run([*python, *case.args], env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    return (time.perf_counter() - began, _children_cpu() - cpu), done


def _children_cpu() -> float:
    """CPU seconds of the finished child processes: on a busy machine, what a case costs
    (the wall time there includes the waits for a core)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_cli(shards: str | None = None, echo=print) -> list[dict]:
    """Time every case; rows sorted slowest first. A case that did not end in its one-line usage
    error (status 2) is marked so."""
    rows = []
    shards = os.path.abspath(shards) if shards and os.path.exists(shards) else shards  # the cases run in a folder of their own
    with tempfile.TemporaryDirectory(prefix="maskdist-bench-cli-") as tmp:
        for case in cases(Path(tmp), shards):
            (seconds, cpu_s), done = run_case(case, cwd=Path(tmp))
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            ok = done.returncode == 2 and case.says in done.stderr and len(lines) == 1
            rows.append({"case": case.name, "seconds": seconds, "cpu_s": cpu_s, "ok": ok, "error": lines[-1] if lines else ""})
    return sorted(rows, key=lambda row: -row["seconds"])
