"""The lines users read say what was done, in words and counts that are right: plurals, eval
folders without people, a class table whose columns line up for every class name, a rate that
is not rounded to 0 for a few photos, the demo's own time and words. Real files and processes."""
from __future__ import annotations

import subprocess
import sys
import time

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REPO

from maskdist import metrics
from maskdist.cli import main
from maskdist.data import labels
from maskdist.infer import scoring
from maskdist.infer.classify import Classified
from maskdist.train.state import FoldStatus


def test_layout_of_an_eval_folder_counts_its_photos_not_people(small_synth):
    result = CliRunner().invoke(main, ["layout", str(small_synth / "train"), "--eval", str(small_synth / "eval")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    eval_line = next(line for line in lines if line.startswith(f"read {small_synth / 'eval'}:"))
    images = len(pd.read_csv(small_synth / "eval" / "info.csv"))
    assert eval_line == f"read {small_synth / 'eval'}: {images} images (eval photos)"
    train_line = next(line for line in lines if line.startswith(f"read {small_synth / 'train'}:"))
    people = len(pd.read_csv(small_synth / "train" / "train.csv"))
    assert train_line.endswith(f": {people} people, {people * 7} images")


def test_counts_take_their_singular():
    assert FoldStatus("finished", epochs=1).describe() == "finished (1 epoch)"
    assert FoldStatus("interrupted", epoch=0, step=3, epochs=1, epoch_done=False).describe() == "interrupted at epoch 0 step 3 of 1 epoch"
    assert FoldStatus("finished", epochs=2).describe() == "finished (2 epochs)"


def test_the_class_table_lines_up_for_the_longest_class_name():
    truth = [c for c in range(labels.NUM_CLASSES) for _ in range(3)]
    table = scoring.describe_scores(metrics.score(truth, truth)).splitlines()
    header = next(line for line in table if line.startswith("class"))
    rows = [line for line in table if line[:2].strip().isdigit() and "/" in line]
    assert len(rows) == labels.NUM_CLASSES and max(len(labels.class_name(c)) for c in range(18)) == 23
    for column in ("F1", "true", "predicted"):  # every value ends where its heading ends
        end = header.index(column) + len(column)
        assert all(row[end - 1] != " " and (len(row) == end or row[end] == " ") for row in rows), (column, header, rows)


def test_classify_rate_of_a_few_photos_is_not_rounded_to_zero():
    done = Classified(rows=pd.DataFrame(columns=["path", "class"]), images=3, seconds=7.5, models=1)
    assert "(0.4 img/s;" in done.describe(None)
    assert "(1200 img/s;" in Classified(rows=pd.DataFrame(columns=["path", "class"]), images=1200, seconds=1.0, models=1).describe(None)


def test_demo_time_counts_the_process_start_up(tmp_path):
    """A demo that reuses every stage still waited for Python and the libraries to load: the
    finishing line counts from the process's start, not from after the imports."""
    code = "import time; time.sleep(1.5); from maskdist.demo import process_seconds; print(process_seconds())"
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300, check=True)
    waited = time.monotonic() - started
    assert 1.5 <= float(out.stdout) <= waited + 0.1


def test_the_demo_says_once_that_it_trains_from_random_weights(small_synth, small_shards, tmp_path, monkeypatch):
    """The demo's folds do not each tell the user to pass an option the demo does not have:
    the demo says once that its preset starts from random weights (offline), and its fold
    launches carry the setting that silences the per-fold warning. The stages before training
    are reused from the session's synthetic set and shards; training itself is not run."""
    from maskdist import demo
    from maskdist.train import kfold
    from maskdist.train.run import RANDOM_INIT_CHOSEN

    work = tmp_path / "demo"
    work.mkdir()
    (work / "data").symlink_to(small_synth)
    (work / "shards").symlink_to(small_shards)
    plans = []

    class Stop(Exception):
        pass

    def no_training(plan, echo):
        plans.append(plan)
        raise Stop

    monkeypatch.setattr(kfold, "run", no_training)
    lines: list[str] = []
    if not (small_synth / "synth.json").is_file():
        pytest.skip("the session's synthetic set has no synth.json")
    with pytest.raises(Stop):
        demo.run_demo(demo.DemoOptions(workdir=work, folds=3, processes=1), echo=lines.append)
    assert plans[0].env == {RANDOM_INIT_CHOSEN: "1"}
    said = "\n".join(lines)
    assert "test_efficientnet from random weights, so nothing is downloaded" in said and "--pretrained" not in said
