"""Person-level stratified k-fold on the synthetic data."""
from __future__ import annotations

import numpy as np
import pytest

from maskdist.data import folds, labels, layout
from maskdist.errors import MaskdistError


@pytest.fixture(scope="module")
def table(small_synth):
    return layout.read_train(small_synth / "train")[0]


def test_no_person_in_two_folds_and_everyone_assigned(table):
    assigned = folds.assign_folds(table, k=5, seed=0)
    per_person = assigned.groupby("person")["fold"].nunique()
    assert (per_person == 1).all()
    assert set(assigned["fold"]) == set(range(5))
    # the two people who share an id are still two people, each whole in one fold
    shared = assigned.groupby("id")["person"].nunique()
    for ident in shared.index[shared > 1]:
        rows = assigned[assigned["id"] == ident]
        assert rows.groupby("person")["fold"].nunique().max() == 1


def test_strata_are_balanced_within_one_person(table):
    assigned = folds.assign_folds(table, k=4, seed=7)
    people = assigned.drop_duplicates("person")
    group = people["age"].map(labels.age_group)
    counts = people.assign(group=group).groupby(["gender", "group", "fold"]).size().unstack(fill_value=0).reindex(columns=range(4), fill_value=0)
    assert (counts.max(axis=1) - counts.min(axis=1) <= 1).all()
    sizes = people["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 2


def test_deterministic_for_a_seed(table):
    a = folds.assign_folds(table, k=5, seed=11)["fold"].tolist()
    b = folds.assign_folds(table.sample(frac=1, random_state=1), k=5, seed=11).sort_index()["fold"].tolist()
    c = folds.assign_folds(table, k=5, seed=12)["fold"].tolist()
    assert a == b
    assert a != c


def test_extra_rows_never_validate(table):
    extra = table.iloc[:3].copy()
    extra["source"] = "extra"
    extra["person"] = ["extra/x/1", "extra/x/2", "extra/x/3"]
    both = folds.assign_folds(__import__("pandas").concat([table, extra], ignore_index=True), k=3, seed=0)
    assert (both.loc[both["source"] == "extra", "fold"] == folds.EXTRA_FOLD).all()
    assert (both.loc[both["source"] != "extra", "fold"] >= 0).all()


def test_describe_prints_per_fold_class_counts_that_add_up(table):
    assigned = folds.assign_folds(table, k=3, seed=0)
    text = folds.describe(assigned, age_cut=58)
    rows = [line.split("|") for line in text.splitlines()[2:]]
    per_fold = np.array([[int(v) for v in r[1].split()] for r in rows[:-1]])
    total = np.array([int(v) for v in rows[-1][1].split()])
    assert (per_fold.sum(axis=0) == total).all()
    expected = np.bincount(layout.training_labels(assigned, 58), minlength=18)
    assert (total == expected).all()


@pytest.mark.parametrize("k", [1, 10_000])
def test_impossible_fold_counts_are_refused(table, k):
    with pytest.raises(MaskdistError, match=f"--folds {k}"):
        folds.assign_folds(table, k=k)
