"""The in-process equal-budget protocol (curvlab.experiments.fair): same budget per method, selection on the
validation phase only, the test phase run once per seed with the best configuration."""
from __future__ import annotations

import math

import pytest

from curvlab.equal_budget import BudgetError
from curvlab.experiments.fair import Method, fair_compare

LR = {"low": 1e-3, "high": 1.0, "log": True}
DAMPING = {"low": 1e-4, "high": 1.0, "log": True}


def make_run(calls):
    def run(method, params, phase, seed):
        calls.append((method.name, phase, seed, dict(params)))
        # a smooth validation surface with its optimum at lr = 0.1 (and damping = 0.01)
        score = 1.0 - (math.log10(params["lr"]) + 1.0) ** 2
        if "damping" in params:
            score -= 0.5 * (math.log10(params["damping"]) + 2.0) ** 2
        key = "val_accuracy" if phase == "val" else "test_accuracy"
        return {key: score + (0.001 * seed if phase == "test" else 0.0)}
    return run


def test_equal_budget_and_test_touched_only_by_final_runs():
    calls = []
    methods = [Method("sgd", {"lr": LR}), Method("kfac", {"lr": LR, "damping": DAMPING}, second_order=True,
                                                 fixed={"momentum": 0.0})]
    rec = fair_compare(methods, make_run(calls), trials=12, seeds=[0, 1], sampler="qmc", progress=False)
    for name in ("sgd", "kfac"):
        phases = [c[1] for c in calls if c[0] == name]
        # 12 validation trials first, then exactly one test run per seed
        assert phases == ["val"] * 12 + ["test"] * 2, phases
        test_params = [c[3] for c in calls if c[0] == name and c[1] == "test"]
        best = rec["methods"][name]["best"]
        assert test_params[0] == {**methods[[m.name for m in methods].index(name)].fixed, **best["params"]}
        assert rec["methods"][name]["budget"]["trials"] == 12
        assert rec["methods"][name]["budget"]["finished"] == 12
        assert "lr" in rec["methods"][name]["space"]
    # the selected configuration is the best validation trial
    hist = rec["methods"]["kfac"]["history"]
    assert rec["methods"]["kfac"]["best"]["value"] == max(h["value"] for h in hist if h["value"] is not None)
    final = rec["methods"]["sgd"]["final"]["test_accuracy"]
    assert final["n"] == 2 and final["std"] > 0
    assert "equal budget: 12 trials per method" in rec["table"]


def test_second_order_without_damping_is_refused_before_any_trial():
    calls = []
    with pytest.raises(BudgetError, match="damping"):
        fair_compare([Method("kfac", {"lr": LR}, second_order=True)], make_run(calls), trials=3, progress=False)
    assert calls == []


def test_diverged_trial_scores_worst():
    def run(method, params, phase, seed):
        return {"val_accuracy": float("nan") if params["lr"] > 0.3 else params["lr"], "test_accuracy": 0.5}
    rec = fair_compare([Method("sgd", {"lr": LR})], run, trials=8, seeds=[0], sampler="qmc", progress=False)
    assert rec["methods"]["sgd"]["best"]["params"]["lr"] <= 0.3
