"""Person-level stratified k-fold.

All images of a person go to one fold; the person key is the folder name, so two people
who share an id are two people. People are stratified on source x gender x age group (the
metric's groups) and dealt, within each stratum, to the fold that holds the fewest of that
stratum (ties: fewest people overall, then lowest fold). Outside (``extra``) samples get
fold ``EXTRA_FOLD``: they only ever train, never validate.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from maskdist.data import labels
from maskdist.errors import MaskdistError
from maskdist.shards.format import EXTRA, EXTRA_FOLD, fold_name


def _strata(people: pd.DataFrame) -> pd.Series:
    groups = [labels.age_group(a) for a in people["age"]]
    return people["source"] + "/" + people["gender"].astype(str) + "/" + pd.Series(groups, index=people.index).astype(str)


def assign_folds(table: pd.DataFrame, k: int, seed: int = 0) -> pd.DataFrame:
    """A copy of ``table`` with an int column ``fold`` (0..k-1, or EXTRA_FOLD for extra rows)."""
    competition = table["source"] != EXTRA
    people = table.loc[competition].drop_duplicates("person")[["person", "source", "gender", "age"]]
    if k < 2:
        raise MaskdistError(f"--folds {k} is too few: k-fold needs at least 2 folds")
    if k > len(people):
        raise MaskdistError(f"--folds {k} is more than the {len(people)} people in the data: use fewer folds")
    people = people.sort_values("person").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    people = people.iloc[rng.permutation(len(people))].reset_index(drop=True)
    strata = _strata(people)

    fold_of: dict[str, int] = {}
    totals = np.zeros(k, dtype=int)
    for stratum in sorted(strata.unique()):
        in_stratum = np.zeros(k, dtype=int)
        for person in people.loc[strata == stratum, "person"]:
            fold = min(range(k), key=lambda f: (in_stratum[f], totals[f], f))
            fold_of[person] = fold
            in_stratum[fold] += 1
            totals[fold] += 1

    out = table.copy()
    out["fold"] = [fold_of.get(p, EXTRA_FOLD) if c else EXTRA_FOLD for p, c in zip(out["person"], competition)]
    return out


def fold_class_counts(table: pd.DataFrame, label_column: str = "label") -> pd.DataFrame:
    """Images per fold (rows) per class (columns 0..17), extra samples as fold -1."""
    counts = pd.crosstab(table["fold"], table[label_column]).reindex(columns=range(labels.NUM_CLASSES), fill_value=0)
    counts.columns.name = "class"
    return counts


def describe(table: pd.DataFrame, age_cut: int = labels.METRIC_AGE_CUT) -> str:
    """Per-fold people and per-class image counts (training labels with ``age_cut``)."""
    from maskdist.data.layout import training_labels

    with_cut = table.assign(train_label=training_labels(table, age_cut))
    counts = fold_class_counts(with_cut, "train_label")
    people = with_cut.groupby("fold")["person"].nunique()
    header = "fold people images | " + " ".join(f"{c:>5d}" for c in range(labels.NUM_CLASSES))
    lines = [f"images per fold and class (training labels, old-age cut {age_cut}):", header]
    for fold, row in counts.iterrows():
        name = fold_name(fold)
        lines.append(f"{name:>4} {people[fold]:>6d} {row.sum():>6d} | " + " ".join(f"{v:>5d}" for v in row))
    total = counts.sum()
    lines.append(f"{'all':>4} {people.sum():>6d} {total.sum():>6d} | " + " ".join(f"{v:>5d}" for v in total))
    return "\n".join(lines)
