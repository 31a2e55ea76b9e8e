"""`maskdist report` as a person sees it: the page of two experiments opened in a real headless
Chromium (Debian's package; the test skips, saying so, where it is not installed), a
screenshot taken, every picture decoded, and the numbers the browser shows equal to
`oof --json` and `compare --json`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import EXPERIMENT_FOLDS, EXPERIMENT_TRAIN, launch_env

from maskdist.cli import main

pytestmark = [pytest.mark.xdist_group("predict-experiment"), pytest.mark.duration(60)]
CHROMIUM = shutil.which("chromium")
WIDTH = 1200
# Run in the page after it loaded: what the browser made of it, as attributes --dump-dom shows.
PROBE = """<script>window.addEventListener("load", () => {
  const images = [...document.images], body = document.body;
  body.setAttribute("data-images", images.length);
  body.setAttribute("data-decoded", images.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length);
  body.setAttribute("data-height", document.documentElement.scrollHeight);
  body.setAttribute("data-boxes", JSON.stringify(images.map(i => { const r = i.getBoundingClientRect();
    return [r.top + window.scrollY, r.left, r.width, r.height]; })));
});</script>"""


class Cells(HTMLParser):
    """The text of every element with a ``data-key``, and the body's attributes."""

    def __init__(self):
        super().__init__()
        self.cells, self.body, self._key = {}, {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        self._key = attrs.get("data-key", self._key)

    def handle_data(self, data):
        if self._key is not None:
            self.cells[self._key] = self.cells.get(self._key, "") + data

    def handle_endtag(self, tag):
        self._key = None


def _browse(page, tmp_path, *args) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=10000", *args, page.as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _cli(*args) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium): the page cannot be opened")
def test_the_report_renders_in_a_browser_with_the_oof_and_compare_figures(trained_experiment, small_shards, tmp_path):
    experiment, other = tmp_path / "exp", tmp_path / "other"
    shutil.copytree(trained_experiment, experiment)
    for fold in range(EXPERIMENT_FOLDS):  # a second experiment on the same shard set: another seed
        train = [sys.executable, "-m", "maskdist", "train", "--shards", str(small_shards), "--fold", str(fold), "--out", str(other),
                 *EXPERIMENT_TRAIN, "--seed", "1"]
        assert subprocess.run(train, env=launch_env(tmp_path), capture_output=True, timeout=300, cwd=tmp_path).returncode == 0
    tuned = json.loads(_cli("oof", str(experiment), "--tune", "--force", "--json"))["decisions"]
    _cli("audit", str(experiment), "--people", "2")
    report = tmp_path / "report.html"
    assert "wrote" in _cli("report", str(experiment), str(other), "--out", str(report))
    text = report.read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", text)  # self-contained: nothing fetched at view time

    page = tmp_path / "probe.html"
    page.write_text(text.replace("</body>", PROBE + "</body>"))
    parsed = Cells()
    parsed.feed(_browse(page, tmp_path, "--dump-dom", f"--window-size={WIDTH},1000").stdout)
    body = parsed.body
    # per experiment curves, per-class F1, confusion matrix, reliability; the first's audit contact sheet: all decoded
    assert int(body["data-images"]) == 9 and int(body["data-decoded"]) == 9, body
    height = int(body["data-height"])
    boxes = json.loads(body["data-boxes"])
    assert height >= sum(b[3] for b in boxes) + 60 * 20  # the pictures and at least 60 table rows (20 px each)

    shot = tmp_path / "shot.png"
    _browse(page, tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{height}")
    pixels = cv2.imread(str(shot))
    assert pixels.shape[:2] == (height, WIDTH)
    ink = (pixels < 200).any(axis=2)
    bands = np.array_split(ink, 20)  # content from top to bottom: no blank stretch of a twentieth of the page
    assert all(band.mean() > 0.002 for band in bands), [round(float(b.mean()), 4) for b in bands]
    for top, left, w, h in boxes:  # each picture painted where the browser placed it, not a blank box
        crop = pixels[int(top):int(top + h), int(left):int(left + w)]
        assert h > 100 and crop.std() > 20, (top, left, w, h)

    oof = json.loads(_cli("oof", str(experiment), "--json"))
    s, shown = oof["oof"], parsed.cells
    expected = {"e0.oof.macro_f1": f"{s['macro_f1']:.4f}", "e0.oof.accuracy": f"{s['accuracy']:.4f}",
                "e0.oof.samples": str(s["samples"]), "e0.decisions.gain": f"{tuned['nested']['gain']:+.4f}"}
    expected |= {f"e0.oof.part_f1.{p}": f"{v:.4f}" for p, v in s["part_f1"].items()}
    expected |= {f"e0.oof.per_class_f1.{c}": f"{v:.4f}" for c, v in enumerate(s["per_class_f1"])}
    expected |= {f"e0.oof.count.{c}": str(sum(row)) for c, row in enumerate(s["confusion"])}
    expected |= {f"e0.oof.confusion.{r}.{c}": str(n) for r, row in enumerate(s["confusion"]) for c, n in enumerate(row)}
    expected |= {f"e0.folds.{k}.macro_f1": f"{v['macro_f1']:.4f}" for k, v in oof["folds"].items()}
    compared = json.loads(_cli("compare", str(experiment), str(other), "--json"))["oof"]
    for i, x in enumerate(compared["experiments"]):
        expected |= {f"cmp.exp.{i}.macro_f1": f"{x['macro_f1']:.4f}", f"cmp.exp.{i}.low": f"{x['interval'][0]:.4f}",
                     f"cmp.exp.{i}.high": f"{x['interval'][1]:.4f}"}
        expected |= {f"cmp.exp.{i}.{p}": f"{v:.4f}" for p, v in x["part_f1"].items()}
    d = compared["differences"][0]
    expected |= {"cmp.diff.0.macro_f1": f"{d['macro_f1']:+.4f}", "cmp.diff.0.low": f"{d['interval'][0]:.4f}",
                 "cmp.diff.0.high": f"{d['interval'][1]:.4f}", "cmp.diff.0.verdict": d["verdict"]}
    assert compared["experiments"][0]["macro_f1"] == pytest.approx(s["macro_f1"])
    assert {k: shown.get(k) for k in expected} == expected


def test_without_matplotlib_the_report_says_how_to_install_it_in_one_line(tmp_path):
    blocked = "import sys; sys.modules['matplotlib'] = None; from maskdist.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", blocked, "report", str(tmp_path), "--out", str(tmp_path / "r.html")],
                            env=launch_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and not (tmp_path / "r.html").exists()
    assert result.stderr.strip().splitlines() == ["error: maskdist report needs the [report] extra (matplotlib not installed):"
                                                  " pip install 'maskdist[report]'"]
