"""``maskdist report``: one self-contained HTML page of one or more experiments."""
from __future__ import annotations

import time
from pathlib import Path

import click

from maskdist.cli import usage
from maskdist.cli.base import main


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"), show_default=True)
@click.option("--allow-unfinished", is_flag=True, help="Read the OOF predictions of folds that did not finish (recorded).")
def report(runs, out, allow_unfinished):
    """One page a teammate can open or attach: the plan, each fold's curves, data-wait share
    and img/s, the out-of-fold scores, per-class F1, confusion matrix, reliability, tuned
    decisions and the label audit; several experiments are compared at the top.

    RUNS: experiment folders (their fold<K>). Pictures are inlined: no network at view time."""
    usage.require_extra("report", "maskdist report")
    usage.check_runs(runs)
    from maskdist.report.page import write_report

    started = time.perf_counter()
    path = write_report(list(runs), out, allow_unfinished)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(runs)} experiment(s)) in {time.perf_counter() - started:.1f} s")
