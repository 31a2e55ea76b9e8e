"""The k-fold ensemble on real fold models: submission format, 1 vs 2 processes, the
ensemble equals the mean of the folds, OOF F1, pseudo-labels into training folds only."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import EXPERIMENT_FOLDS, EXPERIMENT_TRAIN, accelerate_cmd, launch_env, run_launch

from maskdist import metrics, streams
from maskdist.data import transforms
from maskdist.errors import MaskdistError
from maskdist.infer import scoring
from maskdist.infer.predict import probs_path
from maskdist.shards.manifest import open_shard_set
from maskdist.system.fileio import sha256_file
from maskdist.train import checkpoint

# Every test reads the module's trained experiment: one unit for the scheduler, handed out early.
pytestmark = [pytest.mark.xdist_group("predict-experiment"), pytest.mark.duration(200)]

FOLDS = EXPERIMENT_FOLDS
TRAIN = EXPERIMENT_TRAIN


@pytest.fixture(scope="module")
def experiment(trained_experiment):
    return trained_experiment


def _predict(experiment, small_shards, tmp_path, processes, *extra):
    out = tmp_path / f"sub{processes}.csv"
    result = run_launch(accelerate_cmd(processes, "predict", str(experiment), "--shards", str(small_shards), "--out", str(out),
                                       "--workers", "1", "--batch-size", "8", *extra), tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out


def test_submission_keeps_info_csv_and_two_processes_match_one(experiment, small_shards, small_synth, tmp_path):
    one = _predict(experiment, small_shards, tmp_path, 1)
    two = _predict(experiment, small_shards, tmp_path, 2)
    assert one.read_bytes() == two.read_bytes()
    info = (small_synth / "eval" / "info.csv").read_text().splitlines()
    sub = one.read_text().splitlines()
    assert sub[0] == info[0] == "ImageID,ans"
    assert [line.split(",")[0] for line in sub] == [line.split(",")[0] for line in info]
    answers = [int(line.split(",")[1]) for line in sub[1:]]
    assert all(0 <= a < 18 for a in answers)
    probs = np.load(probs_path(one))
    assert list(probs["image_id"]) == [line.split(",")[0] for line in info[1:]]
    assert (probs["probs"].argmax(axis=1) == answers).all()


def test_ensemble_is_the_mean_of_fold_models(experiment, small_shards, small_synth, tmp_path):
    out = _predict(experiment, small_shards, tmp_path, 1)
    saved = np.load(probs_path(out))
    shard_set = open_shard_set(small_shards)
    direct = []
    for fold in range(FOLDS):
        model, card = checkpoint.load(experiment / f"fold{fold}")
        tf = transforms.build_transform("none", card["image"]["resize"], card["image"]["crop"])
        rows = {}
        with torch.no_grad():
            for batch in streams.eval_loader(shard_set, "eval", batch_size=5, workers=0, transform=tf):
                x = transforms.to_device(batch["image"], "cpu", card["normalisation"]["mean"], card["normalisation"]["std"])
                for row, p in zip(batch["row"].tolist(), torch.softmax(model(x), dim=1).numpy()):
                    rows[row] = p
        direct.append(np.stack([rows[r] for r in range(len(rows))]))
    assert np.allclose(saved["probs"], np.mean(direct, axis=0), atol=1e-5)
    assert np.allclose(saved["fold_probs"], np.stack(direct, axis=1), atol=1e-5)
    # the ensemble-versus-folds report scores exactly these probabilities
    answers = pd.read_csv(small_synth / "eval_answers.csv", dtype=str).set_index("ImageID").loc[saved["image_id"], "ans"].astype(int)
    versus = scoring.ensemble_and_folds(probs_path(out), small_synth / "eval_answers.csv")
    assert versus["ensemble"] == pytest.approx(metrics.score(answers, np.mean(direct, axis=0).argmax(axis=1)).macro_f1)
    assert [versus["folds"][k] for k in range(FOLDS)] == pytest.approx([metrics.score(answers, d.argmax(axis=1)).macro_f1 for d in direct])
    # F1 weights change the mix exactly as the cards' F1 say
    _predict(experiment, small_shards, tmp_path, 1, "--weights", "f1", "--out", str(tmp_path / "w.csv"))
    f1 = np.array([checkpoint.read_card(experiment / f"fold{k}")["metrics"]["macro_f1"] for k in range(FOLDS)])
    w = np.load(probs_path(tmp_path / "w.csv"))
    assert np.allclose(w["weights"], f1 / f1.sum(), atol=1e-6)
    assert np.allclose(w["probs"], np.einsum("nfc,f->nc", np.stack(direct, axis=1), f1 / f1.sum()), atol=1e-5)


def test_oof_f1_is_recomputed_from_the_saved_files(experiment, small_shards):
    result = scoring.oof_scores(experiment)
    frames = [pd.read_csv(experiment / f"fold{k}" / "oof.csv") for k in range(FOLDS)]
    everything = pd.concat(frames)
    assert len(everything) == open_shard_set(small_shards).samples("train", extra=False)
    assert result["oof"].macro_f1 == pytest.approx(metrics.score(everything["label_true"], everything["pred"]).macro_f1)
    for k in range(FOLDS):
        assert result["folds"][k].macro_f1 == pytest.approx(checkpoint.read_card(experiment / f"fold{k}")["metrics"]["macro_f1"])


def test_score_matches_the_answers(experiment, small_shards, small_synth, tmp_path):
    out = _predict(experiment, small_shards, tmp_path, 1)
    answers = pd.read_csv(small_synth / "eval_answers.csv", dtype=str)
    sub = pd.read_csv(out, dtype=str)
    expected = metrics.score(answers["ans"].astype(int), sub.set_index("ImageID").loc[answers["ImageID"], "ans"].astype(int))
    got = subprocess.run([sys.executable, "-m", "maskdist", "score", str(out), str(small_synth / "eval_answers.csv"), "--json"],
                         env=launch_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert json.loads(got.stdout)["macro_f1"] == pytest.approx(expected.macro_f1)


def test_missing_fold_and_mismatched_eval_set_are_refused(experiment, small_shards, small_synth, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(experiment, partial)
    shutil.rmtree(partial / "fold1")
    env = launch_env(tmp_path)
    base = [sys.executable, "-m", "maskdist", "predict"]
    result = subprocess.run(base + [str(partial), "--shards", str(small_shards), "--out", str(tmp_path / "s.csv")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "fold(s) 1 missing of 3" in result.stderr
    assert not (tmp_path / "s.csv").exists()
    info = tmp_path / "info.csv"
    lines = (small_synth / "eval" / "info.csv").read_text().splitlines()
    info.write_text("\n".join(lines[:-2]) + "\n")
    result = subprocess.run(base + [str(experiment), "--shards", str(small_shards), "--info", str(info), "--out", str(tmp_path / "s.csv")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"has {len(lines) - 3} rows but the shard set holds {len(lines) - 1}" in result.stderr
    assert not (tmp_path / "s.csv").exists()


def test_pseudo_labels_go_to_training_folds_only(experiment, small_synth, tmp_path):
    from maskdist.shards import build_shards

    outside = tmp_path / "outside"
    outside.mkdir()
    for i, src in enumerate(sorted((small_synth / "eval" / "images").glob("[0-9a-f]*.jpg"))[:12]):
        shutil.copy(src, outside / f"{i:04d}_{61 + i}.jpg")
    (outside / "broken_70.jpg").write_bytes(b"")
    labels_csv = tmp_path / "pseudo.csv"
    result = subprocess.run([sys.executable, "-m", "maskdist", "pseudo-label", str(experiment), str(outside), "--out", str(labels_csv),
                             "--min-confidence", "0", "--age-from-filename", r"_(\d+)\.", "--workers", "0"],
                            env=launch_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unreadable, skipped: 1" in result.stdout
    table = pd.read_csv(labels_csv)
    assert len(table) == 12 and (table["age"] >= 61).all() and (table["label"] % 3 == 2).all()
    # a threshold above every confidence drops all of them, and says so
    strict = subprocess.run([sys.executable, "-m", "maskdist", "pseudo-label", str(experiment), str(outside), "--out",
                             str(tmp_path / "none.csv"), "--min-confidence", "1.0", "--workers", "0"],
                            env=launch_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert "pseudo-labelled 0 of 13" in strict.stdout and "threshold: 12" in strict.stdout

    plain, with_extra = tmp_path / "plain", tmp_path / "extra"
    build_shards(small_synth / "train", plain, folds=FOLDS, image_size=64)
    build_shards(small_synth / "train", with_extra, folds=FOLDS, image_size=64, extra=[labels_csv])
    a = json.loads((plain / "manifest.json").read_text())["totals"]["train"]
    b = json.loads((with_extra / "manifest.json").read_text())["totals"]["train"]
    for fold in range(FOLDS):
        assert a[str(fold)] == b[str(fold)], "a validation fold gained samples"
    assert sum(b["extra"]) == 12
    extra_shards = [s for s in json.loads((with_extra / "manifest.json").read_text())["shards"] if s["fold"] == -1]
    assert extra_shards and all(s["path"].startswith("train/extra/") for s in extra_shards)
    assert open_shard_set(with_extra).samples("train", [0], extra=False) == open_shard_set(plain).samples("train", [0], extra=False)


def test_pseudo_label_part_thresholds_keep_what_each_part_is_sure_of(experiment, small_synth, tmp_path):
    from maskdist.infer.ensemble import folder_loader, load_ensemble, mix, vote

    outside = tmp_path / "outside"
    outside.mkdir()
    for i, src in enumerate(sorted((small_synth / "eval" / "images").glob("[0-9a-f]*.jpg"))[:12]):
        shutil.copy(src, outside / f"{i:04d}.jpg")
    keys = [str(p) for p in sorted(outside.iterdir())]
    ensemble = load_ensemble([experiment])
    votes = vote(ensemble, lambda group: folder_loader(keys, keys, group.transform(), 8, 0, 1, 0), "cpu")
    gender = []  # P(gender = the chosen gender), the chosen class being the most probable one
    for key in keys:
        cube = mix(ensemble, votes.probs[key][None])[0].reshape(3, 2, 3)
        g = np.unravel_index(cube.argmax(), cube.shape)[1]
        gender.append(float(cube.sum(axis=(0, 2))[g]))
    threshold = float(np.median(gender))
    expected = sum(g >= threshold for g in gender)
    assert 0 < expected < 12
    out = tmp_path / "parts.csv"
    result = subprocess.run([sys.executable, "-m", "maskdist", "pseudo-label", str(experiment), str(outside), "--out", str(out),
                             "--min-confidence", "0", "--part-confidence", f"gender={threshold}", "--workers", "0"],
                            env=launch_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"pseudo-labelled {expected} of 12" in result.stdout
    assert f"below the gender threshold: {12 - expected}" in result.stdout
    assert len(pd.read_csv(out)) == expected
    bad = subprocess.run([sys.executable, "-m", "maskdist", "pseudo-label", str(experiment), str(outside), "--out",
                          str(tmp_path / "x.csv"), "--part-confidence", "nose=0.5"], env=launch_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "for parts mask, gender, age" in bad.stderr


# --- decisions, mixed ensembles, unfinished folds, precision, audit -------------------------


def _maskdist(tmp_path, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maskdist", *map(str, args)], env=launch_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path)


def _answers(csv) -> list[int]:
    return pd.read_csv(csv)["ans"].tolist()


def test_tuned_decisions_are_applied_by_default_and_argmax_restores_the_plain_answers(experiment, small_shards, tmp_path):
    from maskdist.infer import oof, predict as predict_api
    from maskdist.infer.decisions import FILE, decide

    plain = tmp_path / "plain.csv"
    predict_api.predict([experiment], plain, shards=str(small_shards), workers=0, batch_size=8)
    tuned_exp = tmp_path / "tuned"
    shutil.copytree(experiment, tuned_exp)
    # --force: three training steps per fold give weights whose nested gain may well be negative
    tuned = _maskdist(tmp_path, "oof", tuned_exp, "--tune", "--force", "--json")
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    record = json.loads(tuned.stdout)["decisions"]
    assert (tuned_exp / FILE).is_file() and json.loads((tuned_exp / FILE).read_text())["class_weights"] == record["class_weights"]
    assert set(record["nested"]["folds"]) == {str(k) for k in range(FOLDS)} and record["oof"]["rows"] > 0
    assert record["oof"]["tuned"] >= record["oof"]["argmax"]  # in-sample, tuning cannot lose

    default = _maskdist(tmp_path, "predict", tuned_exp, "--shards", small_shards, "--out", tmp_path / "d.csv", "--workers", "0",
                       "--batch-size", "8")
    assert default.returncode == 0, default.stderr[-2000:]
    saved = np.load(probs_path(tmp_path / "d.csv"))
    weights = np.array(record["class_weights"], dtype=np.float32)
    assert str(saved["decisions"]) == str(tuned_exp / FILE) and np.allclose(saved["class_weights"], weights)
    assert _answers(tmp_path / "d.csv") == decide(saved["probs"], weights).tolist()
    assert _answers(tmp_path / "d.csv") != _answers(plain)  # the decisions change the submission
    used = json.loads((tmp_path / "d.predict.json").read_text())
    assert used["decisions"] == str(tuned_exp / FILE)
    assert [m["weights_sha256"] for m in used["members"]] == [sha256_file(tuned_exp / f"fold{k}" / checkpoint.WEIGHTS) for k in range(FOLDS)]
    predict_api.predict([tuned_exp], tmp_path / "a.csv", shards=str(small_shards), workers=0, batch_size=8, decisions="argmax")
    assert (tmp_path / "a.csv").read_bytes() == plain.read_bytes()
    assert str(np.load(probs_path(tmp_path / "a.csv"))["decisions"]) == "argmax"

    # two experiments (here the same models under another name) tune their weights together,
    # into a file of their own that predict finds for exactly that pair
    twin = tmp_path / "twin"
    shutil.copytree(experiment, twin)
    pair_record = oof.tune_decisions([tuned_exp, twin], force=True)
    assert pair_record["path"] == str(tuned_exp / "decisions-with-twin.json") and len(pair_record["experiment_weights"]) == 2
    predict_api.predict([tuned_exp, twin], tmp_path / "b.csv", shards=str(small_shards), workers=0)
    used = json.loads((tmp_path / "b.predict.json").read_text())
    assert used["decisions"] == pair_record["path"] and used["experiment_weights"] == pytest.approx(pair_record["experiment_weights"])


def test_decisions_are_keyed_by_the_folds_weights_and_a_replanned_fold_is_named(experiment, small_shards, tmp_path):
    """A fold retrained at the same best epoch (another seed, --replan) makes tuned decisions
    stale: found by default they give way to the argmax with a note, named they are refused;
    and oof and predict say that the experiment's folds now mix two plans."""
    from maskdist.infer.decisions import FILE

    exp = tmp_path / "exp"
    shutil.copytree(experiment, exp)
    assert _maskdist(tmp_path, "oof", exp, "--tune", "--force").returncode == 0
    tuned_on = json.loads((exp / FILE).read_text())["members"]
    assert {m["fold"] for m in tuned_on} == set(range(FOLDS)) and all(len(m["weights_sha256"]) == 64 for m in tuned_on)
    epoch_before = checkpoint.read_card(exp / "fold2")["epoch"]
    retrained = _maskdist(tmp_path, "train", "--shards", small_shards, "--fold", "2", "--out", exp, *TRAIN, "--seed", "1",
                          "--overwrite", "--replan", timeout=300)
    assert retrained.returncode == 0, retrained.stderr[-2000:]
    assert checkpoint.read_card(exp / "fold2")["epoch"] == epoch_before  # the old check (the epoch) cannot see it

    args = ("predict", exp, "--shards", small_shards, "--workers", "0", "--batch-size", "16")
    default = _maskdist(tmp_path, *args, "--out", tmp_path / "d.csv")
    assert default.returncode == 0, default.stderr[-2000:]
    assert f"note: {exp / FILE} was tuned on other fold models than these (fold2: retrained, resumed or replaced" in default.stderr
    assert "deciding by argmax" in default.stderr
    assert str(np.load(probs_path(tmp_path / "d.csv"))["decisions"]) == "argmax"
    mixed = (f"note: {exp}: its folds were trained under 2 different plans: against the plan {exp / 'experiment.yaml'},"
             " fold 0 (--seed 1 -> 0); fold 1 (--seed 1 -> 0)")
    assert mixed in default.stderr
    named = _maskdist(tmp_path, *args, "--out", tmp_path / "n.csv", "--decisions", exp / FILE)
    assert named.returncode != 0 and not (tmp_path / "n.csv").exists()
    assert "(fold2: retrained, resumed or replaced" in named.stderr and "Traceback" not in named.stderr
    scores = _maskdist(tmp_path, "oof", exp)
    assert scores.returncode == 0 and mixed in scores.stderr
    assert json.loads(_maskdist(tmp_path, "oof", exp, "--json").stdout)["mixed_plans"][0].startswith(mixed.removeprefix("note: "))
    # the advice works: fold 0 and 1 retrained under the plan, the experiment is one plan again
    for fold in (0, 1):
        again = _maskdist(tmp_path, "train", "--config", exp / "experiment.yaml", "--fold", fold, "--overwrite", "--shards", small_shards,
                          "--out", exp, "--max-steps", "3", timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(_maskdist(tmp_path, "oof", exp, "--json").stdout)["mixed_plans"] == []


def test_mixed_models_each_see_their_own_input_and_vote_as_the_mean_of_their_own_predictions(experiment, small_shards, tmp_path):
    from maskdist.infer import predict as predict_api

    other = tmp_path / "resnet"  # part heads, another normalisation (0.5) and another input size
    trained = _maskdist(tmp_path, "train", "--shards", small_shards, "--fold", "0", "--out", other, "--model", "test_resnet",
                        "--heads", "parts", "--resize", "64", "--crop", "56", "--batch-size", "16", "--workers", "0",
                        "--epochs", "1", "--max-steps", "3", timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    alone = {}
    for name, sources in (("efficientnet", [experiment]), ("resnet", [other / "fold0"]), ("both", [experiment, other / "fold0"])):
        predict_api.predict(sources, tmp_path / f"{name}.csv", shards=str(small_shards), workers=0, batch_size=8)
        alone[name] = np.load(probs_path(tmp_path / f"{name}.csv"))
    record = json.loads((tmp_path / "both.predict.json").read_text())
    assert [(g["resize"], g["crop"]) for g in record["input_groups"]] == [(64, 48), (64, 56)]
    assert {m["heads"] for m in record["members"]} == {"single", "parts"} and record["experiment_weights"] == [0.5, 0.5]
    assert not np.allclose(alone["efficientnet"]["probs"], alone["resnet"]["probs"], atol=1e-3)
    assert np.allclose(alone["both"]["probs"], (alone["efficientnet"]["probs"] + alone["resnet"]["probs"]) / 2, atol=1e-5)
    assert np.allclose(alone["both"]["fold_probs"][:, FOLDS], alone["resnet"]["probs"], atol=1e-5)


def test_an_interrupted_fold_is_refused_by_predict_and_oof_and_recorded_when_allowed(experiment, small_shards, tmp_path):
    from maskdist.infer import predict as predict_api, scoring
    from maskdist.train.preemption import PREEMPTED_EXIT

    cut = tmp_path / "cut"
    shutil.copytree(experiment, cut)
    shutil.rmtree(cut / "fold1")
    # a real interruption: SIGTERM once epoch 0's best model is saved, two epochs before the end
    proc = subprocess.Popen([sys.executable, "-m", "maskdist", "train", "--shards", str(small_shards), "--fold", "1", "--out",
                             str(cut), *TRAIN[:-4], "--epochs", "3", "--batch-size", "4", "--max-steps", "40", "--replan"],
                            env=launch_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    model_json = cut / "fold1" / checkpoint.MODEL_JSON
    deadline = 120
    while not model_json.exists() and deadline > 0 and proc.poll() is None:
        subprocess.run(["sleep", "0.05"])
        deadline -= 0.05
    proc.send_signal(15)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED_EXIT, output[-2000:]

    refused = _maskdist(tmp_path, "predict", cut, "--shards", small_shards, "--out", tmp_path / "s.csv")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "fold 1): interrupted" in refused.stderr and "--allow-unfinished" in refused.stderr
    assert not (tmp_path / "s.csv").exists()
    with pytest.raises(MaskdistError, match=r"fold 1\): interrupted (at|after) epoch"):
        scoring.oof_scores(cut)
    summary = predict_api.predict([cut], tmp_path / "s.csv", shards=str(small_shards), workers=0, allow_unfinished=True)
    assert len(summary["unfinished"]) == 1 and summary["unfinished"][0].startswith("cut/fold1: interrupted")
    assert list(np.load(probs_path(tmp_path / "s.csv"))["unfinished"]) == summary["unfinished"]
    members = json.loads((tmp_path / "s.predict.json").read_text())["members"]
    assert [m["finished"] for m in members] == [True, False, True]
    assert scoring.oof_scores(cut, allow_unfinished=True)["unfinished"] == summary["unfinished"]


def test_predict_takes_its_precision_from_the_folds_config(experiment, small_shards, tmp_path):
    import yaml

    from maskdist.infer.predict import resolve_precision

    runs = tmp_path / "bf16"
    shutil.copytree(experiment, runs)
    for fold in range(FOLDS):
        config = runs / f"fold{fold}" / checkpoint.CONFIG
        config.write_text(yaml.safe_dump(yaml.safe_load(config.read_text()) | {"precision": "bf16"}))
    assert resolve_precision("auto", [runs]) == ("bf16", "")
    assert resolve_precision("no", [runs]) == ("no", "")  # an explicit value wins
    mixed_precision, note = resolve_precision("auto", [runs, experiment / "fold0"])
    assert mixed_precision == "no" and "bf16" in note and "pass --precision" in note
    done = _maskdist(tmp_path, "predict", runs, "--shards", small_shards, "--out", tmp_path / "p.csv", "--workers", "0")
    assert done.returncode == 0 and "(bf16 mixed precision," in done.stdout, done.stderr[-2000:]
    assert json.loads((tmp_path / "p.predict.json").read_text())["precision"] == "bf16"


def test_audit_of_weak_models_judges_no_part_and_writes_no_fixes(experiment, tmp_path):
    # the module's folds trained 3 steps: no part's OOF F1 is near the floor, so even with
    # --min-evidence lowered nothing may be flagged, and an earlier fixes file must go
    import cv2

    from maskdist.infer import audit as audit_api, contact_sheet

    out = tmp_path / "audit"
    out.mkdir()
    (out / "fixes.csv").write_text("person,gender,age,swap_incorrect_normal\nx,female,,\n")
    done = _maskdist(tmp_path, "audit", experiment, "--out", out, "--people", "3", "--min-evidence", "gender=0.4,age=0.5,swap=0.4")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "audit.json").read_text())
    assert set(summary["too_weak"]) == {"gender", "age", "swap"} and summary["fixes"] is None
    for kind, part in audit_api.PART_OF.items():
        f1 = summary["part_f1"][part]
        assert f1 < audit_api.MIN_PART_F1[part]
        line = (f"  {kind} suspicions not judged: the models' OOF {part} F1 is {f1:.3f}, under the floor"
                f" {audit_api.MIN_PART_F1[part]:.2f} where the evidence means something; train stronger models")
        assert done.stdout.splitlines().count(line) == 1, done.stdout
    assert "no fixes.csv: no part of the models is strong enough to judge" in done.stdout
    assert "accept them" not in done.stdout and not (out / "fixes.csv").exists()
    suspects = pd.read_csv(out / "suspects.csv")  # the candidates stay ranked, none flagged
    assert len(suspects) >= 2 * summary["people"] and list(suspects["rank"]) == list(range(1, len(suspects) + 1))
    assert not suspects["flagged"].any() and suspects["given"].isin(["<30", "30-old", "old"]).any()
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert (sheet.shape[1], sheet.shape[0]) == contact_sheet.sheet_size(summary["sheet"]["people"]) and summary["sheet"]["photos"] > 0


def test_audit_judges_the_parts_the_models_know_and_its_fixes_apply(experiment, small_synth, tmp_path):
    # Constructed OOF files over the real experiment (a model with strong gender and age
    # parts takes minutes of CPU to train): gender and age follow the labels, the mask part
    # is a coin toss, and one person's seven photos all look the other gender.
    from maskdist.data import labels, layout
    from maskdist.infer import audit as audit_api
    from maskdist.infer.oof import PROB_COLUMNS

    strong = tmp_path / "strong"
    shutil.copytree(experiment, strong)
    rng = np.random.default_rng(0)
    oofs = sorted(strong.glob("fold*/oof.csv"))
    target = pd.read_csv(oofs[0])["key"].iloc[0].split("/")[0]
    for path in oofs:
        frame = pd.read_csv(path)
        label = frame["label"].to_numpy()
        mask, gender, group = label // 6, (label // 3) % 2, label % 3
        gender = np.where(frame["key"].str.startswith(target + "/"), 1 - gender, gender)
        mask = rng.integers(0, 3, len(frame))
        logits = rng.normal(scale=0.3, size=(len(frame), labels.NUM_CLASSES))
        logits[np.arange(len(frame)), mask * 6 + gender * 3 + group] += 6.0
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        frame[PROB_COLUMNS] = probs
        frame["pred"] = probs.argmax(axis=1)
        frame.to_csv(path, index=False)
    out = tmp_path / "audit"
    done = _maskdist(tmp_path, "audit", strong, "--out", out, "--people", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "audit.json").read_text())
    assert set(summary["too_weak"]) == {"swap"} and summary["part_f1"]["gender"] >= audit_api.MIN_PART_F1["gender"]
    assert f"  swap suspicions not judged: the models' OOF mask F1 is {summary['part_f1']['mask']:.3f}" in done.stdout
    assert "gender suspicions not judged" not in done.stdout and "age suspicions not judged" not in done.stdout
    fixes = pd.read_csv(out / "fixes.csv", dtype=str, keep_default_na=False)
    assert list(fixes["person"]) == [target] and (fixes["swap_incorrect_normal"] == "").all()
    assert "accept them: shards build ... --fixes " + str(out / "fixes.csv") in done.stdout
    table, report = layout.read_train(small_synth / "train", fixes=out / "fixes.csv")  # the format --fixes reads
    assert len(report.by_kind().get("fix-applied", [])) == summary["fixes"] == 1


# --- classify: photos outside the competition layout ----------------------------------------


def test_classify_names_and_counts_unreadable_files_and_agrees_with_predict(experiment, small_synth, tmp_path):
    from maskdist.infer import predict as predict_api

    photos = tmp_path / "photos"
    shutil.copytree(small_synth / "eval" / "images", photos / "nested")  # a folder is searched recursively
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    table = tmp_path / "classified.csv"
    result = _maskdist(tmp_path, "classify", experiment, photos, "--out", table, "--workers", "0", "--batch-size", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"unreadable, skipped: {photos / 'broken.jpg'}" in result.stderr and "1 unreadable file(s) skipped" in result.stderr
    assert "classify:" not in result.stderr  # no progress bar off a terminal
    rows = pd.read_csv(table)
    assert list(rows.columns) == ["path", "class", "mask", "gender", "age", "probability", "note"]
    assert str(photos / "broken.jpg") not in set(rows["path"])
    assert rows["probability"].between(0, 1).all() and set(rows["mask"]) <= {"wear", "incorrect", "not_worn"}

    predict_api.predict([experiment], tmp_path / "sub.csv", eval_dir=small_synth / "eval", workers=0, batch_size=8)
    submission = pd.read_csv(tmp_path / "sub.csv", dtype={"ImageID": str})
    classified = dict(zip(rows["path"].map(lambda p: p.rsplit("/", 1)[-1]), rows["class"]))
    assert len(classified) == len(submission) > 0
    assert [classified[i] for i in submission["ImageID"]] == submission["ans"].tolist()


# --- export: timm's hub layout, and the ensemble as one ONNX graph ------------------------------


def _eval_batch(small_synth, resize: int, crop: int, n: int = 16) -> np.ndarray:
    """uint8 NHWC: eval photos as the models take them (resized, centre-cropped)."""
    from maskdist.data.images import decode_rgb

    transform = transforms.build_transform("none", resize, crop)
    paths = sorted((small_synth / "eval" / "images").glob("[0-9a-f]*.jpg"))[:n]
    return np.stack([transform(decode_rgb(p.read_bytes())).transpose(1, 2, 0) for p in paths])


def test_timm_export_loads_back_to_identical_logits(experiment, small_synth, tmp_path):
    import timm

    from maskdist.infer import export

    folders = export.export_timm([experiment], tmp_path / "timm")
    assert [f.name for f in folders] == [f"fold{k}" for k in range(FOLDS)]
    model, card = checkpoint.load(experiment / "fold0")
    config = json.loads((folders[0] / "config.json").read_text())
    assert config["label_names"] == card["classes"] and config["num_classes"] == 18
    assert config["pretrained_cfg"]["input_size"] == [3, card["image"]["crop"], card["image"]["crop"]]
    loaded = timm.create_model(f"local-dir:{folders[0]}", pretrained=True).eval()
    x = transforms.to_device(torch.from_numpy(_eval_batch(small_synth, 64, 48, 4)).permute(0, 3, 1, 2), "cpu",
                             card["normalisation"]["mean"], card["normalisation"]["std"])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # part heads fold into one 18-way head whose softmax is the product of the part probabilities
    from types import SimpleNamespace

    from maskdist.model import heads
    from maskdist.model.factory import create_model

    parts = create_model("test_efficientnet", heads="parts", warn_random=False).eval()
    plain = export.single_head(SimpleNamespace(card={"heads": "parts", "architecture": "test_efficientnet"}, model=parts))
    with torch.no_grad():
        assert torch.allclose(torch.softmax(plain(x), 1), heads.probabilities(parts(x), "parts"), atol=1e-6)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_are_readable_by_the_team_as_the_umask_says(experiment, small_shards, tmp_path, umask):
    """Every file maskdist writes through a temporary name gets the mode a plain open() gives:
    the fold's own files (written under this process's umask) and, under each umask, the
    submission with its probabilities and record, and a timm export's folders and files."""
    import os

    def mode(path):
        return os.stat(path).st_mode & 0o777

    ours = os.umask(0)
    os.umask(ours)
    fold = experiment / "fold0"
    for path in [fold / checkpoint.WEIGHTS, fold / checkpoint.MODEL_JSON, fold / "config.yaml", experiment / "experiment.yaml"]:
        assert mode(path) == 0o666 & ~ours, path
    env = launch_env(tmp_path)
    sub, exported = tmp_path / "sub.csv", tmp_path / "timm"
    for cmd in (["predict", str(experiment), "--shards", str(small_shards), "--out", str(sub), "--workers", "0", "--batch-size", "16"],
                ["export", str(experiment), "--format", "timm", "--out", str(exported)]):
        result = subprocess.run([sys.executable, "-m", "maskdist", *cmd], env=env, capture_output=True, text=True, timeout=300,
                                preexec_fn=lambda: os.umask(umask))
        assert result.returncode == 0, result.stderr[-3000:]
    for path in [sub, probs_path(sub), sub.with_name(sub.stem + ".predict.json")]:
        assert mode(path) == 0o666 & ~umask, path
    folders = sorted(p for p in exported.iterdir())
    assert folders and all(mode(f) == 0o777 & ~umask for f in folders)
    assert {f.name: oct(mode(f)) for folder in folders for f in folder.iterdir() if mode(f) != 0o666 & ~umask} == {}


def _real_photos(folder, count=60, seed=0):
    """``count`` JPEGs cut from scikit-image's photos at their own aspect ratios (0.5 to 2:
    portrait and landscape), larger than the models' input as photos are."""
    import cv2
    from skimage import data

    folder.mkdir(parents=True)
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image = sources[i % len(sources)]
        h, w = image.shape[:2]
        ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width / height
        ch = int(rng.integers(150, h + 1))
        cw = min(w, max(100, int(ch * ratio)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        path = folder / f"photo{i:03d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(image[y:y + ch, x:x + cw]), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def _model_that_knows(experiment, photos, tmp_path):
    """A copy of fold 0 whose head tells the photos' source images apart (the nearest mean of
    each source's features): a model with clear answers on these photos, so class agreement measures the inputs, not the
    near-ties of a model trained 3 steps."""
    model, card = checkpoint.load(experiment / "fold0")
    ours = transforms.build_transform("none", card["image"]["resize"], card["image"]["crop"])
    x = transforms.to_device(torch.from_numpy(np.stack([ours.from_jpeg(p.read_bytes()) for p in photos])), "cpu",
                             card["normalisation"]["mean"], card["normalisation"]["std"])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    sources = torch.tensor([int(p.stem[5:]) % 6 for p in photos])
    centroids = torch.zeros(18, features.shape[1])
    for k in range(6):
        centroids[k] = features[sources == k].mean(0)
    centroids[6:] = features.mean(0)  # the other classes: never nearer than the nearest source
    # nearest centroid as a linear head: argmax_k (f . c_k - |c_k|^2 / 2)
    head = model.get_classifier()
    head.weight.data = centroids.contiguous()
    head.bias.data = -(centroids ** 2).sum(1) / 2 - torch.cat([torch.zeros(6), torch.full((12,), 1e3)])
    copy = tmp_path / "knows" / "runs"
    shutil.copytree(experiment, copy, ignore=shutil.ignore_patterns("fold1", "fold2"))
    checkpoint.save(copy / "fold0", model, card)
    return copy


def test_timm_export_makes_timm_s_own_transform_give_maskdist_s_input(experiment, tmp_path):
    """timm's resolve_data_config + create_transform on the export's pretrained_cfg make, from
    real photos at their own aspect ratios, the input maskdist makes (squash, not the centre
    crop of a kept aspect ratio), so the exported model answers as classify does."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from maskdist.infer import classify, export

    photos = _real_photos(tmp_path / "photos")
    knows = _model_that_knows(experiment, photos, tmp_path)
    with pytest.warns(UserWarning, match="antialiasing"):
        folders = export.export_timm([knows / "fold0"], tmp_path / "timm")
    cfg = json.loads((folders[0] / "config.json").read_text())["pretrained_cfg"]
    assert cfg["crop_mode"] == "squash" and cfg["interpolation"] == "bilinear"
    exported = json.loads((folders[0] / "maskdist.json").read_text())["export"]
    record = exported["timm_preprocessing"]
    assert record["exact"] is False and any("antialiasing" in d for d in record["differences"])
    assert exported["weights_sha256"] == sha256_file(knows / "fold0" / checkpoint.WEIGHTS)  # the fold weights it came from

    model, card = checkpoint.load(knows / "fold0")
    mean, std = card["normalisation"]["mean"], card["normalisation"]["std"]
    ours = transforms.build_transform("none", card["image"]["resize"], card["image"]["crop"])
    loaded = timm.create_model(f"local-dir:{folders[0]}", pretrained=True).eval()
    theirs = create_transform(**resolve_data_config(model=loaded))
    differences = []
    for path in photos:
        timm_pixels = theirs(Image.open(path).convert("RGB")) * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        our_pixels = torch.from_numpy(ours.from_jpeg(path.read_bytes())).float() / 255
        differences.append(float((timm_pixels - our_pixels).abs().mean()) * 255)
    # antialiasing moves pixels by a few levels of 255; the centre crop of a kept aspect ratio
    # (crop_mode "center") by 20 to 75 on most of these photos
    assert np.mean(differences) < 6 and max(differences) < 12, sorted(differences)[-5:]

    classified = classify.classify([knows / "fold0"], [tmp_path / "photos"], decisions="argmax", workers=0).rows
    assert len(classified) == len(photos) and classified["class"].nunique() == 6  # it does tell them apart
    batch = torch.stack([theirs(Image.open(p).convert("RGB")) for p in classified["path"]])
    with torch.no_grad():
        timm_classes = loaded(batch).argmax(1).numpy()
    agreement = float((timm_classes == classified["class"].to_numpy()).mean())
    print(f"timm transform against classify: {agreement:.1%} same class, mean pixel difference {np.mean(differences):.2f}")
    assert agreement >= 0.99, agreement

    # the ONNX graph, fed as its own metadata says, with nothing of maskdist's
    import cv2
    import onnx
    import onnxruntime as ort

    graph = export.export_onnx([knows / "fold0"], tmp_path / "knows.onnx", decisions="argmax")["out"]
    metadata = {p.key: p.value for p in onnx.load(graph).metadata_props}
    recipe = json.loads(metadata["maskdist.input"])
    assert [m["weights_sha256"] for m in json.loads(metadata["maskdist.members"])] == [sha256_file(knows / "fold0" / checkpoint.WEIGHTS)]
    assert recipe["resize_mode"].startswith("squash") and recipe["layout"] == "NHWC"
    (rh, rw), (ch, cw) = recipe["resize"], recipe["crop"]
    images = []
    for path in classified["path"]:
        rgb = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        squashed = cv2.resize(rgb, (rw, rh), interpolation=cv2.INTER_LINEAR)
        top, left = (rh - ch) // 2, (rw - cw) // 2
        images.append(squashed[top:top + ch, left:left + cw])
    onnx_classes = ort.InferenceSession(graph).run(["label"], {"image": np.stack(images)})[0]
    assert float((onnx_classes == classified["class"].to_numpy()).mean()) >= 0.99


ONNX_TOLERANCE = 1e-5  # largest |probability difference| allowed between onnxruntime and PyTorch (float32)


def test_onnx_ensemble_matches_pytorch_under_onnxruntime(experiment, small_synth, tmp_path):
    import onnx
    import onnxruntime

    from maskdist.infer import export
    from maskdist.infer.decisions import decide
    from maskdist.infer.ensemble import load_ensemble, mix

    out = tmp_path / "ensemble.onnx"
    result = _maskdist(tmp_path, "export", experiment, "--format", "onnx", "--out", out, "--tta", "hflip", "--decisions", "argmax")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{FOLDS} model(s), input uint8 RGB NHWC 48x48 (the photo squashed to 64x64, bilinear, centre crop 48)" in result.stdout
    assert "holds no detector" not in result.stderr  # trained on whole photos: nothing to warn of
    onnx.checker.check_model(str(out))
    images = _eval_batch(small_synth, 64, 48)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probs, label = session.run(None, {"image": images})

    ensemble = load_ensemble([experiment])  # PyTorch: every fold on both views, then the mean
    x = transforms.to_device(torch.from_numpy(images).permute(0, 3, 1, 2), "cpu", *ensemble.members[0].normalisation)
    with torch.no_grad():
        per_model = np.stack([np.stack([torch.softmax(m.model(v), 1).numpy() for v in (x, torch.flip(x, dims=[3]))]).mean(0)
                              for m in ensemble.members], axis=1)
    expected = mix(ensemble, per_model)
    assert probs.shape == (len(images), 18) and np.abs(probs - expected).max() < ONNX_TOLERANCE
    assert (label == decide(expected, None)).all()
    with pytest.raises(MaskdistError, match="unknown TTA"):
        export.EnsembleGraph(ensemble, "vflip")


def test_bench_onnx_reports_agreement_and_both_rates(experiment, small_synth):
    from maskdist.bench.onnx import bench_onnx

    photos = sorted((small_synth / "eval" / "images").glob("[0-9a-f]*.jpg"))[:16]
    result = bench_onnx([experiment], photos, batch_size=8, rounds=1)
    assert result.images == 16 and result.models == FOLDS
    assert result.max_abs_diff < ONNX_TOLERANCE and result.same_labels == 1.0
    text = result.describe()
    assert "ratio onnxruntime / PyTorch" in text and "maskdist classify" in text and result.ratio > 0


def test_compare_on_real_experiments_pairs_seed_replicates_scores_the_eval_set_and_refuses_other_folds(experiment, small_shards,
                                                                                                     small_synth, tmp_path):
    """`maskdist compare` on the trained experiment and copies of it: a copy whose plan differs
    only in the seed is a seed replicate; the figures are oof --json's; another fold split is
    refused in one line."""
    from maskdist.infer import predict as predict_api

    twin = tmp_path / "twin"
    shutil.copytree(experiment, twin)
    plan = twin / "experiment.yaml"
    plan.write_text(plan.read_text().replace("\nseed: 0\n", "\nseed: 1\n"))
    submission = tmp_path / "sub.csv"
    predict_api.predict([experiment], submission, shards=str(small_shards), workers=0, batch_size=8)
    answers = small_synth / "eval_answers.csv"
    done = _maskdist(tmp_path, "compare", experiment, twin, "--resamples", "300", "--answers", answers,
                     "--submission", submission, "--submission", probs_path(submission), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    oof_json = json.loads(_maskdist(tmp_path, "oof", experiment, "--json").stdout)["oof"]
    first = result["oof"]["experiments"][0]
    assert first["macro_f1"] == pytest.approx(oof_json["macro_f1"]) and first["part_f1"] == pytest.approx(oof_json["part_f1"])
    assert first["per_class_f1"] == pytest.approx(oof_json["per_class_f1"])
    assert result["seeds"] == [0, 1] and result["seed_replicates"] == [[str(experiment), str(twin)]]
    diff = result["oof"]["differences"][0]
    assert diff["macro_f1"] == 0 and diff["interval"] == [0, 0] and diff["verdict"] == "no detectable difference"
    assert len(diff["per_class_f1"]) == 18 and result["oof"]["unit"] == "person"
    assert result["oof"]["groups"] == len({k.split("/")[0] for f in range(FOLDS)
                                           for k in pd.read_csv(experiment / f"fold{f}" / "oof.csv")["key"]})
    # the eval set: the same submission as CSV and as predict's probabilities, scored as `score` does
    scored = scoring.score_submission(submission, answers)
    assert [e["macro_f1"] for e in result["eval"]["experiments"]] == pytest.approx([scored.macro_f1] * 2)
    assert result["eval"]["unit"] == "image" and result["eval"]["differences"][0]["interval"] == [0, 0]
    text = _maskdist(tmp_path, "compare", experiment, twin, "--resamples", "300")
    assert f"{twin} vs {experiment}: +0.0000 [+0.0000, +0.0000]: no detectable difference" in text.stdout
    assert "differ only in the seed" in text.stdout

    # another split of the same people into folds: refused in one line
    other = tmp_path / "other-folds"
    shutil.copytree(experiment, other)
    for f in range(FOLDS):
        path = other / f"fold{f}" / "oof.csv"
        frame = pd.read_csv(path)
        frame["fold"] = (frame["fold"] + 1) % FOLDS
        frame.to_csv(path, index=False)
    refused = _maskdist(tmp_path, "compare", experiment, other)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert f"{other} split the people into other folds than {experiment}" in refused.stderr
    alone = _maskdist(tmp_path, "compare", experiment)
    assert alone.returncode == 2 and "two or more experiments" in alone.stderr


# --- non-finite outputs: named, refused, or kept and marked ---------------------------------------


@pytest.fixture
def nan_experiment(experiment, tmp_path):
    """A copy of the experiment whose fold 0 outputs NaN on every input: its classifier bias is
    NaN in best.safetensors (the other folds are untouched)."""
    from safetensors.torch import load_file, save_file

    runs = tmp_path / "nan"
    shutil.copytree(experiment, runs)
    weights = runs / "fold0" / checkpoint.WEIGHTS
    state = load_file(str(weights))
    state["classifier.bias"][:] = float("nan")
    save_file(state, str(weights))
    return runs


def test_classify_refuses_a_model_with_non_finite_output_and_keeps_every_photo_when_allowed(nan_experiment, small_synth, tmp_path):
    from maskdist.infer import classify as classify_api

    photos = tmp_path / "photos"
    shutil.copytree(small_synth / "eval" / "images", photos)
    count = len(classify_api.photos([photos]))
    table = tmp_path / "classified.csv"
    refused = _maskdist(tmp_path, "classify", nan_experiment, photos, "--out", table, "--workers", "0")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-2000:]
    assert f"from {nan_experiment / 'fold0'} on {count} of {count} photo(s)" in refused.stderr
    assert "--allow-nonfinite" in refused.stderr and "fold1" not in refused.stderr and not table.exists()

    # allowed: every photo is kept, voted by the two finite folds, and marked
    kept = classify_api.classify([nan_experiment], [photos], table, workers=0, allow_nonfinite=True)
    rows = pd.read_csv(table)
    assert len(rows) == count and rows["class"].notna().all()
    assert rows["note"].str.contains(f"non-finite output \\(NaN or inf\\) of {nan_experiment / 'fold0'}: voted by the other 2").all()
    others = classify_api.classify([nan_experiment / "fold1", nan_experiment / "fold2"], [photos], workers=0)
    assert rows["class"].tolist() == others.rows["class"].tolist()
    assert kept.nonfinite.models == {str(nan_experiment / "fold0"): count}
    assert f"{count} photo(s) marked, 0 without an answer" in kept.describe(table)

    # a photo no model could compute is kept without a class, never dropped
    alone = classify_api.classify([nan_experiment / "fold0"], [photos], workers=0, allow_nonfinite=True)
    assert len(alone.rows) == count and alone.rows["class"].isna().all() and alone.rows["note"].str.endswith(": no answer").all()
    assert alone.describe(None).startswith(f"0 of {count} photo(s) classified")

    # nothing readable: an error, not an empty table
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    empty = _maskdist(tmp_path, "classify", nan_experiment / "fold1", broken, "--out", table.with_name("none.csv"), "--workers", "0")
    assert empty.returncode == 2 and f"none of the 1 photo(s) could be read (e.g. {broken / 'a.jpg'}" in empty.stderr
    assert not table.with_name("none.csv").exists()


def test_predict_and_pseudo_label_refuse_non_finite_output_and_record_every_image_when_allowed(nan_experiment, small_synth, tmp_path):
    from maskdist.infer import predict as predict_api, pseudo

    eval_dir = small_synth / "eval"
    images = len(pd.read_csv(eval_dir / "info.csv"))
    refused = _maskdist(tmp_path, "predict", nan_experiment, "--eval-dir", eval_dir, "--out", tmp_path / "s.csv", "--workers", "0")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-2000:]
    assert f"from {nan_experiment / 'fold0'} on {images} of {images} eval image(s)" in refused.stderr
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "s.predict.json").exists()

    summary = predict_api.predict([nan_experiment], tmp_path / "s.csv", eval_dir=eval_dir, workers=0, allow_nonfinite=True)
    record = json.loads((tmp_path / "s.predict.json").read_text())["nonfinite"]
    ids = pd.read_csv(eval_dir / "info.csv", dtype=str)["ImageID"]
    assert record["models"] == {str(nan_experiment / "fold0"): images} and record["unanswered"] == []
    assert sorted(r["key"] for r in record["rows"]) == sorted(ids)
    assert all(r["why"].endswith("voted by the other 2 model(s)") for r in record["rows"])
    assert summary["nonfinite_lines"][0].startswith(f"warning: non-finite output (NaN or inf) from {nan_experiment / 'fold0'}")
    predict_api.predict([nan_experiment / "fold1", nan_experiment / "fold2"], tmp_path / "two.csv", eval_dir=eval_dir, workers=0)
    assert _answers(tmp_path / "s.csv") == _answers(tmp_path / "two.csv")
    with pytest.raises(MaskdistError, match=f"{images} eval image\\(s\\) got no finite output from any model"):
        predict_api.predict([nan_experiment / "fold0"], tmp_path / "one.csv", eval_dir=eval_dir, workers=0, allow_nonfinite=True)

    outside = eval_dir / "images"
    labels_csv = tmp_path / "pseudo.csv"
    refused = _maskdist(tmp_path, "pseudo-label", nan_experiment, outside, "--out", labels_csv, "--workers", "0")
    assert refused.returncode == 2 and str(nan_experiment / "fold0") in refused.stderr and not labels_csv.exists()
    report = pseudo.pseudo_label([nan_experiment / "fold0"], outside, labels_csv, workers=0, allow_nonfinite=True)
    assert report.labelled == 0 and len(report.nonfinite.unanswered) == images
    assert f"no finite output from any model, not labelled: {images}" in report.describe()


def test_oof_and_export_refuse_non_finite_rows_and_models_and_name_them_when_allowed(nan_experiment, tmp_path):
    from maskdist.infer import export, oof as oof_api

    # OOF rows of a fold whose validation gave NaN (as a fold trained before such epochs were refused)
    table = nan_experiment / "fold0" / "oof.csv"
    rows = pd.read_csv(table)
    rows.loc[:1, [f"p{c:02d}" for c in range(18)]] = np.nan
    rows.to_csv(table, index=False)
    broken = sorted(rows["key"][:2])
    refused = _maskdist(tmp_path, "oof", nan_experiment)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-2000:]
    assert f"non-finite probabilities (NaN or inf) in {table} for 2 of" in refused.stderr and "--allow-nonfinite" in refused.stderr
    result = oof_api.oof_scores(nan_experiment, allow_nonfinite=True)
    total = sum(len(pd.read_csv(nan_experiment / f"fold{k}" / "oof.csv")) for k in range(FOLDS))
    assert result["samples"] == total - 2 and [r["key"] for r in result["nonfinite"]] == broken
    assert all(r["why"] == f"non-finite probabilities in {table}" for r in result["nonfinite"])
    assert result["folds"][0].samples == len(rows) - 2

    # a model with a NaN bias is not exported, unless allowed, and then its export says so
    out = tmp_path / "timm"
    refused = _maskdist(tmp_path, "export", nan_experiment, "--format", "timm", "--out", out)
    assert refused.returncode == 2 and f"{nan_experiment / 'fold0'}: non-finite weights (NaN or inf in classifier.bias)" in refused.stderr
    assert not out.exists() and "fold1" not in refused.stderr
    folders = export.export_timm([nan_experiment], out, allow_nonfinite=True)
    records = [json.loads((f / "maskdist.json").read_text()) for f in folders]
    assert records[0]["nonfinite"].startswith("non-finite weights") and "nonfinite" not in records[1] | records[2]
