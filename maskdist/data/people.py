"""Who the synthetic people are: counts by (gender, age group) as in the competition, scaled
to any total, their ages (heavy at 18..20 and 58..59, everyone of 60 or over recorded as 60),
and the images per class such counts give.
"""
from __future__ import annotations

import numpy as np

from maskdist.data import labels as L
from maskdist.errors import MaskdistError

TRAIN_COUNTS = {(0, 0): 549, (0, 1): 410, (0, 2): 83, (1, 0): 732, (1, 1): 817, (1, 2): 109}
EVAL_FRACTION = 2 / 3  # eval people per training person, as in the competition

# Ages within a cell: heavy edges at 18..20 and 58..59 as in DATA.md.
_YOUNG_AGES = np.arange(18, 30)
_YOUNG_W = np.array([192, 407, 267] + [46] * 9, dtype=float)
_MID_AGES = np.arange(30, 60)
_MID_W = np.array([35] * 28 + [159, 85], dtype=float)

# --- counts -------------------------------------------------------------------------------


def default_person_counts() -> dict[tuple[int, int], int]:
    """Training people by (gender, age_group) of the competition: 2,700 in all."""
    return dict(TRAIN_COUNTS)


def scaled_person_counts(total: int) -> dict[tuple[int, int], int]:
    """The default proportions scaled to ``total`` people (largest-remainder rounding).

    From 6 people up every (gender, age group) cell gets at least one person.
    """
    if total < 0:
        raise MaskdistError(f"invalid person count {total}: expected 0 or more")
    base = default_person_counts()
    keys = list(base)
    whole = sum(base.values())
    exact = np.array([base[k] * total / whole for k in keys])
    counts = np.floor(exact).astype(int)
    order = sorted(range(len(keys)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    if total >= len(keys):
        for i in range(len(keys)):
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return {k: int(c) for k, c in zip(keys, counts)}


def expected_class_counts(person_counts: dict[tuple[int, int], int]) -> list[int]:
    """Images per class (cut 60) that ``person_counts`` people with 7 images each give."""
    out = [0] * L.NUM_CLASSES
    for (gender, group), n in person_counts.items():
        for _stem, mask in L.STEM_TO_MASK.items():
            out[L.encode(mask, gender, group)] += n
    return out

def ages(rng: np.random.Generator, group: int, n: int) -> np.ndarray:
    if group == 0:
        return rng.choice(_YOUNG_AGES, size=n, p=_YOUNG_W / _YOUNG_W.sum())
    if group == 1:
        return rng.choice(_MID_AGES, size=n, p=_MID_W / _MID_W.sum())
    return 60 + np.minimum(25, np.floor(rng.exponential(6.0, size=n))).astype(int)


def people_of(rng: np.random.Generator, counts: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    """(gender, true age) of each person, shuffled."""
    people = []
    for (gender, group), n in counts.items():
        people += [(gender, int(a)) for a in ages(rng, group, n)]
    order = rng.permutation(len(people))
    return [people[i] for i in order]

def resolve_counts(people, scale) -> dict[tuple[int, int], int]:
    if people is not None and scale is not None:
        raise MaskdistError("pass either people or scale, not both")
    if people is not None:
        if int(people) < 1:
            raise MaskdistError(f"invalid people {people}: expected 1 or more")
        return scaled_person_counts(int(people))
    if scale is not None:
        if not float(scale) > 0:
            raise MaskdistError(f"invalid scale {scale}: expected a positive factor")
        total = round(sum(TRAIN_COUNTS.values()) * float(scale))
        if total < 1:
            raise MaskdistError(f"scale {scale} leaves no people: expected a larger factor")
        return scaled_person_counts(total)
    return default_person_counts()
