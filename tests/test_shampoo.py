"""Shampoo (ALGORITHMS.md 1.3, 7.2 item 10) against independent references; float64 throughout."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.estimators.shampoo import NEWTON_TOL, inverse_root
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("float64")


def ref_root(m: torch.Tensor, e: float, damping: float, relative: bool) -> torch.Tensor:
    """``(m + eps I)^-e`` by scipy's Schur-Pade fractional power; eps from numpy's eigenvalues."""
    a = m.numpy()
    eps = damping * np.linalg.eigvalsh(a).max() if relative else damping
    return torch.from_numpy(np.real(scipy.linalg.fractional_matrix_power(a + eps * np.eye(len(a)), -e)))


def ref_diag(d: torch.Tensor, e: float, damping: float, relative: bool) -> torch.Tensor:
    return (d + (damping * d.max() if relative else damping)) ** (-e)


def batch(n: int, d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def step(model: nn.Module, opt, x, y) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One MSE step; returns (gradients, parameter changes)."""
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return grads, [p.detach() - b for p, b in zip(model.parameters(), before)]


def optimizer(model: nn.Module, **hyper):
    hyper = {"lr": 0.1, "momentum": 0.0, "loss": "mse", "kl_clip": None, **hyper}   # the bare step, no trust region
    return curvlab.optimizer(model, "shampoo", "natural", **hyper)


@pytest.mark.parametrize("d_out,d_in", [(8, 8), (5, 8), (8, 5)])
def test_one_step_is_the_polar_factor(d_out, d_in):
    """ALGORITHMS.md 7.2 item 10: L^-1/4 G R^-1/4 = U V^T for one gradient G = U S V^T and eps -> 0."""
    torch.manual_seed(0)
    model = nn.Linear(d_in, d_out, bias=False)
    opt = optimizer(model, ema_decay=0.0, damping=1e-14, lr=0.3)
    (grad,), (delta,) = step(model, opt, *batch(32, d_in, d_out, 1))
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    assert s.min() > 1e-3 * s.max(), "test needs a full-rank, well-conditioned gradient"
    assert_close(delta, -0.3 * u @ vh, rtol=1e-8, atol=1e-9, what="step vs -lr U V^T")


def stats_model(bias: bool = True, block_size: int = 1024, steps: int = 4, seed: int = 0, **hyper):
    """A Linear(6, 4) layer whose Shampoo statistics folded ``steps`` gradients (full rank)."""
    torch.manual_seed(seed)
    model = nn.Linear(6, 4, bias=bias)
    opt = optimizer(model, ema_decay=0.5, lr=0.0, inv_interval=1, shampoo_block_size=block_size, **hyper)
    for k in range(steps):
        step(model, opt, *batch(16, 6, 4, seed + 10 * k))
    return model, opt, opt.units[0].curvature


@pytest.mark.parametrize("exponent", [0.25, 0.5])
@pytest.mark.parametrize("epsilon", ["relative", "absolute"])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_roots_match_an_independent_reference(method, epsilon, exponent):
    damping = 1e-3 if epsilon == "relative" else 1e-4
    _, opt, curv = stats_model(shampoo_root_method=method, shampoo_epsilon=epsilon, shampoo_exponent=exponent,
                               damping=damping)
    rel = epsilon == "relative"
    tol = 1e-11 if method == "eigh" else 10 * NEWTON_TOL
    for key in ("L0,0", "R0,0"):
        ref = ref_root(curv.stats[key], exponent, damping, rel)
        assert_close(curv.roots[key], ref, rtol=tol, atol=tol * float(ref.abs().max()), what=f"{method} root {key}")
    ref_b = ref_diag(curv.stats["bias"], 2 * exponent, damping, rel)
    assert_close(curv.roots["bias"], ref_b, rtol=1e-12, what="bias diagonal root")
    v = torch.randn(4, 7)
    expected = torch.cat([ref_root(curv.stats["L0,0"], exponent, damping, rel) @ v[:, :6]
                          @ ref_root(curv.stats["R0,0"], exponent, damping, rel), (ref_b * v[:, 6]).unsqueeze(1)], 1)
    assert_close(curv.solve(v), expected, rtol=tol, atol=tol * float(expected.abs().max()), what="solve")
    assert not opt.events, [str(e) for e in opt.events]


def test_newton_falls_back_to_eigh_on_singular_statistics_and_reports():
    g = torch.randn(6, 2)
    singular = g @ g.T                          # rank 2: no inverse root without damping
    events = []
    root = inverse_root(singular, 0.25, 0.0, method="newton", layer="layer S", events=events)
    assert events and events[0].layer == "layer S" and "Newton" in events[0].what
    assert_close(root, inverse_root(singular, 0.25, 0.0), what="fallback = eigh pseudo-inverse root")
    evals, evecs = torch.linalg.eigh(singular)
    top = evecs[:, -2:]                          # the range: pseudo-inverse root acts as evals^-1/4 there
    assert_close(top.T @ root @ top, torch.diag(evals[-2:] ** -0.25), rtol=1e-8, atol=1e-10, what="on range")
    assert_close(root @ evecs[:, :4], torch.zeros(6, 4), atol=1e-10, what="null space")


@pytest.mark.parametrize("graft", ["sgd", "adagrad"])
def test_grafting_gives_the_grafted_step_norm_per_layer(graft):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    plain = copy.deepcopy(model)
    damping = 1e-3
    opt = optimizer(model, shampoo_grafting=graft, ema_decay=0.0, damping=damping, lr=0.1)
    opt_plain = optimizer(plain, ema_decay=0.0, damping=damping, lr=0.1)
    x, y = batch(16, 5, 3, 1)
    grads, deltas = step(model, opt, x, y)
    _, deltas_plain = step(plain, opt_plain, x, y)
    for layer in (0, 2):
        gw, gb = grads[layer], grads[layer + 1]
        g = torch.cat([gw, gb.unsqueeze(1)], 1)
        target = g if graft == "sgd" else g * ref_diag(g * g, 0.5, damping, True)
        d = torch.cat([deltas[layer], deltas[layer + 1].unsqueeze(1)], 1)
        dp = torch.cat([deltas_plain[layer], deltas_plain[layer + 1].unsqueeze(1)], 1)
        assert abs(float(d.norm() / (0.1 * target.norm())) - 1.0) < 1e-12, f"layer {layer} step norm"
        assert_close(d / d.norm(), dp / dp.norm(), rtol=1e-10, atol=1e-12, what=f"layer {layer} direction")


def test_blocking_splits_large_dimensions_into_independent_blocks():
    torch.manual_seed(0)
    model = nn.Linear(7, 5)
    whole, one_block = copy.deepcopy(model), copy.deepcopy(model)
    damping = 1e-2
    opt = optimizer(model, shampoo_block_size=3, ema_decay=0.0, damping=damping, lr=1.0)
    curv = opt.units[0].curvature
    assert [k for k, _, _ in curv.blocks] == ["0,0", "0,1", "0,2", "1,0", "1,1", "1,2"]
    x, y = batch(16, 7, 5, 2)
    (gw, gb), (dw, db) = step(model, opt, x, y)
    assert curv.stats["L1,2"].shape == (2, 2) and curv.stats["R1,2"].shape == (1, 1)
    expected = torch.empty(5, 7)
    for rows in (slice(0, 3), slice(3, 5)):
        for cols in (slice(0, 3), slice(3, 6), slice(6, 7)):
            gbk = gw[rows, cols]
            expected[rows, cols] = (ref_root(gbk @ gbk.T, 0.25, damping, True) @ gbk
                                    @ ref_root(gbk.T @ gbk, 0.25, damping, True))
    assert_close(-dw, expected, rtol=1e-10, atol=1e-12, what="blocked weight direction")
    assert_close(-db, gb * ref_diag(gb * gb, 0.5, damping, True), what="bias direction")
    deltas = {}
    for name, m, size in (("default", whole, 1024), ("one block", one_block, 7)):
        o = optimizer(m, shampoo_block_size=size, ema_decay=0.0, damping=damping, lr=1.0)
        assert len(o.units[0].curvature.blocks) == 1
        deltas[name] = step(m, o, x, y)[1]
    for a, b in zip(deltas["default"], deltas["one block"]):
        assert torch.equal(a, b), "block_size >= every dimension must equal the unblocked result"
    assert (deltas["default"][0] - dw).abs().max() > 1e-3, "blocking must change the direction here"


@pytest.mark.parametrize("block_size", [1024, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_solve_inverts_mv_and_dense_is_mv(block_size, bias):
    model, opt, curv = stats_model(bias=bias, block_size=block_size, steps=5, damping=1e-13)
    unit = opt.units[0]
    v = [torch.randn_like(p) for p in model.parameters()]
    back = unit.solve(unit.mv(v))
    for a, b in zip(back, v):
        assert_close(a, b, rtol=1e-6, atol=1e-8, what="solve(mv(V))")
    dense = curv.dense()
    flat = torch.cat([t.reshape(-1) for t in v])
    assert_close(dense @ flat, torch.cat([t.reshape(-1) for t in unit.mv(v)]), what="dense() vs mv")
    assert_close(dense, dense.T, what="dense() symmetric")
    assert float(torch.linalg.eigvalsh(dense).min()) > 0, "full-rank statistics give a positive definite C"


def test_refresh_never_modifies_the_statistics():
    _, opt, curv = stats_model(damping=0.1)
    saved = {k: v.clone() for k, v in curv.stats.items()}
    curv.refresh(0.1)
    roots = {k: v.clone() for k, v in curv.roots.items()}
    curv.refresh(0.1)
    for k in saved:
        assert torch.equal(curv.stats[k], saved[k]), f"statistic {k} changed by refresh (damping accumulated)"
    for k in roots:
        assert torch.equal(curv.roots[k], roots[k]), f"root {k} differs on the second refresh"


@pytest.mark.parametrize("mode", ["ema", "sum"])
def test_statistics_fold_by_ema_or_sum(mode):
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=True)
    opt = optimizer(model, shampoo_statistics=mode, ema_decay=0.9, lr=0.01)
    (g1, b1), _ = step(model, opt, *batch(8, 4, 3, 1))
    (g2, b2), _ = step(model, opt, *batch(8, 4, 3, 2))
    curv = opt.units[0].curvature
    w1, w2 = (1.0, 1.0) if mode == "sum" else (0.9, 0.1)
    assert_close(curv.stats["L0,0"], w1 * g1 @ g1.T + w2 * g2 @ g2.T, what="L")
    assert_close(curv.stats["R0,0"], w1 * g1.T @ g1 + w2 * g2.T @ g2, what="R")
    assert_close(curv.stats["bias"], w1 * b1 ** 2 + w2 * b2 ** 2, what="bias squares")


def test_conv2d_uses_the_two_dimensional_matrix_view():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten())
    opt = optimizer(model, ema_decay=0.0, damping=1e-2, lr=1.0)
    x = torch.randn(16, 2, 4, 4)
    (gw, gb), (dw, db) = step(model, opt, x, torch.randn(16, 27))
    g = gw.reshape(3, 8)
    expected = ref_root(g @ g.T, 0.25, 1e-2, True) @ g @ ref_root(g.T @ g, 0.25, 1e-2, True)
    assert_close(-dw, expected.reshape(3, 2, 2, 2), rtol=1e-10, atol=1e-12, what="conv weight direction")
    assert_close(-db, gb * ref_diag(gb * gb, 0.5, 1e-2, True), what="conv bias direction")


def test_state_dict_round_trip_resumes_identically():
    hyper = dict(lr=0.05, damping=1e-2, momentum=0.9, ema_decay=0.9, inv_interval=3, stat_interval=2,
                 shampoo_grafting="adagrad", shampoo_block_size=4, shampoo_statistics="sum")

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    model = make(0)
    opt = optimizer(model, **hyper)
    for k in range(4):
        step(model, opt, *batch(16, 5, 3, k))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for k in range(5):
        step(model, opt, *batch(16, 5, 3, 100 + k))
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2 = make(123)
    model2.load_state_dict(ckpt["model"])
    opt2 = optimizer(model2, **hyper)
    opt2.load_state_dict(ckpt["opt"])
    for k in range(5):
        step(model2, opt2, *batch(16, 5, 3, 100 + k))
    for (name, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume: max diff {float((p - q).abs().max())}"


@pytest.mark.parametrize("graft", [None, "sgd", "adagrad"])
@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("epsilon,damping", [("relative", 1e-3), ("relative", 0.0), ("absolute", 1e-3),
                                             ("absolute", 0.0)])
def test_a_layer_with_exactly_zero_gradient_gives_no_nan(epsilon, damping, method, graft):
    """Step 0 (statistics step): layer 0's gradient is exactly zero. Step 1 (no statistics, stat_interval=2):
    a normal gradient meets the all-zero statistics of layer 0; with a zero ridge its direction is zero
    (pseudo-inverse), never Inf/NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = optimizer(model, ema_decay=0.0, damping=damping, shampoo_epsilon=epsilon, shampoo_root_method=method,
                    shampoo_grafting=graft, stat_interval=2)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(16, 5, 3, 0)
    F.mse_loss(model(x), y).backward()
    model[0].weight.grad.zero_()
    model[0].bias.grad.zero_()
    opt.step()
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model[0].weight, before[0]) and torch.equal(model[0].bias, before[1])
    assert not torch.equal(model[2].weight, before[2]), "the other layer must still move"
    assert not [e for e in opt.events if e.layer.startswith("0 ")], "all-zero statistics need no fallback"
    step(model, opt, *batch(16, 5, 3, 1))
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if graft is None and (epsilon == "relative" or damping == 0.0):
        assert torch.equal(model[0].weight, before[0]), "zero statistics and zero ridge: zero direction"


def test_options_are_validated_and_only_the_gradient_is_captured():
    model = nn.Linear(3, 2)
    with pytest.raises(curvlab.HyperParameterError, match="shampoo_root_method='newton'.*shampoo_exponent=0.3"):
        optimizer(model, shampoo_root_method="newton", shampoo_exponent=0.3)
    with pytest.raises(curvlab.HyperParameterError, match="shampoo_grafting"):
        optimizer(model, shampoo_grafting="adam")
    for bad in (0.0, 1.5, "1/4"):
        with pytest.raises(curvlab.HyperParameterError, match="shampoo_exponent"):
            optimizer(model, shampoo_exponent=bad)
    opt = optimizer(model, shampoo_root_method="newton", shampoo_exponent=0.125)
    assert opt.estimator.captures() == {"grad"} and opt.capture is None
