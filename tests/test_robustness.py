"""Bad input gets a clear error; NaN/Inf never reaches parameters or curvature state."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.linalg import FactorizationError, spd_inverse


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(loss="cross-entropy"), ValueError, r"loss must be one of .*Did you mean 'cross_entropy'"),
    (dict(damping=-1e-3), ValueError, r"damping must be >= 0"),
    (dict(lr=float("nan")), ValueError, r"lr must be finite"),
    (dict(momentum=1.0), ValueError, r"momentum must lie in \[0, 1\)"),
    (dict(ema_decay=-0.1), ValueError, r"ema_decay"),
    (dict(inv_interval=0), ValueError, r"inv_interval must be >= 1"),
    (dict(stat_interval=2.5), TypeError, r"stat_interval must be an integer"),
    (dict(fisher="true"), ValueError, r"fisher must be one of"),
    (dict(kl_clip=0), ValueError, r"kl_clip must be > 0"),
    (dict(dampnig=1e-3), TypeError, r"unknown hyper-parameter 'dampnig'. Did you mean 'damping'"),
    (dict(damping_style="tikhonov"), ValueError, r"damping_style"),
])
def test_invalid_hyper_parameters_name_the_argument(kwargs, err, match):
    with pytest.raises(err, match=match):
        curvlab.optimizer(mlp(), "kfac", "natural", **kwargs)


def test_unknown_component_suggests_a_name():
    with pytest.raises(ValueError, match=r"unknown estimator 'kafc'. Did you mean 'kfac'"):
        curvlab.optimizer(mlp(), "kafc", "natural")
    with pytest.raises(ValueError, match=r"unknown rule 'natral'"):
        curvlab.optimizer(mlp(), "kfac", "natral")
    with pytest.raises(ValueError, match=r"unknown scaling"):
        curvlab.optimizer(mlp(), "kfac", "natural", scaling="mupp")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        curvlab.optimizer([torch.zeros(2)], "kfac", "natural")


def model_with_batchnorm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def test_strict_mode_names_the_unsupported_layer():
    with pytest.raises(curvlab.UnsupportedLayer, match=r"layer '1' \(BatchNorm1d\).*register_adapter.*strict=False"):
        curvlab.optimizer(model_with_batchnorm(), "kfac", "natural", strict=True)
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(curvlab.UnsupportedLayer, match="grouped convolution"):
        curvlab.optimizer(conv, "kfac", "natural", strict=True)


def test_unclaimed_parameters_get_the_first_order_fallback():
    model = model_with_batchnorm()
    opt = curvlab.optimizer(model, "kfac", "natural", lr=0.1, kl_clip=None)   # the KL clip would scale every unit
    cov = {c["name"]: c for c in opt.coverage()}
    assert cov["0"]["how"] == "kfac (Linear)" and cov["2"]["preconditioned"]
    assert "first-order fallback" in cov["1.weight"]["how"] and not cov["1.weight"]["preconditioned"]
    assert "BatchNorm1d" in opt.coverage_report()
    x, y = batch()
    ln_w = model[1].weight.detach().clone()
    F.cross_entropy(model(x), y).backward()
    g = model[1].weight.grad.clone()
    opt.step()
    assert torch.allclose(model[1].weight, ln_w - 0.1 * g)       # plain gradient step for the fallback


def test_weight_tying_is_refused():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = lin.weight
    with pytest.raises(ValueError, match="weight tying"):
        curvlab.optimizer(model, "kfac", "natural")


def test_cross_entropy_reads_classes_in_the_last_dimension():
    """(N, C, H, W) logits with torch's classes-in-dim-1 cross-entropy are refused by the loss check, naming the
    convention; with the classes moved last the same model trains."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 4, 4), torch.randint(0, 3, (2, 4, 4))
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1))
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="mc")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(curvlab.LossMismatch, match="classes in the LAST dimension"):
        opt.step()
    last = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), Permute())
    opt = curvlab.optimizer(last, "kfac", "natural", fisher="mc")
    F.cross_entropy(last(x).reshape(-1, 3), y.reshape(-1)).backward()
    opt.step()
    assert opt.step_count == 1


class Permute(nn.Module):
    def forward(self, x):
        return x.movedim(1, -1)


@pytest.mark.parametrize("fisher", ["empirical", "mc", "type2"])
def test_inplace_activation_after_a_layer_gives_the_same_statistics(fisher):
    x, y = batch()
    factors = {}
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3))
        opt = curvlab.optimizer(model, "kfac", "natural", fisher=fisher, ema_decay=0.0, seed=1)
        F.cross_entropy(model(x), y).backward()
        opt.update_curvature()
        factors[inplace] = [(u.curvature.A, u.curvature.G) for u in opt.units]
    for (a0, g0), (a1, g1) in zip(factors[False], factors[True]):
        assert torch.equal(a0, a1) and torch.allclose(g0, g1, rtol=1e-6, atol=1e-7)


def test_nan_gradients_skip_the_step_and_are_logged(caplog):
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", lr=0.1)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.units[0].curvature.state_dict().items() if torch.is_tensor(v)}
    opt.zero_grad()
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="curvlab"):
        F.cross_entropy(model(x_bad), y).backward()
        opt.step()
    assert "skipped step 1" in caplog.text and "non-finite gradients" in caplog.text
    assert opt.skipped_steps == 1 and opt.step_count == 1
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q) and torch.isfinite(p).all()
    for k, v in state.items():
        assert torch.equal(opt.units[0].curvature.state_dict()[k], v), f"curvature {k} changed"
    opt.zero_grad()                                          # training goes on afterwards
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.step_count == 2


def test_nan_statistics_skip_even_when_gradients_are_finite():
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural")
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    opt.capture._records["0"][0].uses[0].inputs[0, 0] = float("inf")   # corrupt only the captured statistics
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.skipped_steps == 1 and opt.units[0].curvature.A is None
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_nonfinite_raise_policy():
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", nonfinite="raise")
    x, y = batch()
    x[0, 0] = float("inf")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(FloatingPointError, match="non-finite gradients"):
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_factorization_falls_back_and_reports():
    events = []
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])        # eigenvalues 3, -1: Cholesky fails
    inv = spd_inverse(indefinite, "layer X", events)
    assert torch.isfinite(inv).all()
    assert events and events[-1].layer == "layer X" and "eigendecomposition" in events[-1].what
    singular = torch.zeros(3, 3)
    singular[0, 0] = 1.0
    events.clear()
    inv = spd_inverse(singular, "layer Y", events)
    assert torch.isfinite(inv).all() and "jitter" in events[-1].what
    with pytest.raises(FactorizationError, match="layer 'Z'.*NaN"):
        spd_inverse(torch.full((2, 2), float("nan")), "Z")


def test_zero_damping_on_rank_deficient_factors_still_steps():
    """N=1 gives rank-1 factors; with damping 0 the inverse needs the fallback ladder, never NaN."""
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", damping=0.0, lr=1e-3, fisher="type2")
    x, y = batch(1)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.events, "a fallback must be reported for singular factors"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_forward_under_no_grad_then_backward_is_explained():
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural")
    x, y = batch()
    with curvlab.capture.paused():
        F.cross_entropy(model(x), y).backward()
    with pytest.warns(curvlab.CaptureWarning, match="saw no forward"):
        opt.step()


def test_layers_option_restricts_preconditioning():
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", layers=["2"])
    cov = {c["name"]: c for c in opt.coverage()}
    assert cov["2"]["preconditioned"] and not cov["0.weight"]["preconditioned"]
    assert "not selected by the `layers` option" in cov["0.weight"]["how"]
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(ValueError, match=r"layers: no module named \['3'\]"):
        curvlab.optimizer(mlp(), "kfac", "natural", layers=["3"])
    with pytest.raises(ValueError, match="list of module names"):
        curvlab.optimizer(mlp(), "kfac", "natural", layers="2")

