"""Shared fixtures: small synthetic datasets written once per test session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory) -> Path:
    """A small synthetic competition folder (train + eval), written once. Do not modify it:
    copy it with ``synth_copy`` first."""
    from maskdist.synth import write_dataset

    out = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(out, people=40, eval_people=12, seed=3, workers=1)
    return out


@pytest.fixture
def synth_copy(small_synth, tmp_path) -> Path:
    """A private, modifiable copy of ``small_synth``."""
    target = tmp_path / "data"
    shutil.copytree(small_synth, target)
    return target
