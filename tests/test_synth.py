"""maskdist.data.synth writes the competition layout, its statistics and quirks, deterministically."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from maskdist.data import labels as L, synth
from maskdist.errors import MaskdistError

SMALL = dict(people=60, eval_people=30, external=10, seed=3)


# The module's tests share expensive module fixtures: one unit for the scheduler.
pytestmark = [pytest.mark.xdist_group("synth-small"), pytest.mark.duration(40)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One small dataset written with two workers, shared by the layout tests."""
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synth.write_dataset(out, workers=2, **SMALL)
    return out, summary


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def _real_images(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def test_layout(small):
    out, summary = small
    header, rows = _read_csv(out / "train/train.csv")
    assert header == ["id", "gender", "race", "age", "path"]
    assert len(rows) == 60 == summary.train_people
    folders = {p.name for p in (out / "train/images").iterdir() if not p.name.startswith(".")}
    assert folders == {r["path"] for r in rows}
    exts = set()
    for r in rows:
        assert r["race"] == "Asian" and r["gender"] in ("male", "female")
        assert r["path"] == f"{r['id']}_{r['gender']}_Asian_{r['age']}"
        assert 18 <= int(r["age"]) <= 60
        files = _real_images(out / "train/images" / r["path"])
        assert sorted(p.stem for p in files) == sorted(L.STEMS)
        exts |= {p.suffix for p in files}
    assert exts == {".jpg", ".png", ".jpeg"}
    # a person with mixed extensions exists
    assert any(len({p.suffix for p in _real_images(out / "train/images" / r["path"])}) > 1 for r in rows)
    # every image decodes to 512 x 384 x 3 (a sample of train, all of eval checked by count below)
    sample = [p for r in rows[:10] for p in _real_images(out / "train/images" / r["path"])]
    for p in sample:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert img is not None and img.shape == (512, 384, 3), p


def test_junk_and_hidden_folders(small):
    out, _ = small
    train_junk = list((out / "train/images").glob("*/._*.jpg"))
    eval_junk = list((out / "eval/images").glob("._*.jpg"))
    assert train_junk and eval_junk
    for p in train_junk + eval_junk:
        assert cv2.imread(str(p)) is None  # garbage, not an image
        real = p.with_name(p.name[2:])
        assert any(real.with_suffix(s).exists() for s in (".jpg", ".png", ".jpeg"))
    for split in ("train", "eval"):
        hidden = out / split / "images/.ipynb_checkpoints"
        assert hidden.is_dir() and any(hidden.iterdir())


def test_eval_and_external(small):
    out, summary = small
    header, info = _read_csv(out / "eval/info.csv")
    assert header == ["ImageID", "ans"]
    assert all(r["ans"] == "0" for r in info)
    files = _real_images(out / "eval/images")
    assert len(info) == len(files) == 30 * 7 == summary.eval_images
    assert {r["ImageID"] for r in info} == {p.name for p in files}
    assert all(re.fullmatch(r"[0-9a-f]{40}\.jpg", r["ImageID"]) for r in info)
    img = cv2.imread(str(files[0]))
    assert img.shape == (512, 384, 3)
    # answers live outside eval/, same rows and order, real labels
    assert not list((out / "eval").rglob("*answers*"))
    _, answers = _read_csv(out / "eval_answers.csv")
    assert [r["ImageID"] for r in answers] == [r["ImageID"] for r in info]
    labels = np.array([int(r["ans"]) for r in answers])
    assert labels.min() >= 0 and labels.max() < 18 and len(set(labels)) > 4
    assert np.bincount(labels, minlength=18).tolist() == summary.eval_class_counts
    # external: age in the file name, no labels inside, answers outside agree with the name
    ext = sorted((out / "external").iterdir())
    assert len(ext) == 10 == summary.external_images
    assert all(re.fullmatch(r"\d{6}_\d+\.jpg", p.name) for p in ext)
    header, ext_rows = _read_csv(out / "external_answers.csv")
    assert header == ["file", "ans", "mask", "gender", "age"]
    assert sorted(r["file"] for r in ext_rows) == [p.name for p in ext]
    for r in ext_rows:
        assert int(r["age"]) == int(r["file"].split("_")[1].split(".")[0])
        assert int(r["ans"]) == L.label_of(int(r["mask"]), int(r["gender"]), int(r["age"]))
    assert cv2.imread(str(ext[0])) is not None


def test_counts_match_train_csv_and_requested_statistics(small):
    out, summary = small
    meta = json.loads((out / "synth.json").read_text())
    _, rows = _read_csv(out / "train/train.csv")
    recount = [0] * 18
    cells: dict = {}
    for r in rows:
        gender = L.parse_gender(r["gender"])
        group = L.age_group(int(r["age"]))
        cells[(gender, group)] = cells.get((gender, group), 0) + 1
        for mask in L.STEM_TO_MASK.values():
            recount[L.encode(mask, gender, group)] += 1
    assert recount == summary.class_counts == meta["train_class_counts"]
    assert sum(recount) == 420 == summary.train_images
    # cells follow the competition proportions within rounding, all cells present
    default = synth.default_person_counts()
    whole = sum(default.values())
    for key, n in default.items():
        assert cells.get(key, 0) >= 1
        assert abs(cells.get(key, 0) - n * 60 / whole) < 1.0 + 1e-9, key
    assert cells == synth.scaled_person_counts(60)
    # eval counts: 30 people in the same proportions
    assert sum(synth.scaled_person_counts(30).values()) == 30


def test_person_counts_helpers():
    default = synth.default_person_counts()
    assert sum(default.values()) == 2700 and default[(1, 1)] == 817 and default[(0, 2)] == 83
    assert synth.scaled_person_counts(2700) == default
    # the competition's per-class image counts (DATA.md)
    counts = synth.expected_class_counts(default)
    assert counts[:6] == [2745, 2050, 415, 3660, 4085, 545]
    assert counts[6:12] == counts[12:] == [549, 410, 83, 732, 817, 109]
    for n in (6, 7, 13, 100, 999):
        scaled = synth.scaled_person_counts(n)
        assert sum(scaled.values()) == n and min(scaled.values()) >= 1
    scaled = synth.scaled_person_counts(270)
    assert all(abs(scaled[k] - v / 10) < 1 for k, v in default.items())
    assert synth.scaled_person_counts(5400) == {k: 2 * v for k, v in default.items()}


def test_quirks_planted(small):
    out, _ = small
    _, rows = _read_csv(out / "train/train.csv")
    meta = json.loads((out / "synth.json").read_text())
    ids = [r["id"] for r in rows]
    dup = [i for i in set(ids) if ids.count(i) == 2]
    assert dup == [meta["quirks"]["duplicate_id"]]
    paths = [r["path"] for r in rows if r["id"] == dup[0]]
    assert len(set(paths)) == 2
    suffixed = [i for i in ids if re.fullmatch(r"\d{6}-1", i)]
    assert len(suffixed) >= 2 and sorted(suffixed) == sorted(meta["quirks"]["suffixed_ids"])
    assert all(re.fullmatch(r"\d{6}(-1)?", i) for i in ids)


def test_deterministic_across_workers_and_seeds(small, tmp_path):
    out2, _ = small
    out1 = tmp_path / "one"
    synth.write_dataset(out1, workers=1, **SMALL)
    assert (out1 / "train/train.csv").read_bytes() == (out2 / "train/train.csv").read_bytes()
    assert (out1 / "eval/info.csv").read_bytes() == (out2 / "eval/info.csv").read_bytes()
    assert (out1 / "synth.json").read_bytes() == (out2 / "synth.json").read_bytes()
    files = sorted(p.relative_to(out1) for p in out1.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    for rel in files[:: max(1, len(files) // 40)]:
        assert (out1 / rel).read_bytes() == (out2 / rel).read_bytes(), rel
    other = tmp_path / "other"
    synth.write_dataset(other, people=60, eval_people=30, external=10, seed=4)
    assert (other / "train/train.csv").read_bytes() != (out1 / "train/train.csv").read_bytes()
    a = next((out1 / "eval/images").glob("[0-9a-f]*.jpg"))
    assert not (other / "eval/images" / a.name).exists()


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "data"
    synth.write_dataset(out, people=8, eval_people=2)
    marker = out / "train/train.csv"
    before = marker.read_bytes()
    with pytest.raises(MaskdistError, match="exists; pass --overwrite"):
        synth.write_dataset(out, people=8, eval_people=2, seed=1)
    assert marker.read_bytes() == before
    synth.write_dataset(out, people=8, eval_people=2, seed=1, overwrite=True)
    assert marker.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no partial or old folders left


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    # A writer that fails after a few people simulates the run being killed midway.
    real = synth._write_person
    calls = {"n": 0}

    def dying(job, seed, root):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated kill")
        return real(job, seed, root)

    monkeypatch.setattr(synth, "_write_person", dying)
    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        synth.write_dataset(out, people=20, eval_people=5, workers=1)
    assert calls["n"] == 6
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(MaskdistError):
        synth.write_dataset(tmp_path / "a", people=10, scale=0.1)
    with pytest.raises(MaskdistError):
        synth.write_dataset(tmp_path / "b", people=0)
    with pytest.raises(MaskdistError):
        synth.write_dataset(tmp_path / "c", people=10, workers=0)
    assert list(tmp_path.iterdir()) == []


def test_scale_and_default_eval_people(tmp_path):
    summary = synth.write_dataset(tmp_path / "s", scale=0.01)
    assert summary.train_people == 27 and summary.eval_people == 18
    assert summary.train_images == 27 * 7 and summary.eval_images == 18 * 7
    text = summary.describe()
    assert "images/s" in text and "wear/female/<30" in text and len(text.splitlines()) >= 20


def test_draw_face_cues_differ():
    """The mask part changes the picture; the same person is the same across photos."""
    traits = synth.make_traits(np.random.default_rng([0, 0, 1]), 1, 45)
    imgs = {m: synth.draw_face(np.random.default_rng(5), traits, m) for m in (0, 1, 2)}
    for img in imgs.values():
        assert img.shape == (512, 384, 3) and img.dtype == np.uint8
    assert np.abs(imgs[0].astype(int) - imgs[1].astype(int)).mean() > 1.0
    assert np.abs(imgs[1].astype(int) - imgs[2].astype(int)).mean() > 1.0
    again = synth.draw_face(np.random.default_rng(5), traits, 0)
    assert np.array_equal(again, imgs[0])
