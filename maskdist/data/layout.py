"""Read a competition-style folder (and extra labelled CSVs) into one table.

Train folder::

    train.csv                      id,gender,race,age,path
    images/<path>/<stem>.<ext>     stems mask1..mask5, incorrect_mask, normal

Eval folder::

    info.csv                       ImageID,ans
    images/<ImageID>

Only a folder that cannot be read at all (no folder, no csv, wrong columns) is a hard error.
Everything else the competition data is known to contain (junk ``._`` files, hidden folders,
mixed extensions, a missing folder or image, a row that disagrees with its folder name) is
skipped or handled, and listed in a :class:`LayoutReport`.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from maskdist.data import labels
from maskdist.errors import MaskdistError, plural
from maskdist.shards.format import COMPETITION, EXTRA, UNKNOWN_AGE

TRAIN_COLUMNS = ("id", "gender", "race", "age", "path")
EVAL_COLUMNS = ("ImageID", "ans")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# When one stem exists with several extensions, keep the first in this order.
_EXTENSION_PREFERENCE = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}
# The label-fix file shipped with maskdist (DATA.md's published label errors).
PUBLISHED_FIXES = Path(__file__).parent / "published_fixes.csv"
TABLE_COLUMNS = ("path", "relpath", "person", "id", "gender", "age", "mask", "stem", "label", "source")
EVAL_TABLE_COLUMNS = ("row", "image_id", "path", "relpath")


@dataclass(frozen=True)
class Problem:
    """One thing the reader skipped, changed or found odd."""

    kind: str  # short fixed vocabulary, e.g. "junk", "missing-image", "fix-applied"
    where: str  # the file or folder (relative to the layout root where possible)
    why: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}: {self.why}"


# Kinds that are not problems with the data but changes the user asked for.
_CHANGES = {"fix-applied"}


@dataclass
class LayoutReport:
    """What was read, skipped and fixed, and why. Printable, and serialisable to JSON."""

    root: str
    people: int = 0
    images: int = 0
    kind: str = "train"  # "eval": a folder of photos without people
    problems: list[Problem] = field(default_factory=list)

    def add(self, kind: str, where: str, why: str) -> None:
        self.problems.append(Problem(kind, where, why))

    def by_kind(self) -> dict[str, list[Problem]]:
        groups: dict[str, list[Problem]] = {}
        for problem in self.problems:
            groups.setdefault(problem.kind, []).append(problem)
        return groups

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "people": self.people,
            "images": self.images,
            "counts": dict(Counter(p.kind for p in self.problems)),
            "problems": [{"kind": p.kind, "where": p.where, "why": p.why} for p in self.problems],
        }

    def describe(self, limit: int = 10, everything: str = "`maskdist layout --json FILE`") -> str:
        """A summary line, then up to ``limit`` entries of each kind of problem (``everything``:
        where the whole list is)."""
        people = f"{plural(self.people, 'person', 'people')}, " if self.kind != "eval" else ""
        lines = [f"read {self.root}: {people}{plural(self.images, 'image')}" + (" (eval photos)" if self.kind == "eval" else "")]
        for kind, group in sorted(self.by_kind().items()):
            lines.append(f"  {kind}: {len(group)}")
            lines.extend(f"    {p.where}: {p.why}" for p in group[:limit])
            if len(group) > limit:
                lines.append(f"    ... and {len(group) - limit} more (all are in {everything})")
        if not self.problems:
            lines.append("  no problems found")
        return "\n".join(lines)


def read_csv(path: Path, required: Iterable[str], what: str) -> pd.DataFrame:
    """A CSV as strings, or a one-line error naming the file and the columns expected."""
    required = tuple(required)
    if not path.is_file():
        raise MaskdistError(f"{path} not found: {what} must hold {path.name} with columns {','.join(required)}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise MaskdistError(f"{path} cannot be read as CSV ({str(err).splitlines()[0]}): expected columns {','.join(required)}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise MaskdistError(
            f"{path} lacks column(s) {','.join(missing)}: expected columns {','.join(required)} (found {','.join(frame.columns)})"
        )
    return frame


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise MaskdistError(f"{path} not found: {what}")


def _open_folder(root: Path, kind: str, csv_name: str, columns) -> tuple[pd.DataFrame, Path, LayoutReport]:
    """The CSV, the images/ folder and an empty report of a competition train or eval folder."""
    _require_dir(root, f"pass the competition {kind} folder (the one holding {csv_name} and images/)")
    csv = read_csv(root / csv_name, columns, f"the {kind} folder")
    images = root / "images"
    _require_dir(images, f"the {kind} folder {root} must hold an images/ folder")
    return csv, images, LayoutReport(root=str(root), kind=kind)


def _is_hidden(name: str) -> bool:
    # macOS resource forks ("._x.jpg"), ".DS_Store", ".ipynb_checkpoints" and the like.
    return name.startswith(".")


def _person_images(folder: Path, relfolder: str, report: LayoutReport) -> dict[str, Path]:
    """The images of one person folder by stem; junk and unknown files are reported."""
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        where = f"{relfolder}/{entry.name}"
        if _is_hidden(entry.name):
            report.add("junk", where, "hidden or macOS junk entry, ignored")
            continue
        if entry.is_dir():
            report.add("extra-file", where, "unexpected folder inside a person folder, ignored")
            continue
        stem, ext = os.path.splitext(entry.name)
        stem, ext = stem.lower(), ext.lower()
        if ext not in IMAGE_EXTENSIONS or stem not in labels.STEM_TO_MASK:
            report.add("extra-file", where, f"not one of the 7 images ({', '.join(labels.STEMS)}) as .jpg/.jpeg/.png, ignored")
            continue
        if stem in found:
            kept, other = sorted([found[stem], Path(entry.path)], key=lambda p: _EXTENSION_PREFERENCE[p.suffix.lower()])
            report.add("duplicate-image", where, f"{stem} exists twice; kept {kept.name}, ignored {other.name}")
            found[stem] = kept
            continue
        found[stem] = Path(entry.path)
    return found


def _check_row(row: pd.Series, where: str) -> tuple[int, int]:
    """(gender, age) of a train.csv row whose folder name agrees with its columns."""
    gender = labels.parse_gender(row["gender"], where)
    labels.age_group(row["age"], where=where)  # raises on a value that is not an age
    age = int(str(row["age"]).strip())
    expected = f"{row['id'].strip()}_{row['gender'].strip()}_{row['race'].strip()}_{str(row['age']).strip()}"
    if row["path"].strip() != expected:
        raise MaskdistError(f"folder name {row['path']!r} disagrees with the row's columns (expected {expected!r})")
    return gender, age


def read_train(
    train_dir: str | os.PathLike,
    fixes: str | os.PathLike | None = None,
    extra: Iterable[str | os.PathLike] = (),
) -> tuple[pd.DataFrame, LayoutReport]:
    """One row per image of a competition train folder (plus extra CSVs), and the report.

    ``fixes`` is a label-fix CSV (see :func:`apply_fixes`; ``"published"`` picks the fixes
    shipped with maskdist). ``extra`` are CSVs of outside images (see :func:`read_extra`).
    Columns: ``TABLE_COLUMNS``; ``label`` uses the metric's age cut (60).
    """
    root = Path(train_dir)
    csv, images, report = _open_folder(root, "train", "train.csv", TRAIN_COLUMNS)

    rows = []
    listed: set[str] = set()
    for index, row in csv.iterrows():
        where = f"train.csv line {index + 2}"
        person = row["path"].strip()
        if person in listed:
            report.add("duplicate-row", where, f"person {person!r} is listed twice; the first row is kept")
            continue
        listed.add(person)
        try:
            gender, age = _check_row(row, where)
        except MaskdistError as err:
            report.add("bad-row", where, f"{err}; person skipped")
            continue
        folder = images / person
        if not folder.is_dir():
            report.add("missing-folder", f"images/{person}", "listed in train.csv but not on disk; person skipped")
            continue
        found = _person_images(folder, f"images/{person}", report)
        for stem in labels.STEMS:
            if stem not in found:
                report.add("missing-image", f"images/{person}/{stem}", "image not found; the person's other images are kept")
        if not found:
            continue
        report.people += 1
        for stem in labels.STEMS:
            if stem in found:
                path = found[stem]
                mask = labels.STEM_TO_MASK[stem]
                rows.append({
                    "path": str(path.resolve()),
                    "relpath": path.relative_to(root).as_posix(),
                    "person": person,
                    "id": row["id"].strip(),
                    "gender": gender,
                    "age": age,
                    "mask": mask,
                    "stem": stem,
                    "label": labels.label_of(mask, gender, age),
                    "source": COMPETITION,
                })

    for entry in sorted(os.scandir(images), key=lambda e: e.name):
        if _is_hidden(entry.name):
            report.add("junk", f"images/{entry.name}", "hidden or macOS junk entry, ignored")
        elif entry.name not in listed:
            report.add("unlisted-folder", f"images/{entry.name}", "on disk but not in train.csv, ignored")

    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    if fixes is not None:
        table = apply_fixes(table, PUBLISHED_FIXES if str(fixes) == "published" else Path(fixes), report)
    report.images = len(table)
    for extra_csv in extra:
        extra_table = read_extra(extra_csv, report)
        table = pd.concat([table, extra_table], ignore_index=True)
    return table.astype({"gender": int, "age": int, "mask": int, "label": int}), report


def apply_fixes(table: pd.DataFrame, fixes_csv: Path, report: LayoutReport) -> pd.DataFrame:
    """Apply a label-fix CSV and report each change.

    Columns: ``person`` (a person folder name, or an id when it names exactly one person),
    and any of ``gender`` (the corrected gender), ``age`` (the corrected age) and
    ``swap_incorrect_normal`` (``1`` when the ``incorrect_mask`` and ``normal`` images are
    swapped). Empty cells leave that part alone.
    """
    fixes = read_csv(fixes_csv, ("person",), "the label-fix file")
    table = table.copy()
    for index, fix in fixes.iterrows():
        where = f"{fixes_csv.name} line {index + 2}"
        key = fix["person"].strip()
        people = sorted(set(table.loc[(table["person"] == key) | (table["id"] == key), "person"]))
        if len(people) != 1:
            why = "matches no person" if not people else f"matches {len(people)} people ({', '.join(people)}); use the folder name"
            report.add("fix-unmatched", where, f"{key!r} {why}; fix not applied")
            continue
        person = people[0]
        rows = table["person"] == person
        changes = []
        try:
            if fix.get("gender", "").strip():
                gender = labels.parse_gender(fix["gender"], where)
                changes.append(f"gender {labels.GENDER_NAMES[table.loc[rows, 'gender'].iloc[0]]} -> {labels.GENDER_NAMES[gender]}")
                table.loc[rows, "gender"] = gender
            if fix.get("age", "").strip():
                labels.age_group(fix["age"], where=where)
                age = int(fix["age"])
                changes.append(f"age {table.loc[rows, 'age'].iloc[0]} -> {age}")
                table.loc[rows, "age"] = age
        except MaskdistError as err:
            report.add("fix-invalid", where, f"{err}; fix not applied")
            continue
        if fix.get("swap_incorrect_normal", "").strip() in ("1", "true", "True", "yes"):
            incorrect = rows & (table["mask"] == 1)
            normal = rows & (table["mask"] == 2)
            table.loc[incorrect, "mask"] = 2
            table.loc[normal, "mask"] = 1
            changes.append("incorrect_mask <-> normal")
        if changes:
            sub = table.loc[rows]
            table.loc[rows, "label"] = [labels.label_of(m, g, a) for m, g, a in zip(sub["mask"], sub["gender"], sub["age"])]
            report.add("fix-applied", f"images/{person}", "; ".join(changes))
    return table


EXTRA_PART_COLUMNS = ("mask", "gender", "age")


def _parse_mask(value: str, where: str) -> int:
    text = value.strip().lower()
    if text in labels.MASK_NAMES:
        return labels.MASK_NAMES.index(text)
    if text in labels.STEM_TO_MASK:
        return labels.STEM_TO_MASK[text]
    if text in ("0", "1", "2"):
        return int(text)
    raise MaskdistError(f"invalid mask {value!r} in {where}: expected 0/1/2 or {'/'.join(labels.MASK_NAMES)}")


def read_extra(extra_csv: str | os.PathLike, report: LayoutReport) -> pd.DataFrame:
    """Outside images from a CSV: ``path`` plus either ``label`` or ``mask``, ``gender``, ``age``.

    ``path`` is relative to the CSV's folder (or absolute). Each image is its own person
    (identity unknown); rows whose file is missing or whose labels are invalid are skipped
    and reported. Samples get ``source = "extra"``; rows labelled only by class get
    ``age = UNKNOWN_AGE``.
    """
    extra_csv = Path(extra_csv)
    frame = read_csv(extra_csv, ("path",), "an extra-data CSV")
    has_parts = all(c in frame.columns for c in EXTRA_PART_COLUMNS)
    if not has_parts and "label" not in frame.columns:
        raise MaskdistError(
            f"{extra_csv} needs either a label column or the columns {','.join(EXTRA_PART_COLUMNS)} (found {','.join(frame.columns)})"
        )
    base = extra_csv.parent
    rows = []
    for index, row in frame.iterrows():
        where = f"{extra_csv.name} line {index + 2}"
        path = Path(row["path"].strip())
        full = path if path.is_absolute() else base / path
        if not full.is_file():
            report.add("missing-image", f"{extra_csv.name}: {row['path']}", "extra image not found; row skipped")
            continue
        try:
            if has_parts and row["age"].strip():
                mask, gender, age = _parse_mask(row["mask"], where), labels.parse_gender(row["gender"], where, allow_index=True), int(row["age"])
                label = labels.label_of(mask, gender, age, where=where)
            else:
                label = int(row["label"])
                mask, gender, _ = labels.decode(label)
                age = UNKNOWN_AGE
        except (MaskdistError, ValueError) as err:
            report.add("bad-row", where, f"{err}; row skipped")
            continue
        rel = full.relative_to(base).as_posix() if not path.is_absolute() else full.as_posix()
        rows.append({
            "path": str(full.resolve()),
            "relpath": rel,
            "person": f"extra/{extra_csv.stem}/{rel}",
            "id": "",
            "gender": gender,
            "age": age,
            "mask": mask,
            "stem": full.stem,
            "label": label,
            "source": EXTRA,
        })
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def training_labels(table: pd.DataFrame, age_cut: int) -> pd.Series:
    """Class labels with the given old-age cut; rows of unknown age keep their label."""
    known = table["age"] != UNKNOWN_AGE
    out = table["label"].copy()
    out[known] = [labels.label_of(m, g, a, age_cut) for m, g, a in zip(table.loc[known, "mask"], table.loc[known, "gender"], table.loc[known, "age"])]
    return out.astype(int)


def read_eval(eval_dir: str | os.PathLike) -> tuple[pd.DataFrame, LayoutReport]:
    """The eval images in info.csv order, and the report of what is missing or extra."""
    root = Path(eval_dir)
    csv, images, report = _open_folder(root, "eval", "info.csv", EVAL_COLUMNS)
    on_disk = {entry.name for entry in os.scandir(images)}
    rows = []
    seen: set[str] = set()
    for index, image_id in enumerate(csv["ImageID"]):
        where = f"images/{image_id}"
        if image_id in seen:
            report.add("duplicate-row", f"info.csv line {index + 2}", f"{image_id} is listed twice")
        seen.add(image_id)
        if image_id not in on_disk:
            report.add("missing-image", where, "listed in info.csv but not on disk")
            continue
        rows.append({"row": index, "image_id": image_id, "path": str((images / image_id).resolve()), "relpath": f"images/{image_id}"})
    for name in sorted(on_disk - seen):
        if _is_hidden(name):
            report.add("junk", f"images/{name}", "hidden or macOS junk entry, ignored")
        else:
            report.add("unlisted-image", f"images/{name}", "on disk but not in info.csv, ignored")
    report.images = len(rows)
    return pd.DataFrame(rows, columns=list(EVAL_TABLE_COLUMNS)), report
