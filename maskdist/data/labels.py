"""The 18-class code of the competition and its three parts.

``label = mask * 6 + gender * 3 + age_group``

* mask: 0 worn (``mask1``..``mask5``), 1 incorrect (``incorrect_mask``), 2 not worn (``normal``)
* gender: 0 male, 1 female
* age group: 0 below 30, 1 from 30 up to the old-age cut, 2 at or above the cut

The metric uses the cut at 60 (``METRIC_AGE_CUT``); training may use a lower cut (the
recipe uses 58) to grow the rare old-age group. Every parse function takes a ``where``
argument (usually a file path) so an error names the file the bad value came from.
"""
from __future__ import annotations

from dataclasses import dataclass

from maskdist.errors import MaskdistError

NUM_CLASSES = 18
METRIC_AGE_CUT = 60
YOUNG_CUT = 30

MASK_NAMES = ("wear", "incorrect", "not_worn")
GENDER_NAMES = ("male", "female")
AGE_NAMES = ("<30", "30-old", "old")

# The seven image stems of one person and the mask part each one shows.
STEM_TO_MASK = {
    "mask1": 0,
    "mask2": 0,
    "mask3": 0,
    "mask4": 0,
    "mask5": 0,
    "incorrect_mask": 1,
    "normal": 2,
}
STEMS = tuple(STEM_TO_MASK)


def _where(where: str | None) -> str:
    return f" in {where}" if where else ""


def encode(mask: int, gender: int, age_group: int) -> int:
    """Class index of the three parts."""
    for name, value, high in (("mask", mask, 2), ("gender", gender, 1), ("age group", age_group, 2)):
        if not (isinstance(value, (int,)) or hasattr(value, "__index__")) or not 0 <= int(value) <= high:
            raise MaskdistError(f"invalid {name} {value!r}: expected an integer 0..{high}")
    return int(mask) * 6 + int(gender) * 3 + int(age_group)


def decode(label: int) -> tuple[int, int, int]:
    """(mask, gender, age_group) of a class index."""
    label = int(label)
    if not 0 <= label < NUM_CLASSES:
        raise MaskdistError(f"invalid class label {label}: expected 0..{NUM_CLASSES - 1}")
    return label // 6, (label // 3) % 2, label % 3


def age_group(age: int, old_cut: int = METRIC_AGE_CUT, where: str | None = None) -> int:
    """Age group of an age in years: 0 below 30, 1 below ``old_cut``, 2 from ``old_cut``."""
    if not YOUNG_CUT < old_cut <= METRIC_AGE_CUT + 40:
        raise MaskdistError(f"invalid old-age cut {old_cut}: expected a value above {YOUNG_CUT}")
    try:
        years = int(age)
    except (TypeError, ValueError):
        raise MaskdistError(f"invalid age {age!r}{_where(where)}: expected a whole number of years") from None
    if years != float(age) or not 0 < years < 130:
        raise MaskdistError(f"invalid age {age!r}{_where(where)}: expected a whole number of years")
    if years < YOUNG_CUT:
        return 0
    return 1 if years < old_cut else 2


def parse_gender(text: str, where: str | None = None, allow_index: bool = False) -> int:
    """0 for ``male``, 1 for ``female`` (case and surrounding spaces ignored).

    ``allow_index`` also accepts ``0``/``1``, as outside-data CSVs may hold the part index.
    """
    value = str(text).strip().lower()
    if value in GENDER_NAMES:
        return GENDER_NAMES.index(value)
    if allow_index and value in ("0", "1"):
        return int(value)
    expected = "'male' or 'female'" + (" (or 0/1)" if allow_index else "")
    raise MaskdistError(f"invalid gender {text!r}{_where(where)}: expected {expected}")


def parse_stem(stem: str, where: str | None = None) -> int:
    """Mask part of an image stem (``mask1``..``mask5``, ``incorrect_mask``, ``normal``)."""
    value = str(stem).strip().lower()
    if value in STEM_TO_MASK:
        return STEM_TO_MASK[value]
    raise MaskdistError(f"invalid image name {stem!r}{_where(where)}: expected one of {', '.join(STEMS)}")


def label_of(mask: int, gender: int, age: int, old_cut: int = METRIC_AGE_CUT, where: str | None = None) -> int:
    """Class index from the mask part, gender and age in years."""
    return encode(mask, gender, age_group(age, old_cut, where))


@dataclass(frozen=True)
class ClassName:
    """Readable parts of a class index, e.g. ``wear/female/<30``."""

    mask: str
    gender: str
    age: str

    def __str__(self) -> str:
        return f"{self.mask}/{self.gender}/{self.age}"


def class_name(label: int) -> str:
    mask, gender, age = decode(label)
    return str(ClassName(MASK_NAMES[mask], GENDER_NAMES[gender], AGE_NAMES[age]))


def short_name(label: int, age_cut: int) -> str:
    """``W F <30``: mask (Wear, Incorrect, Not worn), gender, age group with the training cut."""
    mask, gender, group = decode(label)
    return f"{'WIN'[mask]} {'MF'[gender]} {('<30', f'30-{age_cut - 1}', f'{age_cut}+')[group]}"
