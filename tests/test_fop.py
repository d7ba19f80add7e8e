"""FOP (ALGORITHMS.md 2.1, 7.2 item 5): orthogonality, optimality of beta*, range of eta*, reduction to the
natural step, and sub-batch gradients from one backward. float64."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.rules.fop import fop_terms
from curvlab.units import inner
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("float64")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4))


def batch(n=12, seed=0, image=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g) if image else torch.randn(n, 5, generator=g)
    return x, torch.randint(0, 4, (n,), generator=g)


def terms_after_one_backward(model, x, y, estimator="kfac", **hyper):
    opt = curvlab.optimizer(model, estimator, "fop", damping=0.05, fisher="type2", ema_decay=0.0, **hyper)
    F.cross_entropy(model(x), y).backward()
    stats = opt._collect_stats()
    assert opt._accumulate(stats)
    opt.refresh()
    out = {}
    for unit in opt.units:
        m1, m2 = stats[unit.name].sub_batch_grads()
        g1, g2 = unit.adapter.from_matrix(unit.module, m1), unit.adapter.from_matrix(unit.module, m2)
        out[unit.name] = (unit, g1, g2, fop_terms(unit, g1, g2))
    return out, opt


@pytest.mark.parametrize("make, image", [(mlp, False), (cnn, True)])
def test_sub_batch_gradients_from_one_backward_match_autograd(make, image):
    model = make()
    x, y = batch(11, image=image)                     # odd N: halves of 6 and 5
    terms, _ = terms_after_one_backward(model, x, y)
    for sl, idx in ((slice(0, 6), 1), (slice(6, 11), 2)):
        ref = torch.autograd.grad(F.cross_entropy(model(x[sl]), y[sl]), list(model.parameters()))
        k = 0
        for name, (unit, *gs, _) in terms.items():
            for g in gs[idx - 1]:
                assert_close(g, ref[k], what=f"half {idx} gradient of {name}")
                k += 1


@pytest.mark.parametrize("estimator", ["kfac", "identity"])
def test_projection_is_fisher_orthogonal_and_beta_is_optimal(estimator):
    model = mlp()
    x, y = batch(16)
    terms, _ = terms_after_one_backward(model, x, y, estimator)
    for name, (unit, g1, g2, t) in terms.items():
        assert abs(float(inner(t.g_avg, unit.mv(t.g_perp)))) <= 1e-10 * float(
            inner(t.g_avg, unit.mv(t.g_avg)).abs().sqrt() * inner(t.g_perp, unit.mv(t.g_perp)).abs().sqrt()) + 1e-15

        def J(beta):      # -(g1+g2)^T M^-1 g_comb + 1/2 g_comb^T M^-1 g_comb  (2.1)
            gc = [a + beta * b for a, b in zip(t.g_avg, t.g_perp)]
            pc = unit.solve(gc)
            return float(-inner([a + b for a, b in zip(g1, g2)], pc) + 0.5 * inner(gc, pc))

        for delta in (1e-3, 1e-1, 1.0):
            assert J(t.beta) <= J(t.beta + delta) and J(t.beta) <= J(t.beta - delta), name
        assert 1.0 / 3.0 - 1e-12 <= t.eta <= 1.0 + 1e-12, f"eta* = {t.eta} outside [1/3, 1] for {name}"


def test_gtot_sum_doubles_eta():
    model = mlp()
    x, y = batch(16)
    terms, _ = terms_after_one_backward(model, x, y)
    for unit, g1, g2, t in terms.values():
        assert fop_terms(unit, g1, g2, gtot="sum").eta == pytest.approx(2 * t.eta, rel=1e-12)


@pytest.mark.parametrize("estimator", ["kfac", "identity"])
def test_identical_halves_give_the_natural_step(estimator):
    x, y = batch(8)
    x, y = torch.cat([x, x]), torch.cat([y, y])
    models, results = {}, {}
    base = mlp()
    for rule in ("fop", "natural"):
        model = copy.deepcopy(base)
        opt = curvlab.optimizer(model, estimator, rule, lr=0.1, damping=0.05, momentum=0.9, fisher="empirical")
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        models[rule], results[rule] = model, opt
    for p, q in zip(models["fop"].parameters(), models["natural"].parameters()):
        assert_close(p, q, rtol=1e-9, atol=1e-12, what="FOP vs natural with identical halves")
    assert all(d["beta"] == 0.0 and d["eta"] == pytest.approx(1.0) for d in results["fop"].rule.last_diagnostics.values())


def test_fop_trains_and_uses_one_backward_per_step():
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "fop", lr=0.1, damping=0.05, stat_interval=3, inv_interval=3)
    calls = {"n": 0}
    model[2].register_full_backward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    losses = []
    for k in range(12):
        x, y = batch(32, seed=k % 3)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # one user backward per step, plus one MC backward on each statistics step (4 of 12): no extra passes
    assert calls["n"] == 12 + 4


def test_fop_needs_an_estimator_with_mv():
    @curvlab.register_estimator("test_no_mv", overwrite=True)
    class NoMV(curvlab.Estimator):
        """Test-only: provides solve but not mv."""
        provides = frozenset({"solve"})

    try:
        with pytest.raises(ValueError, match=r"rule 'fop' needs the curvature operations \['mv'\].*test_no_mv"):
            curvlab.optimizer(mlp(), "test_no_mv", "fop")
    finally:
        curvlab.ESTIMATORS._items.pop("test_no_mv")
