"""``maskdist bench memory -- COMMAND``: the memory of a command and of every process it starts,
sampled over its whole run.

A leak shows as growth over time, not as a high value at the end, so :func:`watch` samples
the resident set size (RSS) of the command and all its descendants every ``every`` seconds
while it runs, and :class:`MemoryTrace` reports, per process, its role (main, loader or pool
worker, forkserver, ...), RSS at start, median, peak and end, and its growth: the median of
the last quarter of its samples minus that of the second quarter (the first quarter is
start-up). The samples can be written to a CSV for plotting.
"""
from __future__ import annotations

import csv
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FORKED = ""  # a role not known yet: a fork that has not exec'd its own program


def _role(proc, root_pid: int) -> str:
    try:
        command = " ".join(proc.cmdline())
        parent = proc.parent()
        parent_command = " ".join(parent.cmdline()) if parent else ""
    except Exception:  # noqa: BLE001 (the process ended while we looked)
        return "?"
    if proc.pid == root_pid:
        return "main"
    if "resource_tracker" in command:
        return "resource tracker"
    if "forkserver" in command:
        return "worker" if "forkserver" in parent_command else "forkserver"
    if command == parent_command:  # between fork and exec (a loaded machine widens that moment): ask again later
        return FORKED
    if "accelerate" in command or "torch.distributed.run" in command:
        return "launcher"
    if "maskdist" in command:
        return "rank" if "accelerate" in parent_command else "main"
    return command.split(" ")[0].rsplit("/", 1)[-1] or "?"


@dataclass
class ProcessTrace:
    pid: int
    role: str
    times: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    def growth_mb(self) -> float:
        """Median RSS of the last quarter of the samples minus that of the second quarter."""
        n = len(self.rss_mb)
        if n < 8:
            return 0.0
        q = n // 4
        return statistics.median(self.rss_mb[3 * q:]) - statistics.median(self.rss_mb[q:2 * q])


@dataclass
class MemoryTrace:
    command: list[str]
    returncode: int
    seconds: float
    every: float
    processes: list[ProcessTrace]

    def describe(self) -> str:
        lines = [f"memory of `{' '.join(self.command)}`: {self.seconds:.0f} s, sampled every {self.every:g} s,"
                 f" exit status {self.returncode}",
                 f"  {'pid':>8} {'role':<18}{'samples':>8}{'start MB':>10}{'median MB':>11}{'peak MB':>9}{'end MB':>8}{'growth MB':>11}"]
        for p in sorted(self.processes, key=lambda p: (p.times[0], p.pid)):
            lines.append(f"  {p.pid:>8} {p.role:<18}{len(p.rss_mb):>8}{p.rss_mb[0]:>10.0f}{statistics.median(p.rss_mb):>11.0f}"
                         f"{max(p.rss_mb):>9.0f}{p.rss_mb[-1]:>8.0f}{p.growth_mb():>+11.0f}")
        return "\n".join(lines)

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["seconds", "pid", "role", "rss_mb"])
            for p in self.processes:
                for t, mb in zip(p.times, p.rss_mb):
                    writer.writerow([f"{t:.2f}", p.pid, p.role, f"{mb:.1f}"])


def watch(command: Sequence[str], every: float = 1.0) -> MemoryTrace:
    """Run ``command`` (output passes through) and sample the RSS of its process tree until it ends."""
    import psutil

    started = time.monotonic()
    proc = subprocess.Popen(list(command))
    traces: dict[tuple[int, float], ProcessTrace] = {}
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            now = time.monotonic() - started
            try:
                family = [root] + root.children(recursive=True)
            except psutil.Error:
                family = []
            for member in family:
                try:
                    key = (member.pid, member.create_time())
                    rss = member.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                if rss < 1.0:  # exited and not yet reaped, or not yet running (a real process holds MBs)
                    continue
                trace = traces.get(key)
                if trace is None:
                    trace = traces[key] = ProcessTrace(member.pid, _role(member, proc.pid))
                elif trace.role == FORKED:
                    trace.role = _role(member, proc.pid)
                trace.times.append(now)
                trace.rss_mb.append(rss)
            time.sleep(every)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for trace in traces.values():
        trace.role = trace.role or "fork"  # never exec'd while sampled (a fork-context child)
    return MemoryTrace(list(command), proc.returncode, time.monotonic() - started, every,
                       [t for t in traces.values() if t.rss_mb])
