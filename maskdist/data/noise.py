"""Planted label errors with a known truth, for measuring a label audit (``synth --label-noise``).

The competition's own kinds of errors (DATA.md), each on a whole person:

* ``gender``: the person is recorded with the other gender (all seven photos);
* ``age``: the recorded age lies in another age group (below 30, 30..59, 60), at least
  ``MIN_AGE_ERROR`` years from the true one;
* ``swap``: the ``incorrect_mask`` and ``normal`` photos carry each other's names.

``RATE`` is the share of training people given one error; the kinds take turns. The images
are drawn from the true person, so only the record (``train.csv``, the folder name, the two
file names) is wrong. The truth is written outside ``train/`` as a label-fix file
(:data:`NOISE_FILE`): applying it with ``shards build --fixes`` restores the true labels, and an
audit's suspects are scored against it. The draws use a random stream of their own, so a
dataset without noise is the same, byte for byte, as one written before this option existed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from maskdist.data import labels as L
from maskdist.errors import MaskdistError

NOISE_FILE = "label_noise.csv"  # beside train/, like eval_answers.csv
NOISE_COLUMNS = ("person", "gender", "age", "swap_incorrect_normal", "kind", "recorded")
KINDS = ("gender", "age", "swap")
MAX_RATE = 0.5
# Recorded ages of each group (every person of 60 or over is recorded as 60).
_GROUP_AGES = {0: (18, 29), 1: (30, 59), 2: (60, 60)}
# A planted age is this many years off at least: an error a look at the photos can catch
# (59 recorded as 60 crosses the metric's cut, but no photo shows it).
MIN_AGE_ERROR = 10


@dataclass(frozen=True)
class PlantedError:
    """What the record of one person says instead of the truth."""

    kind: str
    gender: int  # recorded gender
    age: int  # recorded age
    swapped: bool  # incorrect_mask and normal swapped


def check_rate(rate: float) -> float:
    rate = float(rate)
    if not 0.0 <= rate <= MAX_RATE:
        raise MaskdistError(f"invalid label noise {rate}: expected a share of people from 0 to {MAX_RATE} (e.g. 0.025)")
    return rate


def _wrong_ages(age: int) -> dict[int, list[int]]:
    """Recorded ages in each other age group at least ``MIN_AGE_ERROR`` years from ``age``."""
    out = {}
    for group, (low, high) in _GROUP_AGES.items():
        ages = [a for a in range(low, high + 1) if abs(a - age) >= MIN_AGE_ERROR]
        if group != L.age_group(age) and ages:
            out[group] = ages
    return out


def plant(seed: int, people: Sequence[tuple[int, int]], ids: Sequence[str], rate: float) -> dict[int, PlantedError]:
    """Person index -> its planted error, for ``round(rate * people)`` people.

    ``people`` are (gender, true age) pairs and ``ids`` their ids; people who share an id are
    left alone (a changed gender or age could give both the same folder name).
    """
    rate = check_rate(rate)
    count = round(rate * len(people))
    if not count:
        return {}
    shared = {i for i in ids if list(ids).count(i) > 1}
    candidates = [p for p in range(len(people)) if ids[p] not in shared]
    rng = np.random.default_rng([seed, 9, 5])  # a stream of its own (see the module docstring)
    chosen = sorted(int(p) for p in rng.choice(candidates, size=min(count, len(candidates)), replace=False))
    kinds = [KINDS[i % len(KINDS)] for i in rng.permutation(len(chosen))]
    planted = {}
    for person, kind in zip(chosen, kinds):
        gender, age = people[person]
        recorded_age = min(age, L.METRIC_AGE_CUT)
        if kind == "gender":
            planted[person] = PlantedError(kind, 1 - gender, recorded_age, False)
        elif kind == "age":
            choices = _wrong_ages(recorded_age)
            group = sorted(choices)[int(rng.integers(len(choices)))]
            planted[person] = PlantedError(kind, gender, int(rng.choice(choices[group])), False)
        else:
            planted[person] = PlantedError(kind, gender, recorded_age, True)
    return planted


def truth_row(person: str, error: PlantedError, true_gender: int, true_age: int) -> tuple:
    """One row of :data:`NOISE_FILE`: the fix that restores the truth, the kind, what was recorded."""
    if error.kind == "gender":
        return person, L.GENDER_NAMES[true_gender], "", "", error.kind, L.GENDER_NAMES[error.gender]
    if error.kind == "age":
        return person, "", min(true_age, L.METRIC_AGE_CUT), "", error.kind, error.age
    return person, "", "", 1, error.kind, "incorrect_mask<->normal"


def summary(planted: dict[int, PlantedError], people: int, rate: float) -> dict:
    """What ``synth.json`` says about the planted errors."""
    images = sum(len(L.STEMS) if e.kind in ("gender", "age") else 2 for e in planted.values())
    return {"rate": rate, "people": len(planted), "of_people": people, "images": images,
            "image_share": images / max(1, people * len(L.STEMS)),
            "kinds": {k: sum(e.kind == k for e in planted.values()) for k in KINDS}, "truth": NOISE_FILE}
