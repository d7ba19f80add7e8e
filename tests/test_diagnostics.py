"""The damping diagnostic (curvlab.diagnostics): per layer the damping against the curvature's eigenvalues, in
`curvlab check` and in run metrics."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.diagnostics import DampingRow, damping_metrics, damping_report, format_damping


def fitted(estimator, loss="cross_entropy", **hyper):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = curvlab.optimizer(model, estimator, loss=loss, ema_decay=0.0, **hyper)
    x = torch.randn(12, 6, dtype=torch.float64)
    out = model(x)
    (F.cross_entropy(out, torch.randint(0, 3, (12,))) if loss == "cross_entropy"
     else F.mse_loss(out, torch.randn(12, 3, dtype=torch.float64))).backward()
    opt.update_curvature()
    opt.refresh()
    if opt.capture is not None:
        opt.capture.remove()
    return opt


def test_kfac_rows_are_the_side_dampings_against_the_factor_spectra():
    opt = fitted("kfac", damping=0.3, damping_style="explicit")
    opt.units[0].set_damping_sides(2.0, 0.5)
    opt.refresh()
    rows = {(r.layer, r.factor): r for r in damping_report(opt)}
    c = opt.units[0].curvature
    for factor, mat, rho in (("A", c.A, 0.6), ("G", c.G, 0.15)):
        r = rows[("0", factor)]
        e = torch.linalg.eigvalsh(mat)
        assert r.damping == pytest.approx(rho, rel=1e-12) and r.dim == len(mat)
        assert (r.eig_mean, r.eig_max) == pytest.approx((float(e.mean()), float(e[-1])), rel=1e-10)
        assert r.ratio_mean == pytest.approx(rho / float(e.mean()), rel=1e-10)


@pytest.mark.parametrize("estimator,options,factors", [
    ("shampoo", {}, {"L0,0", "R0,0", "bias"}),
    ("isaac", {"isaac_lambda_g": 0.5}, {"A", "G"}),
    ("miniblock", {}, {"blocks (x5)"}),
    ("miniblock", {"miniblock_mode": "woodbury"}, {"blocks (x5)"}),
    ("kfac", {"damping_style": "exact"}, {"G(x)A"}),
])
def test_every_estimator_reports_its_damped_factors(estimator, options, factors):
    opt = fitted(estimator, damping=0.01, **options)
    rows = damping_report(opt)
    assert {r.factor for r in rows if r.layer == "0"} == factors
    assert all(r.damping > 0 and r.eig_mean >= 0 and r.dim > 0 for r in rows)


def test_mbf_damping_swamps_an_mse_over_many_outputs_and_is_flagged():
    """The MBF figure's case in small: MSE averaged over many outputs makes the blocks tiny next to damping."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 200)).double()
    opt = curvlab.optimizer(model, "miniblock", loss="mse", damping=1e-4, miniblock_mode="woodbury")
    x = torch.randn(10, 6, dtype=torch.float64)
    F.mse_loss(model(x), torch.randn(10, 200, dtype=torch.float64) * 0.1).backward()
    opt.update_curvature()
    opt.refresh()
    rows = damping_report(opt)
    assert rows[-1].ratio_mean > 1.0
    assert "SWAMPED" in format_damping(rows) and "SWAMPED" not in format_damping(rows, threshold=1e12)
    metrics = damping_metrics(opt)
    assert set(metrics) == {f"{r.layer}/{r.factor}" for r in rows}
    assert metrics[f"{rows[-1].layer}/{rows[-1].factor}"]["ratio_mean"] == pytest.approx(rows[-1].ratio_mean)


def test_ratios_of_an_empty_curvature_are_infinite():
    r = DampingRow("x", "A", 3, 0.1, 0.0, 0.0, 0.0)
    assert r.ratio_mean == r.ratio_max == float("inf")


def test_check_prints_the_table():
    """`curvlab check` appends this table (run_default_check); checked here on its own (the full check is slow)."""
    from curvlab.check import damping_table
    text = damping_table(["isaac", "kfac"])
    assert "damp/mean" in text and "SWAMPED" in text                     # ISAAC's lambda_a = 10 swamps the head


def test_run_metrics_record_the_diagnostic_every_k_steps(tmp_path):
    from curvlab.experiments.config import resolve_config, run_id
    from curvlab.experiments.runner import run
    cfg = {"model": {"width": 16, "depth": 1}, "optimizer": {"estimator": "kfac"},
           "train": {"epochs": 1, "batch_size": 256, "damping_every": 2, "eval_train_examples": 0}}
    res = run(cfg, tmp_path, quiet=True)
    log = res.metrics[1]["damping_report"]
    assert [e["step"] for e in log] == list(range(2, res.metrics[1]["steps"] + 1, 2))
    assert {"0/A", "0/G"} <= set(log[0]["layers"]) and log[0]["layers"]["0/A"]["damping"] > 0
    off = {**cfg, "train": {**cfg["train"], "damping_every": 0}}
    assert run_id(resolve_config(cfg)) == run_id(resolve_config(off))        # a diagnostic: same run id
