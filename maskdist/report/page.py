"""``maskdist report``: one self-contained HTML page of one or more experiments.

Every picture is a PNG inlined as a ``data:`` URI and the style sits in the page, so the file
opens anywhere without network and can be attached as it is. Every figure of a picture is in
a table too; a cell that holds a figure the tests read back names it in ``data-key``.
"""
from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Sequence
from pathlib import Path

from maskdist.data import labels
from maskdist.errors import MaskdistError
from maskdist.report import plots
from maskdist.report.figures import Experiment, gather
from maskdist.system.fileio import atomic_write_text

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:2px solid #4c72b0;padding-bottom:4px;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#eef}td.t,th.t{text-align:left}img{max-width:100%;display:block;margin:8px 0}
.note{color:#a33}.muted{color:#666;font-size:0.85em}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _f(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(text: str, key: str | None = None, left: bool = False) -> str:
    attributes = (f' data-key="{_e(key)}"' if key else "") + (' class="t"' if left else "")
    return f"<td{attributes}>{_e(text)}</td>"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows of ready cells (:func:`_cell` output) under a header."""
    head = "".join(f"<th{' class=t' if i == 0 else ''}>{_e(h)}</th>" for i, h in enumerate(header))
    return f"<table><tr>{head}</tr>" + "".join(f"<tr>{''.join(r)}</tr>" for r in rows) + "</table>"


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _plan(x: Experiment) -> str:
    data = x.data
    pretrained = data["pretrained"]
    source = pretrained.get("source", "none") + "".join(f", {k} {v}" for k, v in pretrained.items() if k not in ("source", "sha256"))
    rows = [("shard set", data["shards"]), ("architecture", data["architecture"]),
            ("image", f"resize {data['resize']}, centre crop {data['crop']}"), ("face crop", data["face_crop"]),
            ("pretrained", source), ("training age cut", data["age_cut"])]
    settings = [(k, v) for k, v in x.plan.items() if k not in ("shards",)]
    return ("<h3>Plan</h3>" + table(["what", "value"], [[_cell(k, left=True), _cell(v, left=True)] for k, v in rows])
            + "<details><summary>every training setting (experiment.yaml)</summary>"
            + table(["setting", "value"], [[_cell(k, left=True), _cell(v, left=True)] for k, v in settings]) + "</details>")


def _folds(x: Experiment, key: str) -> str:
    rows = [[_cell(f"fold{f.fold}", left=True), _cell(f"{len(f.curves.epochs)} of {f.epochs}"),
             _cell(f.best_epoch, f"{key}.folds.{f.fold}.best_epoch"),
             _cell(_f(f.best_macro_f1), f"{key}.folds.{f.fold}.best_macro_f1"),
             _cell(_f(x.fold_scores[f.fold].macro_f1) if f.fold in x.fold_scores else "n/a", f"{key}.folds.{f.fold}.macro_f1"),
             _cell(_f(100 * f.curves.mean("data_wait"), 1) if f.curves.epochs else "n/a"),
             _cell(_f(f.curves.mean("images_per_s"), 0) if f.curves.epochs else "n/a"),
             _cell("yes" if f.finished else "no")] for f in x.folds]
    epochs = [[_cell(f"fold{f.fold}", left=True), _cell(e), _cell(_f(f.curves.values["loss"][i])), _cell(_f(f.curves.values["macro_f1"][i])),
               _cell(_f(100 * f.curves.values["data_wait"][i], 1)), _cell(_f(f.curves.values["images_per_s"][i], 0))]
              for f in x.folds for i, e in enumerate(f.curves.epochs)]
    body = ("<h3>Folds</h3>" + table(["fold", "epochs logged", "best epoch", "best val macro F1", "OOF macro F1 (its rows)",
                                      "data wait % (mean)", "img/s (mean)", "finished"], rows))
    if any(f.curves.epochs for f in x.folds):
        body += image(plots.curves(x.folds), "training loss and validation macro F1 per epoch, per fold")
        body += ("<details><summary>per epoch</summary>"
                 + table(["fold", "epoch", "loss", "val macro F1", "data wait %", "img/s"], epochs) + "</details>")
    return body


def _oof(x: Experiment, key: str) -> str:
    s = x.oof
    head = table(["macro F1", "mask F1", "gender F1", "age F1", "accuracy", "images"],
                 [[_cell(_f(s.macro_f1), f"{key}.oof.macro_f1")]
                  + [_cell(_f(s.part_f1[p]), f"{key}.oof.part_f1.{p}") for p in ("mask", "gender", "age")]
                  + [_cell(_f(s.accuracy), f"{key}.oof.accuracy"), _cell(s.samples, f"{key}.oof.samples")]])
    classes = table(["class", "images", "F1"], [[_cell(f"{c:02d} {labels.class_name(c)}", left=True), _cell(n, f"{key}.oof.count.{c}"),
                                                 _cell(_f(f1), f"{key}.oof.per_class_f1.{c}")]
                                                for c, (n, f1) in enumerate(zip(x.class_counts, s.per_class_f1))])
    confusion = table(["true \\ predicted", *[f"{c:02d}" for c in range(len(s.confusion))]],
                      [[_cell(f"{r:02d} {labels.class_name(r)}", left=True)] + [_cell(n, f"{key}.oof.confusion.{r}.{c}") for c, n in enumerate(row)]
                       for r, row in enumerate(s.confusion)])
    bins = x.reliability["bins"]
    calibration = table(["confidence", "images", "mean confidence", "accuracy"],
                        [[_cell(f"{b['low']:.1f}-{b['high']:.1f}", left=True), _cell(b["count"]), _cell(_f(b["confidence"], 3)),
                          _cell(_f(b["accuracy"], 3))] for b in bins])
    return ("<h3>Out-of-fold predictions</h3>" + head
            + '<p class="muted">Each training image scored by the one fold model that did not train on it (as <code>maskdist oof</code>).</p>'
            + image(plots.class_f1(s.per_class_f1, x.class_counts), "out-of-fold F1 per class with class counts") + classes
            + image(plots.confusion(s.confusion), "18x18 confusion matrix")
            + "<details><summary>confusion matrix counts</summary>" + confusion + "</details>"
            + f"<h3>Reliability</h3><p>Expected calibration error: <b data-key=\"{key}.ece\">{_f(x.reliability['ece'], 3)}</b></p>"
            + image(plots.reliability(x.reliability), "reliability diagram: confidence against accuracy") + calibration)


def _decisions(x: Experiment, key: str) -> str:
    if x.decisions is None:
        return '<h3>Tuned decisions</h3><p class="muted">none (<code>maskdist oof EXPERIMENT --tune</code> writes them)</p>'
    nested = x.decisions["nested"]
    rows = [[_cell("all folds", left=True), _cell(_f(nested["argmax"])), _cell(_f(nested["tuned"])),
             _cell(f"{nested['gain']:+.4f}", f"{key}.decisions.gain")]]
    rows += [[_cell(f"fold {k}", left=True), _cell(_f(v["argmax"])), _cell(_f(v["tuned"])), _cell(f"{v['tuned'] - v['argmax']:+.4f}")]
             for k, v in nested["folds"].items()]
    return ("<h3>Tuned decisions</h3><p>Nested: tuned on k-1 folds, scored on the k-th, so the gain is what to expect on new"
            f" images ({_e(Path(x.decisions['path']).name)}).</p>" + table(["rows", "argmax macro F1", "tuned macro F1", "gain"], rows))


def _audit(x: Experiment) -> str:
    if x.audit is None:
        return '<h3>Label audit</h3><p class="muted">none (<code>maskdist audit EXPERIMENT</code> writes one)</p>'
    flagged = x.audit.get("flagged", {})
    body = ("<h3>Label audit</h3>" + table(["kind", "flagged people"], [[_cell(k, left=True), _cell(v)] for k, v in flagged.items()])
            + f"<p>{_e(x.audit.get('fixes', 0))} people in fixes.csv; {_e(x.audit.get('image_suspects', 0))} image suspects.</p>")
    if x.audit.get("sheet_file"):
        body += "<p>The top suspects' photos: given label, then the OOF prediction (red: the part in doubt differs).</p>"
        body += image(Path(x.audit["sheet_file"]).read_bytes(), "contact sheet of the top label suspects")
    return body


def experiment_section(x: Experiment, key: str) -> str:
    notes = "".join(f'<p class="note">note: {_e(n)}</p>' for n in x.notes + [f"unfinished fold read: {u}" for u in x.unfinished])
    where = f" <span class='muted'>{_e(x.path)}</span>" if str(x.path) != x.path.name else ""
    return (f"<h2>{_e(x.path.name)}{where}</h2>" + notes + _plan(x) + _folds(x, key) + _oof(x, key)
            + _decisions(x, key) + _audit(x))


def _interval(values, key: str) -> list[str]:
    low, high = values
    return [_cell(f"{low:.4f}", f"{key}.low"), _cell(f"{high:.4f}", f"{key}.high")]


def compare_section(result: dict) -> str:
    """``maskdist compare``'s figures (the dict ``compare --json`` prints) at the top: each
    experiment's OOF figures with their intervals, then each difference and its verdict."""
    section = result["oof"]
    units = "people" if section["unit"] == "person" else f"{section['unit']}s"
    rows = [[_cell(x["experiment"], left=True), _cell(_f(x["macro_f1"]), f"cmp.exp.{i}.macro_f1"), *_interval(x["interval"], f"cmp.exp.{i}")]
            + [_cell(_f(x["part_f1"][p]), f"cmp.exp.{i}.{p}") for p in ("mask", "gender", "age")]
            for i, x in enumerate(section["experiments"])]
    diffs = [[_cell(f"{d['experiment']} vs {d['against']}", left=True), _cell(f"{d['macro_f1']:+.4f}", f"cmp.diff.{i}.macro_f1"),
              *_interval(d["interval"], f"cmp.diff.{i}"), _cell(d["verdict"], f"cmp.diff.{i}.verdict", left=True),
              _cell("inside the seed noise" if d["within_seed_noise"] else "", left=True)] for i, d in enumerate(section["differences"])]
    noise = "".join(f"<p>Seed noise: {_e(', '.join(g['experiments']))} differ only in the seed; their macro F1 spread is"
                    f" {g['spread']:.4f}, and a difference inside it is never called better.</p>" for g in section["seed_noise"]["groups"])
    return ("<h2>Comparison</h2>"
            f"<p>Out-of-fold rows: {section['images']} images of {section['groups']} {_e(units)}; 95% intervals from"
            f" {result['resamples']} bootstrap resamples over {_e(units)}, the same resample for every experiment"
            " (as <code>maskdist compare</code>).</p>"
            + table(["experiment", "macro F1", "95% low", "95% high", "mask F1", "gender F1", "age F1"], rows)
            + table(["difference", "macro F1", "95% low", "95% high", "verdict", ""], diffs) + noise)


def _comparison(paths: list[Path]) -> str:
    from maskdist.infer.compare import compare_experiments

    try:
        return compare_section(compare_experiments(paths))
    except MaskdistError as err:  # the page still shows each experiment; it says why they are not compared
        return f'<h2>Comparison</h2><p class="note">not compared: {_e(err)}</p>'


def render(runs: Sequence[str | Path], allow_unfinished: bool = False) -> str:
    experiments = [gather(r, allow_unfinished) for r in runs]
    top = _comparison([x.path for x in experiments]) if len(experiments) > 1 else ""
    sections = "".join(experiment_section(x, f"e{i}") for i, x in enumerate(experiments))
    title = "maskdist report: " + ", ".join(x.path.name for x in experiments)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class='muted'>written {time.strftime('%Y-%m-%d %H:%M')}</p>{top}{sections}</body></html>")


def write_report(runs: Sequence[str | Path], out: str | Path, allow_unfinished: bool = False) -> Path:
    plots._pyplot()  # the one-line error without matplotlib, before any reading
    out = Path(out)
    atomic_write_text(out, render(runs, allow_unfinished))
    return out
