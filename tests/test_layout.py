"""The competition-layout reader on real files: every DATA.md quirk planted, and reported."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from maskdist.cli import main
from maskdist.data import labels, layout
from maskdist.errors import MaskdistError


def _people(train: Path) -> pd.DataFrame:
    return pd.read_csv(train / "train.csv", dtype=str, keep_default_na=False)


def _plant_problems(train: Path) -> set[tuple[str, str]]:
    """Damage a synthetic train folder; return the (kind, where) the report must list."""
    csv = _people(train)
    first, second, third, fourth, fifth = csv["path"].iloc[:5]
    planted = set()
    # a person folder missing from disk
    shutil.rmtree(train / "images" / first)
    planted.add(("missing-folder", f"images/{first}"))
    # a missing image
    victim = next((train / "images" / second).glob("mask2.*"))
    victim.unlink()
    planted.add(("missing-image", f"images/{second}/mask2"))
    # an extra non-image file and a second copy of a stem under another extension
    (train / "images" / third / "notes.txt").write_text("not an image")
    planted.add(("extra-file", f"images/{third}/notes.txt"))
    original = next((train / "images" / third).glob("mask4.*"))
    other_ext = ".png" if original.suffix.lower() != ".png" else ".jpg"
    shutil.copy(original, original.with_suffix(other_ext))
    planted.add(("duplicate-image", f"images/{third}/{sorted([original.name, original.with_suffix(other_ext).name])[1]}"))
    # an upper-case extension is not a problem: the image must still be read
    upper = next((train / "images" / fourth).glob("mask3.*"))
    upper.rename(upper.with_name("MASK3" + upper.suffix.upper()))
    # a folder on disk that train.csv does not list
    (train / "images" / "999999_male_Asian_40").mkdir()
    planted.add(("unlisted-folder", "images/999999_male_Asian_40"))
    # a row whose folder name disagrees with its columns (gender flipped in the column)
    row = csv.index[csv["path"] == fifth][0]
    csv.loc[row, "gender"] = "male" if csv.loc[row, "gender"] == "female" else "female"
    csv.to_csv(train / "train.csv", index=False)
    planted.add(("bad-row", f"train.csv line {row + 2}"))
    return planted


def test_report_lists_exactly_the_planted_problems(synth_copy):
    train = synth_copy / "train"
    planted = _plant_problems(train)
    junk = {p.relative_to(train).as_posix() for p in (train / "images").rglob(".*")}
    junk_top = {j for j in junk if not any(part.startswith(".") for part in Path(j).parts[:-1])}
    assert junk_top, "the synthetic data should carry junk files"

    table, report = layout.read_train(train)
    found = {(p.kind, p.where) for p in report.problems if p.kind != "junk"}
    assert found == planted
    assert {p.where for p in report.problems if p.kind == "junk"} == junk_top

    csv = _people(train)
    skipped = {csv["path"].iloc[0], csv["path"].iloc[4]}
    expected_people = set(csv["path"]) - skipped
    assert set(table["person"]) == expected_people
    assert report.people == len(expected_people)
    # 7 images each, minus the one deleted; the upper-case extension is read
    assert len(table) == 7 * len(expected_people) - 1 == report.images
    assert (table["stem"].value_counts().reindex(list(labels.STEMS)) > 0).all()
    fourth = csv["path"].iloc[3]
    assert (table.loc[table["person"] == fourth, "relpath"].str.contains("MASK3")).sum() == 1
    assert table["relpath"].map(lambda r: (train / r).is_file()).all()
    assert not table["relpath"].str.contains(r"/\._").any()


def test_rows_carry_the_parts_and_label_of_their_folder(small_synth):
    table, _ = layout.read_train(small_synth / "train")
    csv = _people(small_synth / "train").set_index("path")
    for person, group in table.groupby("person"):
        row = csv.loc[person]
        assert (group["gender"] == labels.parse_gender(row["gender"])).all()
        assert (group["age"] == int(row["age"])).all()
        assert (group["id"] == row["id"]).all()
    assert (table["mask"] == table["stem"].map(labels.STEM_TO_MASK)).all()
    expected = [labels.label_of(m, g, a) for m, g, a in zip(table["mask"], table["gender"], table["age"])]
    assert table["label"].tolist() == expected
    # the shared id: two people, one id, two person keys
    shared = table.groupby("id")["person"].nunique()
    assert (shared > 1).any()
    assert table["id"].str.contains("-").any(), "suffixed ids are read as ids"
    assert set(table["path"].map(lambda p: Path(p).suffix.lower())) >= {".jpg", ".png", ".jpeg"}


@pytest.mark.parametrize("damage,needle", [
    (lambda t: shutil.rmtree(t), "pass the competition train folder"),
    (lambda t: (t / "train.csv").unlink(), "train.csv not found"),
    (lambda t: (t / "train.csv").write_text("id,sex,age,path\n1,male,20,x\n"), "lacks column(s) gender,race"),
    (lambda t: shutil.rmtree(t / "images"), "images/ folder"),
])
def test_unreadable_layout_is_a_one_line_error_naming_the_file(synth_copy, damage, needle):
    train = synth_copy / "train"
    damage(train)
    with pytest.raises(MaskdistError) as err:
        layout.read_train(train)
    assert needle in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(main, ["layout", str(train)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and needle in result.output
    assert "Traceback" not in result.output


def test_fix_file_changes_labels_and_reports_each_change(small_synth, tmp_path):
    table, _ = layout.read_train(small_synth / "train")
    people = table.drop_duplicates("person").set_index("person")
    male = people.index[people["gender"] == 0][0]
    young = people.index[(people["age"] < 30) & (people.index != male)][0]
    swapped = people.index[~people.index.isin([male, young])][0]
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(
        "person,gender,age,swap_incorrect_normal\n"
        f"{male},female,,\n{young},,61,\n{swapped},,,1\nnobody_here,male,,\n"
    )
    fixed, report = layout.read_train(small_synth / "train", fixes=fixes)
    by = fixed.set_index(["person", "stem"])
    assert (fixed.loc[fixed["person"] == male, "gender"] == 1).all()
    assert (fixed.loc[fixed["person"] == young, "age"] == 61).all()
    assert (fixed.loc[fixed["person"] == young, "label"] % 3 == 2).all()
    assert by.loc[(swapped, "incorrect_mask"), "mask"] == 2 and by.loc[(swapped, "normal"), "mask"] == 1
    assert by.loc[(swapped, "normal"), "label"] == labels.label_of(1, by.loc[(swapped, "normal"), "gender"], by.loc[(swapped, "normal"), "age"])
    applied = {p.where for p in report.problems if p.kind == "fix-applied"}
    assert applied == {f"images/{male}", f"images/{young}", f"images/{swapped}"}
    assert [p.why for p in report.problems if p.kind == "fix-unmatched"] == ["'nobody_here' matches no person; fix not applied"]
    untouched = ~fixed["person"].isin([male, young, swapped])
    assert fixed.loc[untouched, "label"].tolist() == table.loc[untouched.values, "label"].tolist()


def test_published_fixes_ship_with_the_package_and_match_by_id(synth_copy):
    published = pd.read_csv(layout.PUBLISHED_FIXES, dtype=str, keep_default_na=False)
    assert len(published) == 13 and set(published.columns) == {"person", "gender", "age", "swap_incorrect_normal"}
    # rename one synthetic person to a published id: the fix must then apply to it
    train = synth_copy / "train"
    csv = _people(train)
    old = csv["path"].iloc[0]
    csv.loc[0, ["id", "gender"]] = ["004432", "male"]
    new = f"004432_male_Asian_{csv.loc[0, 'age']}"
    os.rename(train / "images" / old, train / "images" / new)
    csv.loc[0, "path"] = new
    csv.to_csv(train / "train.csv", index=False)
    table, report = layout.read_train(train, fixes="published")
    assert (table.loc[table["person"] == new, "gender"] == 1).all()
    assert [p.where for p in report.problems if p.kind == "fix-applied"] == [f"images/{new}"]
    assert sum(p.kind == "fix-unmatched" for p in report.problems) == 12


def test_extra_csv_by_parts_and_by_label(small_synth, tmp_path):
    images = sorted((small_synth / "train" / "images").glob("*/normal.*"))[:3]
    folder = tmp_path / "outside"
    folder.mkdir()
    for i, src in enumerate(images):
        shutil.copy(src, folder / f"ext{i}{src.suffix}")
    by_parts = folder / "parts.csv"
    by_parts.write_text(f"path,mask,gender,age\next0{images[0].suffix},not_worn,female,70\next1{images[1].suffix},2,0,59\nmissing.jpg,2,0,40\n")
    by_label = tmp_path / "by_label.csv"
    by_label.write_text(f"path,label\noutside/ext2{images[2].suffix},14\noutside/ext1{images[1].suffix},99\n")
    table, report = layout.read_train(small_synth / "train", extra=[by_parts, by_label])
    extra = table[table["source"] == "extra"].reset_index(drop=True)
    assert extra["label"].tolist() == [labels.encode(2, 1, 2), labels.encode(2, 0, 1), 14]
    assert extra["age"].tolist() == [70, 59, layout.UNKNOWN_AGE]
    assert extra["person"].nunique() == 3 and not extra["person"].isin(table.loc[table["source"] != "extra", "person"]).any()
    assert layout.training_labels(extra, 58).tolist() == [labels.encode(2, 1, 2), labels.encode(2, 0, 2), 14]
    kinds = sorted((p.kind, p.where) for p in report.problems if p.kind in ("missing-image", "bad-row"))
    assert kinds == [("bad-row", "by_label.csv line 3"), ("missing-image", "parts.csv: missing.jpg")]
    with pytest.raises(MaskdistError, match="needs either a label column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("path,gender\nx.jpg,male\n")
        layout.read_train(small_synth / "train", extra=[bad])


def test_eval_keeps_info_csv_order_and_reports_gaps(synth_copy):
    eval_dir = synth_copy / "eval"
    info = pd.read_csv(eval_dir / "info.csv", dtype=str, keep_default_na=False)
    table, report = layout.read_eval(eval_dir)
    assert table["image_id"].tolist() == info["ImageID"].tolist()
    assert table["row"].tolist() == list(range(len(info)))
    assert {p.kind for p in report.problems} <= {"junk"}
    gone = info["ImageID"].iloc[2]
    (eval_dir / "images" / gone).unlink()
    (eval_dir / "images" / "stray.jpg").write_bytes(b"x")
    table, report = layout.read_eval(eval_dir)
    assert gone not in set(table["image_id"]) and table["row"].tolist() == [r for r in range(len(info)) if r != 2]
    expected = {("missing-image", f"images/{gone}"), ("unlisted-image", "images/stray.jpg")}
    assert {(p.kind, p.where) for p in report.problems if p.kind != "junk"} == expected
    (eval_dir / "info.csv").write_text("ImageID\nx.jpg\n")
    with pytest.raises(MaskdistError, match="lacks column.*ans"):
        layout.read_eval(eval_dir)
