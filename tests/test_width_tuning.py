"""curvlab.width_tuning (width transfer under the equal-budget protocol): the tuning spaces, the frozen settings,
the transfer verdict on synthetic sweeps, the damping-at-best reduction and the coordinate check with biases."""
from __future__ import annotations

import math

import pytest

from curvlab import width_transfer as wt
from curvlab import width_tuning as wtu
from curvlab.equal_budget import check_equal_budget

GRID = [2.0 ** k for k in range(-4, 2)]


def sweep(est: str, scaling: str, optimum: dict[int, float], diverge=()) -> list[dict]:
    """A parabola in log2 lr per width with its minimum at ``optimum[width]``; ``diverge``: (width, lr) NaN."""
    return [{"estimator": est, "scaling": scaling, "width": w, "lr": lr, "seed": 0,
             "final_loss": math.nan if (w, lr) in diverge else (math.log2(lr / opt)) ** 2 + 1.0 / w,
             "diverged": (w, lr) in diverge}
            for w, opt in optimum.items() for lr in GRID]


def test_tuning_methods_give_equal_budgets_and_tune_damping():
    methods = wtu.tuning_methods(["kfac", "shampoo", "identity"], ["standard", "mup"], (1e-3, 2.0), (1e-4, 1.0))
    spaces = {m.name: m.space for m in methods}
    assert set(spaces) == {f"{e}/{s}" for e in ("kfac", "shampoo", "identity") for s in ("standard", "mup")}
    assert set(spaces["kfac/mup"]) == {"lr", "damping", "mup_rho_B0"}
    assert set(spaces["kfac/standard"]) == set(spaces["shampoo/mup"]) == {"lr", "damping"}
    assert set(spaces["identity/standard"]) == {"lr"}
    assert spaces["kfac/standard"]["lr"] == {"low": 1e-3, "high": 2.0, "log": True}
    assert [m.second_order for m in methods] == [True] * 4 + [False] * 2
    assert methods[1].fixed == {"estimator": "kfac", "scaling": "mup"}
    # what fair_compare checks before spending the budget passes
    check_equal_budget({m.name: {"trials": 4, "space": m.space, "method": {"second_order": m.second_order}}
                        for m in methods})
    tied = wtu.tuning_methods(["kfac"], ["mup"], (1e-3, 2.0), (1e-4, 1.0), separate_rho=False)
    assert set(tied[0].space) == {"lr", "damping"}
    with pytest.raises(ValueError, match="damping_range"):
        wtu.tuning_methods(["kfac"], ["mup"], (1e-3, 2.0), (1.0, 1e-4))
    with pytest.raises(ValueError, match="lr_range"):
        wtu.tuning_methods(["kfac"], ["mup"], (0.0, 2.0), (1e-4, 1.0))


def test_tuned_hyper_drops_the_lr():
    record = {"methods": {"kfac/mup": {"best": {"params": {"lr": 0.1, "damping": 0.3, "mup_rho_B0": 0.01}}},
                          "identity/mup": {"best": {"params": {"lr": 1.0}}}}}
    assert wtu.tuned_hyper(record) == {"kfac/mup": {"damping": 0.3, "mup_rho_B0": 0.01}, "identity/mup": {}}


def test_transfer_claims_verdicts():
    recs = (sweep("kfac", "mup", {32: 0.25, 64: 0.25, 128: 0.25})
            + sweep("kfac", "standard", {32: 0.25, 64: 0.125, 128: 1 / 16})        # drifts two steps
            + sweep("shampoo", "mup", {32: 0.25, 64: 0.25, 128: 0.5})
            + sweep("shampoo", "standard", {32: 0.25, 64: 0.25, 128: 0.5})         # the same: transfers too
            + sweep("identity", "mup", {32: 0.25, 64: 0.5, 128: 1.0})               # muP drifts two steps
            + sweep("identity", "standard", {32: 0.25, 64: 0.25, 128: 0.25}))
    claims = wtu.transfer_claims(wt.best_lr_shift(recs), ["kfac", "shampoo", "identity"], spacing=2.0)
    assert claims["kfac"]["verdict"] == "reproduced"
    assert claims["kfac"]["max_abs_shift_steps"] == {"mup": 0.0, "standard": 2.0}
    assert claims["shampoo"]["verdict"] == "partly"
    assert claims["identity"]["verdict"] == "not reproduced"
    # SP keeps its optimum but diverges at muP's best lr at the largest width: counted as not transferring
    recs = (sweep("kfac", "mup", {32: 0.25, 64: 0.5}) + sweep("kfac", "standard", {32: 0.25, 64: 0.25},
                                                                diverge={(64, 0.5)}))
    claims = wtu.transfer_claims(wt.best_lr_shift(recs), ["kfac", "shampoo"], spacing=2.0)
    assert claims["kfac"]["verdict"] == "reproduced" and claims["kfac"]["sp_diverges_at_mup_best_lr"]
    assert claims["shampoo"] == {"verdict": "untested"}
    assert "untested" in wtu.format_claims(claims, "train loss")


def test_damping_at_best_takes_the_worst_factor_at_the_best_lr():
    recs = sweep("kfac", "mup", {32: 0.25, 64: 0.25})
    for r in recs:
        big = r["lr"] == 0.25 and r["width"] == 64
        r["damping"] = {"0/A": {"ratio_mean": 0.1}, "4/G": {"ratio_mean": 30.0 if big else 0.5}}
    rows = wtu.damping_at_best(recs, wt.best_lr_shift(recs))["kfac/mup"]
    assert rows == [{"width": 32, "lr": 0.25, "max_damping_over_mean_eig": 0.5, "factor": "4/G"},
                    {"width": 64, "lr": 0.25, "max_damping_over_mean_eig": 30.0, "factor": "4/G"}]


def test_coord_check_ratios_with_biases():
    """Shampoo under muP with biases: flat within 1.5 over 64..256 in every layer (its bias row; before it the input
    layer grew ~3x over 64..1024, tests/test_mup_fidelity.py)."""
    out = wtu.coord_check_ratios(["shampoo"], ["mup"], [64, 128, 256])
    assert set(out) == {"shampoo/mup"}
    assert all(v["ratio"] < 1.5 for v in out["shampoo/mup"].values()), out
