"""The 18-class code, its parts, age cuts and parsing errors."""
import itertools

import pytest

from maskdist.data import labels
from maskdist.errors import MaskdistError


def test_encode_decode_round_trip_covers_all_18_classes():
    seen = set()
    for mask, gender, age in itertools.product(range(3), range(2), range(3)):
        label = labels.encode(mask, gender, age)
        assert label == mask * 6 + gender * 3 + age
        assert labels.decode(label) == (mask, gender, age)
        seen.add(label)
    assert seen == set(range(labels.NUM_CLASSES))


@pytest.mark.parametrize("label", [-1, 18, 100])
def test_decode_rejects_out_of_range(label):
    with pytest.raises(MaskdistError, match=str(label)):
        labels.decode(label)


@pytest.mark.parametrize("age,metric,cut58", [(18, 0, 0), (29, 0, 0), (30, 1, 1), (57, 1, 1), (58, 1, 2), (59, 1, 2), (60, 2, 2)])
def test_age_group_with_metric_and_training_cut(age, metric, cut58):
    assert labels.age_group(age) == metric
    assert labels.age_group(age, old_cut=58) == cut58


def test_training_cut_changes_only_ages_58_and_59():
    changed = [a for a in range(18, 61) if labels.label_of(0, 1, a, 58) != labels.label_of(0, 1, a)]
    assert changed == [58, 59]


@pytest.mark.parametrize("bad", ["abc", "4.5", "", None, -3, 200])
def test_invalid_age_names_value_and_file(bad):
    with pytest.raises(MaskdistError) as err:
        labels.age_group(bad, where="train.csv line 7")
    assert "train.csv line 7" in str(err.value) and repr(bad) in str(err.value)


def test_parse_gender_and_stems():
    assert labels.parse_gender(" Female ") == 1 and labels.parse_gender("male") == 0
    with pytest.raises(MaskdistError, match="x.csv"):
        labels.parse_gender("1", where="x.csv")
    assert labels.parse_gender("1", allow_index=True) == 1
    assert [labels.parse_stem(s) for s in labels.STEMS] == [0, 0, 0, 0, 0, 1, 2]
    assert labels.parse_stem("INCORRECT_MASK") == 1
    with pytest.raises(MaskdistError, match="mask6.*images/p1"):
        labels.parse_stem("mask6", where="images/p1")


def test_class_names_are_unique_and_readable():
    names = [labels.class_name(c) for c in range(labels.NUM_CLASSES)]
    assert len(set(names)) == 18
    assert names[0] == "wear/male/<30" and names[17] == "not_worn/female/old"
