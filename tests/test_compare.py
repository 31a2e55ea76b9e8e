"""compare's bootstrap over people: its figures equal the metric's, the same resample pairs the
experiments, the unit is the person, and its calibration on simulated OOF predictions whose
truth is known (seed-only pairs and a planted improvement). The command on real experiment
folders is tested in test_predict.py, beside the trained experiment it reuses."""
from __future__ import annotations

import numpy as np
import pytest

from maskdist import metrics
from maskdist.bench import compare as bench
from maskdist.infer import compare


def _simulated(people=400, seed=0, models=2):
    rng = np.random.default_rng(seed)
    y, person, hardness = bench.simulate_people(rng, people)
    preds = np.stack([bench.simulate_model(rng, y, person, hardness) for _ in range(models)], axis=1)
    return y, person, preds


def test_observed_figures_are_the_metrics_and_a_resample_keeps_whole_people():
    y, person, preds = _simulated()
    shuffle = np.random.default_rng(1).permutation(len(y))  # rows of one person need not be adjacent
    y, person, preds = y[shuffle], person[shuffle], preds[shuffle]
    observed, resampled = compare.bootstrap(y, preds, person, resamples=300, seed=0)
    for e in range(2):
        scores = metrics.score(y, preds[:, e])
        assert observed["macro_f1"][e] == pytest.approx(scores.macro_f1)
        assert observed["per_class_f1"][e] == pytest.approx(scores.per_class_f1)
        assert [observed[p][e] for p in ("mask", "gender", "age")] == pytest.approx(list(scores.part_f1.values()))
    # one resample scored directly: the same people drawn (with all their photos) for both experiments
    rng = np.random.default_rng(0)
    people = len(np.unique(person))
    first = np.bincount(rng.integers(0, people, size=(300, people))[0], minlength=people)
    rows = np.concatenate([np.flatnonzero(person == p).repeat(0) if n == 0 else np.tile(np.flatnonzero(person == p), n)
                           for p, n in enumerate(first)])
    for e in range(2):
        assert resampled["macro_f1"][0, e] == pytest.approx(metrics.score(y[rows], preds[rows, e]).macro_f1)


def test_identical_experiments_differ_by_exactly_zero_and_verdicts_follow_the_interval():
    y, person, preds = _simulated(models=1)
    _, resampled = compare.bootstrap(y, np.concatenate([preds, preds], axis=1), person, resamples=200)
    interval = compare._interval(resampled["macro_f1"][:, 1] - resampled["macro_f1"][:, 0])
    assert interval == [0.0, 0.0] and compare.verdict(interval) == compare.SAME
    assert compare.verdict([0.001, 0.02]) == compare.BETTER and compare.verdict([-0.02, -0.001]) == compare.WORSE
    assert compare.verdict([-0.01, 0.02]) == compare.SAME


def test_people_not_photos_are_the_unit():
    """A person's photos are judged alike, so resampling photos would understate the spread."""
    y, person, preds = _simulated(people=600)
    _, by_person = compare.bootstrap(y, preds, person, resamples=500)
    _, by_photo = compare.bootstrap(y, preds, np.arange(len(y)), resamples=500)
    width = lambda r: np.subtract(*compare._interval(r["macro_f1"][:, 1] - r["macro_f1"][:, 0])[::-1])  # noqa: E731
    assert width(by_person) > 1.5 * width(by_photo)


def test_calibration_seed_only_pairs_are_not_called_different_and_a_planted_gain_is_found():
    """40 repeats; `maskdist bench compare` runs 200 (docs/performance.md). A 95% interval calls
    a seed-only pair different in about 5% of repeats: with 40 repeats the count has a binomial
    spread of about 1.4, so 36 (90%) is the floor here; the benchmark gives the figure."""
    result = bench.calibrate(repeats=40, people=900, resamples=400, age_gain=0.1)
    assert result.seed_only_same >= 36, result.describe()
    assert result.planted_detected >= 38, result.describe()
    assert result.seed_only_same_per_image < result.seed_only_same  # the naive per-photo bootstrap is overconfident


def test_seed_replicates_share_every_training_setting_and_the_labels(tmp_path):
    from maskdist import config
    from maskdist.train.folder import write_plan

    folders = []
    for name, seed, lr in (("a", 0, 0.4), ("b", 1, 0.4), ("c", 0, 0.2), ("d", 2, 0.4), ("e", 0, 0.4)):
        (tmp_path / name).mkdir()
        write_plan(tmp_path / name, config.TrainConfig(shards="-", seed=seed, lr=lr))
        folders.append(tmp_path / name)
    same = np.zeros((10, 5), dtype=np.int64)
    # e repeats a's seed: two runs of one seed are not seed noise; c trains otherwise
    assert compare.seed_groups(folders, same) == [[0, 1, 3]]
    other_cut = same.copy()
    other_cut[0, 1] = 2  # b learnt other labels (another age cut): not a replicate
    assert compare.seed_groups(folders, other_cut) == [[0, 3]]
