"""analysis/defaults.py: the tiny mode runs, and ``--what-if`` measures a candidate default of an estimator for
that run only (the optimizer's ``component_defaults`` show it), refusing a malformed specification."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import curvlab

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("_script_analysis_defaults", ROOT / "analysis" / "defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_mode_and_what_if(tmp_path, monkeypatch):
    cls = curvlab.ESTIMATORS.get("kfac")
    monkeypatch.setattr(cls, "defaults", dict(cls.defaults))          # restored after the test
    script = load_script()
    plain = script.main(["--tiny", "--out", str(tmp_path / "a")])
    assert [r["estimator"] for r in plain] == ["kfac", "identity"] and (tmp_path / "a" / "defaults_digits.json").is_file()
    assert plain[0]["defaults"]["kl_clip"] == 1e-3
    changed = script.main(["--tiny", "--out", str(tmp_path / "b"), "--what-if", "kfac:kl_clip=1e-5"])
    assert changed[0]["defaults"]["kl_clip"] == 1e-5
    with pytest.raises(SystemExit):
        script.main(["--tiny", "--out", str(tmp_path / "c"), "--what-if", "nosuch:kl_clip=1"])
