"""Planted label noise with known truth, the label audit (suspects, fixes file, contact sheet),
decisions tuned for macro F1, and the placeholder-answers warning of `score`."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import launch_env

from maskdist.data import folds as folds_api, labels, layout, noise, synth
from maskdist.errors import MaskdistError
from maskdist.infer import audit, contact_sheet, decisions
from maskdist.infer.oof import OofSet
from maskdist.shards import build_shards
from maskdist.shards.manifest import open_shard_set
from maskdist.streams.samples import read_shard

pytestmark = [pytest.mark.xdist_group("audit-noisy"), pytest.mark.duration(20)]
NOISY = dict(people=60, eval_people=4, seed=3, label_noise=0.2)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """60 people, 12 of them with a planted error, and their shards (2 folds, 64 px)."""
    root = tmp_path_factory.mktemp("noisy")
    synth.write_dataset(root / "data", **NOISY)
    build_shards(root / "data" / "train", root / "shards", folds=2, seed=0, age_cut=60, image_size=64, workers=1)
    return root


def _tree_sha(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def test_without_label_noise_synth_writes_the_same_bytes_as_before(tmp_path):
    # pinned from the dataset written before --label-noise existed: the option must not move a byte
    synth.write_dataset(tmp_path / "d", people=8, eval_people=2, seed=1)
    assert _tree_sha(tmp_path / "d") == "678c5b9833639b1c"
    assert not (tmp_path / "d" / noise.NOISE_FILE).exists()


def test_label_noise_plants_each_kind_and_its_truth_restores_the_labels(noisy):
    data = noisy / "data"
    truth = pd.read_csv(data / noise.NOISE_FILE, dtype=str, keep_default_na=False)
    assert len(truth) == 12 and truth["kind"].value_counts().to_dict() == {"gender": 4, "age": 4, "swap": 4}
    meta = json.loads((data / "synth.json").read_text())
    assert meta["label_noise"]["people"] == 12 and meta["label_noise"]["images"] == 4 * 7 + 4 * 7 + 4 * 2
    recorded, _ = layout.read_train(data / "train")
    fixed, _ = layout.read_train(data / "train", fixes=data / noise.NOISE_FILE)
    changed = set(recorded.loc[recorded["label"] != fixed["label"], "person"])
    assert changed == set(truth["person"])  # every planted error changes labels, nothing else does
    for _, row in truth[truth["kind"] == "age"].iterrows():
        assert abs(int(row["age"]) - int(row["recorded"])) >= noise.MIN_AGE_ERROR
        assert labels.age_group(int(row["age"])) != labels.age_group(int(row["recorded"]))
    # the clean copy draws the same pictures: a swapped person's files trade places
    clean = noisy / "clean"
    synth.write_dataset(clean, **(NOISY | {"label_noise": 0.0}))
    swapped = truth.loc[truth["kind"] == "swap", "person"].iloc[0]
    folder = next((clean / "train/images").glob(swapped.split("_")[0] + "_*"))
    for a, b in (("incorrect_mask", "normal"), ("normal", "incorrect_mask")):
        noisy_file = next((data / "train/images" / swapped).glob(a + ".*"))
        assert noisy_file.read_bytes() == next(folder.glob(b + ".*")).read_bytes()
    with pytest.raises(MaskdistError, match="invalid label noise"):
        synth.write_dataset(noisy / "bad", people=8, eval_people=2, label_noise=0.7)


def _simulated_oof(noisy) -> OofSet:
    """OOF probabilities of a model that learnt the true labels well.

    A stand-in for a trained experiment: a model that learns these cues takes minutes of CPU,
    far over the test budget (the audit's figures with real models are in docs/kfold.md).
    The keys, folds and recorded labels are the real ones of the noisy shard set."""
    data = noisy / "data"
    recorded, _ = layout.read_train(data / "train")
    recorded = folds_api.assign_folds(recorded, k=2, seed=0)
    truth, _ = layout.read_train(data / "train", fixes=data / noise.NOISE_FILE)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(truth), labels.NUM_CLASSES))
    logits[np.arange(len(truth)), truth["label"].to_numpy()] += 5.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    keys = (recorded["person"] + "/" + recorded["stem"]).to_numpy()
    order = np.argsort(keys)
    given = recorded["label"].to_numpy()[order]
    return OofSet(keys=keys[order], folds=recorded["fold"].to_numpy()[order], label_true=given, label=given,
                  probs=probs[order][:, None], preds=probs[order].argmax(axis=1)[:, None], experiments=[noisy], runs=[])


def test_audit_ranks_planted_errors_first_and_its_fixes_rebuild_the_true_labels(noisy, tmp_path):
    result = audit.audit(_simulated_oof(noisy), age_cut=60)
    planted = audit.planted(noisy / "data" / noise.NOISE_FILE)
    figures = audit.precision_recall(result, planted)
    # the top 12 of the ranking are the 12 planted errors; the flags (strong evidence only)
    # are all right and hold every swap; an age error one group away stays below the age
    # threshold (an expected distance under 1.25), so about half are flagged
    assert figures["precision_at_planted"] >= 0.9, figures
    assert figures["precision"] == 1.0 and figures["recall"] >= 0.5, figures
    assert figures["kinds"]["swap"]["recall"] == 1.0
    assert list(result.people["rank"]) == list(range(1, len(result.people) + 1))
    assert result.people["evidence"].head(figures["flagged"]).is_monotonic_decreasing

    fixes = tmp_path / "fixes.csv"
    result.fixes().to_csv(fixes, index=False)
    build_shards(noisy / "data" / "train", tmp_path / "fixed", folds=2, seed=0, age_cut=60, image_size=64, workers=1, fixes=fixes)
    shard_set = open_shard_set(tmp_path / "fixed")
    stored = {}
    for shard in shard_set.shards("train", extra=False):
        for sample in read_shard(shard_set, shard):
            stored[sample["__key__"]] = json.loads(sample["json"])["label_true"]
    truth, _ = layout.read_train(noisy / "data" / "train", fixes=noisy / "data" / noise.NOISE_FILE)
    recorded, _ = layout.read_train(noisy / "data" / "train")
    fixed_people = set(result.flagged["person"])
    assert fixed_people and fixed_people <= {p for p, _k in planted}
    for table, people in ((truth, fixed_people), (recorded, set(recorded["person"]) - fixed_people)):
        rows = table[table["person"].isin(people)]
        assert [stored[k] for k in rows["person"] + "/" + rows["stem"]] == list(rows["label"])  # fixed, or untouched


def test_the_contact_sheet_shows_the_suspects_photos(noisy, tmp_path):
    result = audit.audit(_simulated_oof(noisy), age_cut=60)
    shard_set = open_shard_set(noisy / "shards")
    path, photos = contact_sheet.contact_sheet(result.flagged, result.rows, shard_set, 60, tmp_path / "sheet.png", people=5)
    chosen = result.flagged.drop_duplicates("person").head(5)
    assert photos == 5 * len(labels.STEMS)
    sheet = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert (sheet.shape[1], sheet.shape[0]) == contact_sheet.sheet_size(5)
    stored = contact_sheet.read_photos(shard_set, [f"{p}/{s}" for p in chosen["person"] for s in labels.STEMS], chosen["fold"])
    for row, person in enumerate(chosen["person"]):
        for col, stem in enumerate(labels.STEMS):
            top, left, bottom, right = contact_sheet.tile_box(row, col)
            assert np.array_equal(sheet[top:bottom, left:right], contact_sheet.tile_image(stored[f"{person}/{stem}"]))
        caption = sheet[bottom:bottom + contact_sheet.CAPTION, :]
        assert (caption < 128).any()  # the labels are written under the tiles


def test_tuned_decisions_help_a_timid_rare_class_and_the_nested_figure_is_per_fold():
    rng = np.random.default_rng(1)
    n = 3000
    y = rng.choice(labels.NUM_CLASSES, size=n, p=np.r_[np.full(17, 0.98 / 17), 0.02])
    logits = rng.normal(size=(n, labels.NUM_CLASSES))
    logits[np.arange(n), y] += 2.0
    logits[:, 17] -= 1.5  # the model is timid on the rare class
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    w = decisions.tune_class_weights(probs, y)
    before, after = decisions.macro_f1(y, probs.argmax(axis=1)), decisions.macro_f1(y, decisions.decide(probs, w))
    assert after > before + 0.01 and w[17] == w.max()
    assert np.allclose(decisions.tune_class_weights(probs, y), w)  # deterministic
    folds = np.arange(n) % 3
    nested = decisions.nested(probs[:, None], y, folds)
    assert set(nested["folds"]) == {0, 1, 2} and nested["gain"] > 0
    held = folds == 1  # fold 1's figure: tuned on folds 0 and 2 only
    tuned = decisions.tune(probs[~held][:, None], y[~held])
    assert nested["folds"][1]["tuned"] == pytest.approx(decisions.macro_f1(y[held], tuned.predict(probs[held][:, None])))
    # two experiments: the weights move toward the one that knows the labels
    noise_only = rng.dirichlet(np.ones(labels.NUM_CLASSES), size=n)
    both = np.stack([noise_only, probs], axis=1)
    assert decisions.tune_experiment_weights(both, y)[1] > 0.5


def test_score_warns_when_the_answers_look_like_placeholders(small_synth, tmp_path):
    info = small_synth / "eval" / "info.csv"  # ans all 0 before prediction
    result = subprocess.run([sys.executable, "-m", "maskdist", "score", str(small_synth / "eval_answers.csv"), str(info)],
                            env=launch_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "macro F1" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "placeholders" in line]
    assert len(warnings) == 1 and str(info) in warnings[0]
    real = subprocess.run([sys.executable, "-m", "maskdist", "score", str(info), str(small_synth / "eval_answers.csv")],
                          env=launch_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert "placeholders" not in real.stderr


def test_stale_decisions_are_passed_over_by_default_and_refused_when_named(tmp_path):
    from maskdist.infer.members import FoldRun

    for k in range(2):  # what the decisions are keyed by: each fold's best weights and OOF rows, as real files
        (tmp_path / f"fold{k}").mkdir()
        (tmp_path / f"fold{k}" / "best.safetensors").write_bytes(b"weights %d" % k)
        (tmp_path / f"fold{k}" / "oof.csv").write_text(f"key\nrow{k}\n")

    def runs(epoch=3):
        return [FoldRun(tmp_path / f"fold{k}", {"fold": k, "epoch": epoch, "metrics": {"macro_f1": 0.5}}, tmp_path) for k in range(2)]

    tuned = decisions.Tuned(np.ones(1), np.linspace(0.5, 2.0, labels.NUM_CLASSES))
    path = decisions.default_path([tmp_path])
    path.write_text(json.dumps(decisions.record(path, runs(), [tmp_path], tuned, {}, {}, [])))
    fresh = decisions.resolve("tuned", runs(), [tmp_path])
    assert fresh.name == str(path) and np.allclose(fresh.class_weights, tuned.class_weights)
    (tmp_path / "fold1" / "best.safetensors").write_bytes(b"weights retrained")  # the same best epoch, other weights
    stale = decisions.resolve("tuned", runs(), [tmp_path])
    assert stale.name == "argmax" and stale.class_weights is None and "re-run maskdist oof" in stale.note
    assert "(fold1: retrained" in stale.note  # fold 1 named, fold 0 not
    with pytest.raises(MaskdistError, match="tuned on other fold models"):
        decisions.resolve(str(path), runs(), [tmp_path])
    assert decisions.resolve("argmax", runs(), [tmp_path]).class_weights is None
