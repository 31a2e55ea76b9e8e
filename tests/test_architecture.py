"""The package layout holds: no import from a lower room into a higher one, no circle of
imports (deferred ones included), no module over the size limit (tests/import_rules.py), and the old
import paths that the docs once showed still work, with a warning that names the new one."""
from __future__ import annotations

import subprocess
import sys

import import_rules
import pytest


def test_no_upward_import_no_circle_no_long_module():
    text, ok = import_rules.report()
    assert ok, text


def test_the_checker_catches_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    # A package of three modules that breaks both rules, checked with the real checker.
    pkg = tmp_path / "maskdist"
    (pkg / "data").mkdir(parents=True)
    (pkg / "train").mkdir()
    for init in (pkg / "__init__.py", pkg / "data" / "__init__.py", pkg / "train" / "__init__.py"):
        init.write_text("")
    (pkg / "data" / "low.py").write_text("def f():\n    from maskdist.train import loop\n")
    (pkg / "train" / "loop.py").write_text("from maskdist.train import other\n")
    (pkg / "train" / "other.py").write_text("from maskdist.train import loop\n")
    monkeypatch.setattr(import_rules, "PACKAGE", pkg)
    found = import_rules.imports()
    assert [(i.source, i.target) for i in import_rules.upward(found)] == [("maskdist.data.low", "maskdist.train.loop")]
    assert [set(c) for c in import_rules.circles(found)] == [{"maskdist.train.loop", "maskdist.train.other"}]
    _text, ok = import_rules.report()
    assert not ok


def test_a_circle_through_a_deferred_import_is_caught(tmp_path, monkeypatch):
    # the shape of the audit/contact-sheet circle: one module-level import, one inside a function
    pkg = tmp_path / "maskdist"
    (pkg / "infer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "infer" / "__init__.py").write_text("")
    (pkg / "infer" / "audit.py").write_text("from maskdist.infer import sheet\n")
    (pkg / "infer" / "sheet.py").write_text("def draw():\n    from maskdist.infer.audit import short_name\n")
    monkeypatch.setattr(import_rules, "PACKAGE", pkg)
    assert [set(c) for c in import_rules.circles(import_rules.imports())] == [{"maskdist.infer.audit", "maskdist.infer.sheet"}]
    text, ok = import_rules.report()
    assert not ok and "CIRCLE  maskdist.infer." in text


@pytest.mark.parametrize("old, new, name", [("maskdist.stream", "maskdist.streams", "train_loader"),
                                             ("maskdist.transforms", "maskdist.data.transforms", "build_transform")])
def test_old_documented_paths_warn_once_and_name_the_new_one(old, new, name):
    code = (f"import warnings; warnings.simplefilter('always')\n"
            f"with warnings.catch_warnings(record=True) as caught:\n"
            f"    from {old} import {name} as a\n    from {old} import {name} as b\n"
            f"from {new} import {name} as c\n"
            f"assert a is b is c\n"
            f"moved = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]\n"
            f"assert len(moved) == 1 and {new!r} in moved[0], moved\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_train_epoch_keeps_its_documented_path():
    from maskdist.train import train_epoch
    from maskdist.train.epoch import train_epoch as defined

    assert train_epoch is defined
