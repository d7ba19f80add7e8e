"""muP fidelity (ALGORITHMS.md section 5): Shampoo's bias row (a bias is a fan-in-1 layer with a diagonal root),
the coordinate check with biases, and K-FAC's separate rho_A0 / rho_B0."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.coord_check import LAYERS, coord_check, mlp3

WIDTHS = (64, 128, 256, 512, 1024)


def mlp(width: int, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, width, bias=bias), nn.ReLU(), nn.Linear(width, width, bias=bias), nn.ReLU(),
                         nn.Linear(width, 4, bias=bias))


def by_name(opt) -> dict:
    return {u.name: u for u in opt.units}


def test_coord_check_has_biases_by_default():
    assert all(m.bias is not None for m in mlp3(16) if isinstance(m, nn.Linear))
    assert all(m.bias is None for m in mlp3(16, bias=False) if isinstance(m, nn.Linear))


def test_shampoo_coordinate_check_with_biases_is_flat_under_mup():
    """Widths 64..1024, one step (section-8 recipe, biases): max/min <= 1.5 in every layer. Measured: 1.01 / 1.16 /
    1.10; with the bias sharing the weight's multiplier (before) the input layer went 0.68 -> 2.11 (3.1x)."""
    res = coord_check("shampoo", "mup", WIDTHS, steps=1, bias=True)
    for k in LAYERS:
        assert res.ratio(k) < 1.5, f"{k} not flat for shampoo+mup with biases:\n{res.table()}"


@pytest.mark.parametrize("options,ridge", [({}, (1.0, 1.0, 1.0)),
                                           ({"shampoo_epsilon": "absolute"}, (1 / 4, 1 / 16, 1 / 4))])
def test_shampoo_bias_gets_the_fan_in_one_row(options, ridge):
    """r = 4, e = 1/4: weights (2, 1, 1/2) as before; the bias LR is r_out^(1-4e) = 1 in every layer, i.e.
    bias_scale = 1 / lr_mult; absolute eps: bias ridge r_out^-2 over the weight's r_in / r_out."""
    opt = curvlab.optimizer(mlp(256), "shampoo", scaling="mup", base_width=64, **options)
    units = by_name(opt)
    assert [units[n].lr_mult for n in "024"] == pytest.approx([2.0, 1.0, 0.5], rel=1e-12)
    got = [units[n].curvature.bias_scale for n in "024"]
    assert [g[0] for g in got] == pytest.approx([0.5, 1.0, 2.0], rel=1e-12)
    assert [g[1] for g in got] == pytest.approx(list(ridge), rel=1e-12)
    opt = curvlab.optimizer(mlp(256), "shampoo", scaling="mup", base_width=64, shampoo_exponent=0.125)
    units = by_name(opt)   # e = 1/8: bias LR r_out^(1/2) = (2, 2, 1); weight LR (r_out/r_in)^(3/4)
    assert [units[n].lr_mult * units[n].curvature.bias_scale[0] for n in "024"] == pytest.approx([2, 2, 1], rel=1e-12)


def test_shampoo_bias_scale_scales_solve_and_inverts_mv(float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = curvlab.optimizer(model, "shampoo", damping=1e-3, ema_decay=0.0, lr=0.1)
    F.mse_loss(model(torch.randn(9, 5)), torch.randn(9, 3)).backward()
    opt.update_curvature()
    opt.refresh()
    curv = opt.units[0].curvature
    v = torch.randn(curv.shape, dtype=torch.float64)
    plain_solve, plain_mv = curv.solve(v), curv.mv(v)
    curv.bias_scale = (3.0, 1.0)
    curv._powers = None
    opt.refresh()
    scaled = curv.solve(v)
    torch.testing.assert_close(scaled[:, :-1], plain_solve[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(scaled[:, -1], 3.0 * plain_solve[:, -1], rtol=1e-14, atol=0)
    torch.testing.assert_close(curv.mv(v)[:, -1], plain_mv[:, -1] / 3.0, rtol=1e-14, atol=0)
    curv.bias_scale = (1.0, 50.0)                       # relative eps: eps_bias = 50 * damping * max d
    opt.refresh()
    d = curv.stats["bias"]
    want = (d + 50 * 1e-3 * d.max()) ** -0.5 * v[:, -1]
    torch.testing.assert_close(curv.solve(v)[:, -1], want, rtol=1e-12, atol=0)


def test_shampoo_grafting_with_biases_is_refused_under_mup():
    with pytest.raises(curvlab.HyperParameterError, match="grafting.*bias"):
        curvlab.optimizer(mlp(64), "shampoo", scaling="mup", shampoo_grafting="sgd")
    curvlab.optimizer(mlp(64, bias=False), "shampoo", scaling="mup", shampoo_grafting="sgd")   # no bias: fine


# -- K-FAC: separate rho_A0, rho_B0 ----------------------------------------------------------------------
def test_kfac_mup_takes_separate_rho_a0_and_rho_b0(float64):
    """rho_A = rho_A0 {1, r, r}, rho_B = rho_B0 {1/r, 1/r, 1} (r = 4) with rho_A0 != rho_B0, applied at refresh."""
    torch.manual_seed(0)
    model = mlp(256)
    opt = curvlab.optimizer(model, "kfac", scaling="mup", base_width=64, damping=0.5, mup_rho_A0=2.0,
                            mup_rho_B0=0.01, ema_decay=0.0, loss="mse")
    F.mse_loss(model(torch.randn(8, 32)), torch.randn(8, 4)).backward()
    opt.update_curvature()
    units = by_name(opt)
    want = {"0": (2.0, 0.01 / 4), "2": (2.0 * 4, 0.01 / 4), "4": (2.0 * 4, 0.01)}
    for name, (ra, rb) in want.items():
        got = units[name].curvature.side_damping(units[name].hyper("damping"))
        assert got == pytest.approx((ra, rb), rel=1e-12), name
    tied = by_name(curvlab.optimizer(mlp(256), "kfac", scaling="mup", base_width=64, damping=0.5))
    assert [tied[n].damping_sides for n in "024"] == [(1.0, 0.25), (4.0, 0.25), (4.0, 1.0)]   # default: tied


@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="kfac", mup_damping="pi", mup_rho_A0=1.0), "mup_rho_A0 / mup_rho_B0"),
    (dict(estimator="shampoo", mup_rho_B0=1.0), "mup_rho_B0"),
    (dict(estimator="kfac", mup_rho_A0=-1.0), "mup_rho_A0"),
])
def test_rho_options_are_refused_where_they_do_not_apply(kwargs, match):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=match):
        curvlab.optimizer(mlp(64), kwargs.pop("estimator"), scaling="mup", **kwargs)
