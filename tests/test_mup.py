"""scaling="mup" (Ishikawa & Karakida, ICLR 2024; ALGORITHMS.md section 5): coordinate check, roles, init, LR and
damping multipliers per table entry, K-FAC's per-side damping against a dense reference, construction errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.cli import main as cli_main
from curvlab.coord_check import LAYERS, coord_check
from curvlab.scalings import mup
from helpers import assert_close

WIDTHS = (64, 128, 256, 512, 1024)


def mlp(width: int, d_in: int = 8, d_out: int = 3, depth: int = 2, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, width, bias=bias), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width, bias=bias), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, d_out, bias=bias))


def by_name(opt) -> dict:
    return {u.name: u for u in opt.units}


# -- the coordinate check (section 8) ------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["kfac", "shampoo"])
def test_coordinate_check_is_flat_under_mup_and_not_under_standard(estimator):
    """One step, section-8 recipe (MSE, batch 8, x ~ N(0, I_32), 4 outputs, lr 0.5; K-FAC damping 1 per side,
    Shampoo relative eps 1e-6; no biases, as section 8). Measured max/min over widths 64..1024: mup <= 1.3, standard
    ~4 (input and output). With biases: tests/test_mup_fidelity.py."""
    up = coord_check(estimator, "mup", WIDTHS, steps=1, bias=False)
    sp = coord_check(estimator, "standard", (64, 1024), steps=1, bias=False)
    for k in LAYERS:
        assert up.ratio(k) <= 2.0, f"{k} not flat under mup:\n{up.table()}"
    assert max(sp.ratio(k) for k in LAYERS) > 3.0, f"standard unexpectedly flat:\n{sp.table()}"


@pytest.mark.parametrize("estimator", ["kfac", "identity"])
def test_sngm_global_norm_is_width_consistent_under_mup(estimator):
    """SNGM's one global norm weights each unit by Unit.norm_weight (set by mup), so it stays flat."""
    res = coord_check(estimator, "mup", (64, 128, 256, 512), steps=1, rule="sngm", lr=0.05, momentum=0.0)
    for k in LAYERS:
        assert res.ratio(k) <= 2.0, f"{k} not flat for {estimator}+sngm under mup:\n{res.table()}"


def test_pi_damping_under_mup_starves_the_input_layer():
    """5.1: pi-damping over-damps the input layer's A by ~r, so its update decays ~1/r (hidden/output stay flat)."""
    res = coord_check("kfac", "mup", (64, 128, 256, 512), steps=1, mup_damping="pi")
    assert res.slope("input") < -0.6 and res.ratio("hidden") < 2.0, res.table()


# -- roles, widths, init ---------------------------------------------------------------------------------
def test_roles_are_inferred_in_order_and_can_be_overridden():
    model = mlp(32, depth=3)
    opt = curvlab.optimizer(model, "kfac", scaling="mup", base_width=16)
    layers = mup.weight_layers(model, opt.units, 16)
    assert {n: l.role for n, l in layers.items()} == {"0": "input", "2": "hidden", "4": "hidden", "6": "output"}
    assert [(l.r_in, l.r_out) for l in layers.values()] == [(1.0, 2.0), (2.0, 2.0), (2.0, 2.0), (2.0, 1.0)]
    opt = curvlab.optimizer(model, "kfac", scaling="mup", base_width=16, mup_roles={"2": "input"})
    assert by_name(opt)["2"].damping_sides == (1.0, 0.5)                   # input row: rho_A const
    with pytest.raises(ValueError, match="not trainable weight layers"):
        curvlab.optimizer(model, "kfac", scaling="mup", mup_roles={"9": "input"})
    with pytest.raises(ValueError, match="mup_roles"):
        curvlab.optimizer(model, "kfac", scaling="mup", mup_roles={"2": "middle"})


def test_conv_layers_use_channels_as_width_and_c_in_k2_as_fan_in():
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64 * 4, 10))
    opt = curvlab.optimizer(model, "kfac", scaling="mup", base_width=16)
    layers = mup.weight_layers(model, opt.units, 16)
    assert [(l.role, l.fan_in, l.r_in, l.r_out) for l in layers.values()] == [
        ("input", 27, 1.0, 2.0), ("hidden", 288, 2.0, 4.0), ("output", 256, 64 * 4 / 16, 1.0)]
    assert [u.damping_sides for u in opt.units] == [(1.0, 0.5), (2.0, 0.25), (16.0, 1.0)]


def test_init_std_per_role_and_zero_biases():
    torch.manual_seed(0)
    model = mlp(512, d_in=64, d_out=16)
    curvlab.optimizer(model, "kfac", scaling="mup", mup_sigma=2.0)
    for idx, expected in ((0, 2.0 / math.sqrt(64)), (2, 2.0 / math.sqrt(512)), (4, 2.0 / 512)):
        w = model[idx].weight.detach()
        assert abs(float(w.std()) / expected - 1.0) < 0.05, (idx, float(w.std()), expected)
        assert abs(float(w.mean())) < 0.1 * expected
        assert torch.count_nonzero(model[idx].bias) == 0


def test_init_false_leaves_the_weights_untouched():
    torch.manual_seed(0)
    model = mlp(64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curvlab.optimizer(model, "kfac", scaling="mup", init=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    curvlab.optimizer(model, "kfac", scaling="mup")
    assert not torch.equal(before["0.weight"], model[0].weight)


# -- multipliers per table entry (r = 256 / 64 = 4) -----------------------------------------------------
TABLE = [  # estimator, options, lr multipliers (input, hidden, output), damping multipliers
    ("identity", {}, (4, 1, 1 / 4), (1, 1, 1)),
    ("kfac", {}, (1, 1, 1), (1, 1, 1)),
    ("shampoo", {}, (2, 1, 1 / 2), (1, 1, 1)),                                           # e = 1/4
    ("shampoo", {"shampoo_exponent": 0.5}, (1, 1, 1), (1, 1, 1)),
    ("shampoo", {"shampoo_exponent": 0.125}, (4 ** 0.75, 1, 4 ** -0.75), (1, 1, 1)),
    ("shampoo", {"shampoo_epsilon": "absolute"}, (2, 1, 1 / 2), (1 / 4, 1, 4)),
    ("shampoo", {"shampoo_grafting": "sgd"}, (4, 1, 1 / 4), (1, 1, 1)),
    ("shampoo", {"shampoo_grafting": "adagrad"}, (1, 1 / 4, 1 / 4), (1, 1, 1)),
    ("isaac", {}, (4, 1, 1), (1, 4, 1)),
    ("miniblock", {}, (1 / 4, 1 / 4, 1), (1 / 16, 1 / 4, 4)),                           # one block per row
    ("miniblock", {"miniblock_damping": "relative"}, (1 / 4, 1 / 4, 1), (1, 4, 4)),
    ("miniblock", {"miniblock_size": 1}, (1 / 4, 1 / 16, 1 / 4), (1 / 16, 1 / 16, 1)),   # diagonal
    ("miniblock", {"miniblock_size": "layer"}, (1, 1, 1), (1 / 4, 1, 4)),
]


@pytest.mark.parametrize("estimator,options,lr,damping", TABLE, ids=[f"{e}-{o}" for e, o, _, _ in TABLE])
def test_multipliers_follow_the_table(estimator, options, lr, damping):
    opt = curvlab.optimizer(mlp(256, d_in=32, d_out=4, bias=False), estimator, scaling="mup", base_width=64,
                            **options)
    units = by_name(opt)
    for name, want_lr, want_d in zip(("0", "2", "4"), lr, damping):
        assert units[name].lr_mult == pytest.approx(want_lr, rel=1e-12), (name, units[name].lr_mult)
        assert units[name].damping_mult == pytest.approx(want_d, rel=1e-12), (name, units[name].damping_mult)
        assert units[name].hyper("lr") == pytest.approx(opt.param_groups[0]["lr"] * want_lr)


def test_kfac_damping_sides_per_mup_damping():
    model = mlp(256, d_in=32, d_out=4)
    units = by_name(curvlab.optimizer(model, "kfac", scaling="mup", init=False))
    assert [units[n].damping_sides for n in "024"] == [(1.0, 0.25), (4.0, 0.25), (4.0, 1.0)]
    assert all(units[n].curvature.damping_sides == units[n].damping_sides for n in "024")
    assert {units[n].curvature.damping_style for n in "024"} == {"explicit"}
    for style in ("pi", "trace"):
        units = by_name(curvlab.optimizer(model, "kfac", scaling="mup", init=False, mup_damping=style))
        assert {(units[n].curvature.damping_style, units[n].damping_sides) for n in "024"} == {(style, (1.0, 1.0))}


def test_fallback_units_get_the_sgd_row_and_biases_keep_one():
    model = mlp(256, d_in=32, d_out=4)
    units = by_name(curvlab.optimizer(model, "kfac", scaling="mup", layers=["2"]))
    assert units["0.weight"].lr_mult == 4 and units["4.weight"].lr_mult == 0.25 and units["2"].lr_mult == 1
    assert units["0.bias"].lr_mult == units["4.bias"].lr_mult == 1.0
    assert units["2"].damping_sides == (4.0, 0.25)


# -- K-FAC per-side damping against dense references ------------------------------------------------------
@pytest.mark.parametrize("style", ["explicit", "trace"])
def test_kfac_per_side_damping_equals_the_dense_inverse(float64, style):
    torch.manual_seed(0)
    model = mlp(6, d_in=5, d_out=3, depth=1)
    opt = curvlab.optimizer(model, "kfac", damping=0.3, damping_style=style, ema_decay=0.0, fisher="type2")
    F.cross_entropy(model(torch.randn(7, 5)), torch.randint(0, 3, (7,))).backward()
    assert opt.update_curvature()
    for unit, sides in zip(opt.units, [(2.0, 0.5), (0.25, 3.0)]):
        unit.set_damping_sides(*sides)
    opt.refresh()
    for unit, (ma, mg) in zip(opt.units, [(2.0, 0.5), (0.25, 3.0)]):
        c = unit.curvature
        ra, rg = 0.3 * ma, 0.3 * mg
        if style == "trace":
            ra, rg = ra * float(c.A.trace()), rg * float(c.G.trace())
        dense = torch.kron(c.G + rg * torch.eye(len(c.G)), c.A + ra * torch.eye(len(c.A)))   # row-major vec
        v = torch.randn(c.shape, dtype=torch.float64)
        want = torch.linalg.solve(dense, v.reshape(-1)).reshape(c.shape)
        assert_close(c.solve(v), want, rtol=1e-9, atol=1e-12, what=f"{unit.name} {style}")


def test_default_damping_styles_ignore_unit_sides_bit_for_bit(float64):
    torch.manual_seed(0)
    model = mlp(6, d_in=5, d_out=3, depth=1)
    opt = curvlab.optimizer(model, "kfac", damping=0.3, ema_decay=0.0)
    F.cross_entropy(model(torch.randn(7, 5)), torch.randint(0, 3, (7,))).backward()
    opt.update_curvature()
    c = opt.units[0].curvature
    pi = curvlab.estimators.kfac.trace_norm_pi(c.A, c.G)
    assert c.side_damping(0.3) == (pi * math.sqrt(0.3), math.sqrt(0.3) / pi)


# -- construction errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="kfac", damping_style="exact"), "conflicts with scaling='mup'"),
    (dict(estimator="shampoo", mup_damping="trace"), "applies to K-FAC only"),
    (dict(estimator="shampoo", shampoo_block_size=32), "shampoo_block_size"),
])
def test_incompatible_settings_fail_at_construction(kwargs, match):
    kwargs = dict(kwargs)
    est, rule = kwargs.pop("estimator"), kwargs.pop("rule", "natural")
    with pytest.raises(ValueError, match=match):
        curvlab.optimizer(mlp(64), est, rule, scaling="mup", **kwargs)


def test_unsupported_modules_and_estimators_are_refused_with_a_remedy():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="Embedding.*cannot infer"):
        curvlab.optimizer(model, "kfac", scaling="mup")

    @curvlab.register_estimator("test_mup_plain", overwrite=True)
    class Plain(curvlab.estimators.identity.Identity):
        """Test-only."""
    try:
        with pytest.raises(ValueError, match="register_mup_estimator"):
            curvlab.optimizer(mlp(64), "test_mup_plain", scaling="mup")
        mup.register_mup_estimator("test_mup_plain")(lambda layer, cfg: mup.Scale(lr_mult=2.0))
        assert {u.lr_mult for u in curvlab.optimizer(mlp(64), "test_mup_plain", scaling="mup").units} == {2.0}
    finally:
        curvlab.registry.ESTIMATORS._items.pop("test_mup_plain")
        mup.MUP_ESTIMATORS.pop("test_mup_plain", None)


def test_coord_check_command_writes_json_and_png(tmp_path, capsys):
    assert cli_main(["coord-check", "--estimator", "identity", "--scaling", "mup", "standard", "--widths", "16",
                     "32", "--steps", "2", "--set", "base_width=16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "scaling=mup" in out and "scaling=standard" in out and "max/min" in out
    assert (tmp_path / "coord_check.png").stat().st_size > 1000
    import json
    data = json.loads((tmp_path / "coord_check.json").read_text())
    assert [d["scaling"] for d in data] == ["mup", "standard"] and len(data[0]["rms"]["hidden"][1]) == 2
