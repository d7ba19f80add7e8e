"""curvlab.experiments.fair_traces: fair_compare over traced training (the paper figures' runs), edge hits and the
damping summary."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from curvlab.experiments.fair import Method, fair_compare
from curvlab.experiments.fair_traces import TracedRuns, damping_summary, edge_hits, results_of, tuned_methods


def problem(seen):
    torch.manual_seed(0)
    x = torch.randn(48, 4)
    y = (x[:, 0] > 0).long()
    x_fit, y_fit, x_val, y_val, x_test, y_test = x[:32], y[:32], x[32:40], y[32:40], x[40:], y[40:]

    def make_model(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))

    def evaluate(model, phase):
        seen.append(phase)
        xh, yh = (x_val, y_val) if phase == "val" else (x_test, y_test)
        with torch.no_grad():
            out = model(xh)
        return {f"{phase}_loss": float(F.cross_entropy(out, yh)),
                f"{phase}_accuracy": float((out.argmax(1) == yh).float().mean())}

    return make_model, x_fit, y_fit, evaluate


def test_traced_runs_keep_test_traces_and_the_damping_diagnostic_only_from_the_final_runs():
    seen = []
    make_model, x_fit, y_fit, evaluate = problem(seen)
    runs = TracedRuns(make_model, x_fit, y_fit, evaluate, loss="cross_entropy", loss_fn=F.cross_entropy,
                      batch_size=8, steps=6, eval_every=3)
    methods = [Method("SGD", {"lr": {"low": 1e-2, "high": 1.0, "log": True}}, fixed={"optimizer": "identity"}),
               Method("K-FAC", {"lr": {"low": 1e-2, "high": 1.0, "log": True},
                                "damping": {"low": 1e-3, "high": 1.0, "log": True}}, second_order=True,
                      fixed={"optimizer": "kfac", "inv_interval": 1, "kl_clip": None})]
    record = fair_compare(methods, runs, trials=3, metric="val_loss", direction="minimize", seeds=[0, 1],
                          sampler="qmc", progress=False)
    # 3 trials x 3 evaluations (steps 0, 3, 6) on validation, then 2 test re-runs per method
    assert seen == (["val"] * 9 + ["test"] * 6) * 2
    assert [len(runs.traces[m]) for m in ("SGD", "K-FAC")] == [2, 2]
    assert [r["step"] for r in runs.traces["K-FAC"][0].rows] == [0, 3, 6]
    final = record["methods"]["K-FAC"]["final"]["runs"]
    assert [r["test_loss"] for r in final] == [t.rows[-1]["test_loss"] for t in runs.traces["K-FAC"]]
    # the diagnostic of the tuned K-FAC: one entry per layer and side, with the tuned damping in it
    diag = runs.damping["K-FAC"][0]
    assert sorted(diag) == ["0/A", "0/G", "2/A", "2/G"]
    assert all(v["damping"] > 0 and v["ratio_mean"] == pytest.approx(v["damping"] / v["eig_mean"])
               for v in diag.values())
    assert damping_summary(runs.damping["SGD"][0])["factors"] == 0
    results = results_of(record, runs)
    best = record["methods"]["K-FAC"]["best"]["params"]
    assert results["K-FAC"]["lr"] == best["lr"] and results["K-FAC"]["params"]["damping"] == best["damping"]
    assert tuned_methods(record)[1] == {"label": "K-FAC", "optimizer": "kfac", "inv_interval": 1, "kl_clip": None,
                                        **best}
    assert set(runs.cpu_s) == {"SGD", "K-FAC"} and min(runs.cpu_s.values()) > 0


def test_a_diverged_run_reports_nan_for_its_phase_metrics():
    seen = []
    make_model, x_fit, y_fit, evaluate = problem(seen)
    runs = TracedRuns(make_model, x_fit * 1e6, y_fit, evaluate, loss="cross_entropy", loss_fn=F.cross_entropy,
                      batch_size=8, steps=20, eval_every=5)
    metrics = runs(Method("SGD", {}, fixed={"optimizer": "identity"}), {"optimizer": "identity", "lr": 1e6},
                   "val", 0)
    assert metrics["diverged"] and math.isnan(metrics["val_loss"]) and math.isnan(metrics["val_accuracy"])
    with pytest.raises(ValueError, match="phase"):
        runs(Method("SGD", {}), {"optimizer": "identity", "lr": 0.1}, "train", 0)


def test_edge_hits_in_log_and_linear_ranges():
    record = {"methods": {
        "a": {"space": {"lr": {"low": 1e-4, "high": 1.0, "log": True}, "damping": {"low": 1e-6, "high": 1.0,
                                                                                   "log": True}},
              "best": {"params": {"lr": 0.9, "damping": 1e-3}}},
        "b": {"space": {"lr": {"low": 1e-4, "high": 1.0, "log": True}, "m": {"low": 0.0, "high": 1.0, "log": False}},
              "best": {"params": {"lr": 1.2e-4, "m": 0.5}}},
        "c": {"space": {"lr": {"low": 1e-4, "high": 1.0, "log": True}}, "best": {"params": {"lr": 1e-2}}}}}
    hits = edge_hits(record)
    # 0.9 is 0.99 of the way up [1e-4, 1] in log space; 1e-3 sits in the middle of its range
    assert list(hits) == ["a", "b"]
    assert hits["a"] == ["lr=0.9 at the high edge of [0.0001, 1]"]
    assert hits["b"] == ["lr=0.00012 at the low edge of [0.0001, 1]"]


def test_damping_summary_counts_swamped_factors():
    metrics = {"l/A": {"ratio_mean": 0.5}, "l/G": {"ratio_mean": 3.0}, "m/A": {"ratio_mean": 10.0},
               "m/G": {"ratio_mean": None}}
    s = damping_summary(metrics)
    assert s == {"factors": 4, "swamped": 2, "threshold": 1.0, "median_ratio_mean": 3.0, "min_ratio_mean": 0.5,
                 "max_ratio_mean": 10.0}
    assert damping_summary(metrics, threshold=5.0)["swamped"] == 1
