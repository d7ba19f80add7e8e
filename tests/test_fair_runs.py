"""curvlab.experiments.fair_runs: runner configurations as fair_compare's ``run`` (validation phase on a split
carved from the training data, test phase on the test set, identical training in both), the damping diagnostic of
the trained optimizer, and the edge flags of tuned values."""
from __future__ import annotations

import math

import pytest

from curvlab.data import load_digits
from curvlab.experiments.fair import Method, fair_compare
from curvlab.experiments.fair_runs import edge_params, num_fit, runner_trial
from curvlab.validation import carve_validation

BASE = {"data": {"name": "digits"}, "model": {"name": "mlp", "width": 16, "depth": 1},
        "train": {"epochs": 2, "batch_size": 128, "eval_train_examples": 0}}
KFAC = Method("kfac", {"lr": {"low": 1e-2, "high": 1.0, "log": True},
                       "damping": {"low": 1e-3, "high": 1.0, "log": True}}, second_order=True,
              fixed={"estimator": "kfac", "rule": "natural", "momentum": 0.9})
SGD = Method("sgd", {"lr": {"low": 1e-2, "high": 1.0, "log": True}},
             fixed={"estimator": "identity", "rule": "natural", "momentum": 0.9})


def test_phases_train_alike_and_evaluate_on_validation_or_test():
    split = load_digits()
    _, _, x_val, _ = carve_validation(split.x_train, split.y_train, 0.25, seed=0, stratify=True)
    run = runner_trial(BASE, val_fraction=0.25, target=0.5)
    params = {**SGD.fixed, "lr": 0.1}
    val, test = run(SGD, params, "val", 0), run(SGD, params, "test", 0)
    assert val["evaluated_on"] == "validation" and val["num_eval"] == len(x_val)
    assert test["evaluated_on"] == "test" and test["num_eval"] == split.num_test
    assert "test_accuracy" not in val and "val_accuracy" not in test
    # the same fitting data, seed and steps: the training trajectory is identical, only the evaluation differs
    assert val["batch_loss"] == test["batch_loss"] and val["steps"] == test["steps"]
    n = num_fit(BASE["data"], 0.25)
    assert n == split.num_train - len(x_val) and val["steps"] == 2 * math.ceil(n / 128)
    assert val["curve"][-1] == val["val_accuracy"] and test["curve"][-1] == test["test_accuracy"]
    assert val["curve"] != test["curve"]
    first = next((e for e, a in enumerate(val["curve"]) if e > 0 and a >= 0.5), None)
    assert val["epochs_to_target"] == first
    # another seed trains differently
    assert run(SGD, params, "val", 1)["batch_loss"] != val["batch_loss"]


def test_damping_diagnostic_after_the_last_step():
    run = runner_trial({**BASE, "train": {**BASE["train"], "batch_size": "full"}}, val_fraction=0.25,
                       damping=True)
    small = run(KFAC, {**KFAC.fixed, "lr": 0.1, "damping": 1e-3}, "val", 0)
    large = run(KFAC, {**KFAC.fixed, "lr": 0.1, "damping": 1.0}, "val", 0)
    assert set(small["damping"]) >= {"0/A", "0/G"}, sorted(small["damping"])
    for rec in (small, large):
        ratios = [v["ratio_mean"] for v in rec["damping"].values()]
        assert rec["damping_ratio_mean"] == max(ratios) > 0
    # K-FAC splits the damping over A and G by sqrt (pi-balanced): 1000x the damping is ~sqrt(1000)x per factor
    assert large["damping_ratio_mean"] > 10 * small["damping_ratio_mean"]
    sgd = run(SGD, {**SGD.fixed, "lr": 0.1}, "val", 0)
    assert sgd["damping"] == {} and sgd["damping_ratio_mean"] is None


def test_with_fair_compare_the_test_set_is_read_only_by_the_final_runs():
    run = runner_trial(BASE, val_fraction=0.25)
    seen = []

    def spy(method, params, phase, seed):
        out = run(method, params, phase, seed)
        seen.append((phase, out["evaluated_on"]))
        return out

    rec = fair_compare([SGD, KFAC], spy, trials=2, seeds=[0, 1], sampler="qmc", progress=False)
    assert seen == ([("val", "validation")] * 2 + [("test", "test")] * 2) * 2
    for name in ("sgd", "kfac"):
        final = rec["methods"][name]["final"]
        assert final["test_accuracy"]["n"] == 2
        assert all(r["evaluated_on"] == "test" for r in final["runs"])
        assert rec["methods"][name]["budget"]["trials"] == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        runner_trial(BASE, val_fraction=0.0)
    with pytest.raises(ValueError, match="phase"):
        runner_trial(BASE, val_fraction=0.2)(SGD, {**SGD.fixed, "lr": 0.1}, "train", 0)


def test_edge_params():
    space = {"lr": {"low": 1e-4, "high": 1.0, "log": True}, "damping": {"low": 0.0, "high": 1.0},
             "kind": {"choices": ["a", "b"]}}
    # log range: 4 decades, 10% = 0.4 decade from an edge
    assert edge_params({"lr": 1e-2, "damping": 0.5, "kind": "a"}, space) == []
    assert edge_params({"lr": 2e-4, "damping": 0.5}, space) == ["lr"]
    assert edge_params({"lr": 0.5, "damping": 0.95}, space) == ["lr", "damping"]
    assert edge_params({"lr": 3e-4}, space) == []                 # 0.48 decade from the low edge
    assert edge_params({"lr": 3e-4}, space, tol=0.2) == ["lr"]
