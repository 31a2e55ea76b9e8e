"""Atomic writes: a failure (standing in for a kill) mid-save leaves the previous files."""
import os

import pytest
import torch

from maskdist.errors import MaskdistError
from maskdist.model.factory import create_model
from maskdist.system import fileio
from maskdist.train import checkpoint


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.json"
    fileio.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), fileio.atomic_open(target) as handle:
        handle.write("half of the new conte")
        raise RuntimeError("killed mid-write")  # stands in for a kill during the save
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["model.json"]


def test_replace_dir_interrupted_between_renames_is_recovered(tmp_path, monkeypatch):
    target, new = tmp_path / "state", tmp_path / "state.tmp"
    target.mkdir()
    (target / "trainer.json").write_text("epoch 1")
    new.mkdir()
    (new / "trainer.json").write_text("epoch 2")
    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):  # the second rename never happens: a kill between the two
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        fileio.replace_dir(new, target)
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    assert not target.exists()
    assert fileio.recover_dir(target) == target
    assert (target / "trainer.json").read_text() == "epoch 1"
    fileio.replace_dir(new, target)
    assert (target / "trainer.json").read_text() == "epoch 2" and not new.exists()
    assert not (tmp_path / "state.old").exists()


def test_checkpoint_round_trip_and_corrupt_weights(tmp_path):
    model = create_model("test_efficientnet", warn_random=False)
    card = checkpoint.model_card("test_efficientnet", 64, 48, (0.5,) * 3, (0.25,) * 3, 58, 2, 3, {"macro_f1": 0.5}, 0.4)
    checkpoint.save(tmp_path, model, card)
    loaded, read = checkpoint.load(tmp_path)
    assert read == card
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    (tmp_path / checkpoint.WEIGHTS).write_bytes(b"\x00" * 10)
    with pytest.raises(MaskdistError, match="cannot be read"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.MODEL_JSON).unlink()
    with pytest.raises(MaskdistError, match="model.json not found"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_and_temp_folders_take_the_mode_a_plain_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert fileio.current_umask() == umask
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain_dir").mkdir()
        fileio.atomic_write_text(tmp_path / "atomic.txt", "x")
        built = fileio.make_temp_dir(tmp_path / "export")
    finally:
        os.umask(old)

    def mode(path):
        return os.stat(path).st_mode & 0o777

    assert mode(tmp_path / "atomic.txt") == mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(built) == mode(tmp_path / "plain_dir") == 0o777 & ~umask
