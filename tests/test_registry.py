"""Registry: decorators, lookups, entry-point plugins, and a user-defined estimator end to end."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab import registry
from curvlab.cli import main as cli_main


def test_builtins_are_registered():
    assert {"kfac", "identity"} <= set(curvlab.ESTIMATORS.names())
    assert "natural" in curvlab.RULES and "standard" in curvlab.SCALINGS
    assert {"linear", "conv2d"} <= set(curvlab.ADAPTERS.names())


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        @curvlab.register_estimator("kfac")
        class Other(curvlab.Estimator):
            pass


def test_a_user_estimator_composes_with_the_natural_rule():
    """A diagonal-of-A estimator written in a few lines trains through the same optimizer."""
    from curvlab.estimators.kfac import KFAC, KroneckerCurvature

    class DiagonalA(KroneckerCurvature):
        def accumulate(self, new, ema_decay):
            super().accumulate({"A": torch.diag(torch.diagonal(new["A"])), "G": torch.eye(new["G"].shape[0])},
                               ema_decay)

    @curvlab.register_estimator("test_diag_a", overwrite=True)
    class DiagA(curvlab.Estimator):
        """Test-only: diag(A) (x) I."""
        options = KFAC.options
        curvature_class = DiagonalA

        def captures(self):
            return {"inputs", "real_grads"}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = curvlab.optimizer(model, "test_diag_a", "natural", lr=0.1, fisher="empirical")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    A = opt.units[0].curvature.A
    assert torch.count_nonzero(A - torch.diag(torch.diagonal(A))) == 0
    assert "test_diag_a" in registry.describe()
    registry.ESTIMATORS._items.pop("test_diag_a")


class FakeEntryPoint:
    def __init__(self, name, target):
        self.name, self.value, self._target = name, f"fake:{name}", target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def test_entry_point_plugins_are_loaded_and_broken_ones_reported(monkeypatch):
    module = types.ModuleType("fake_curvlab_plugin")

    def register():
        @curvlab.register_rule("test_plugin_rule", overwrite=True)
        class PluginRule(curvlab.UpdateRule):
            """Registered by a fake entry point."""

    monkeypatch.setitem(sys.modules, "fake_curvlab_plugin", module)
    eps = [FakeEntryPoint("good", register), FakeEntryPoint("broken", ImportError("no such module"))]
    monkeypatch.setattr(registry.importlib.metadata, "entry_points",
                        lambda group: eps if group == "curvlab.plugins" else [])
    registry.load_plugins(force=True)
    try:
        assert "test_plugin_rule" in curvlab.RULES
        assert "broken" in registry.plugin_errors and "no such module" in registry.plugin_errors["broken"]
        assert "failed to load" in registry.describe()
    finally:
        registry.RULES._items.pop("test_plugin_rule", None)
        registry.plugin_errors.pop("broken", None)


def test_cli_list_and_check(capsys):
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "estimators:" in out and "kfac" in out and "conv2d" in out
    assert cli_main(["check"]) == 0
    out = capsys.readouterr().out
    exact_lines = [line for line in out.splitlines() if "rel.err" in line]
    assert len(exact_lines) >= 10
    # the first three cases are exact identities: every layer's relative error is at round-off level
    sections = out.split("\n")
    errs, in_exact = [], False
    for line in sections:
        if not line.startswith(" "):
            in_exact = "(exact)" in line
        elif in_exact:
            errs.append(float(line.split("rel.err")[1].split()[0]))
    assert len(errs) == 7 and max(errs) < 1e-12, errs
