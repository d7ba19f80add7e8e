"""FOP's fast path (curvlab.rules.fop): the rule works on each layer's matrix view, takes the scalars of (F.2)-(F.6)
without a host sync per scalar and forms no ``g_comb``; it must equal the plain formula (parameter-shaped tensors,
one ``float(inner(...))`` per scalar, as the rule computed it before) in float64 to ~1e-12, for every estimator with
``mv``, both metrics, both ``g_tot``, coupled weight decay and the data-parallel halves (which go through the same
code)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.rules.fop import fop_terms
from curvlab.units import inner
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("float64")


def reference_terms(unit, g1, g2, gtot="avg", tau=1e-10, metric="undamped"):
    """(F.1)-(F.7) exactly as written in the module doc (the rule's formula before the fast path)."""
    ga = [(a + b) * 0.5 for a, b in zip(g1, g2)]
    gd = [a - b for a, b in zip(g1, g2)]
    fga = unit.damped_mv(ga) if metric == "damped" else unit.mv(ga)
    quad = inner(ga, fga)
    eps = 1e-12 * abs(float(quad)) + 1e-300
    s = float(inner(gd, fga) / (quad + eps))
    gp = [d - s * a for d, a in zip(gd, ga)]
    pa, pp = unit.solve(ga), unit.solve(gp)
    a_, d_, e_ = float(inner(ga, pa)), float(inner(ga, pp)), float(inner(gp, pp))
    beta = d_ / e_ if e_ > tau * abs(a_) and e_ > 0 else 0.0
    pc = [x + beta * y for x, y in zip(pa, pp)]
    gc = [x + beta * y for x, y in zip(ga, gp)]
    target = ga if gtot == "avg" else [a + b for a, b in zip(g1, g2)]
    denom = float(inner(gc, pc))
    eta = float(inner(target, pc)) / denom if denom > 0 else 1.0
    return ga, gp, (s, beta, eta), [eta * x for x in pc]


def model_and_batch(seed=0, norm=True):
    """A convolution, a linear layer, a LayerNorm (its own small curvature block; no ``damped_mv``) and a head."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 7),
                          nn.LayerNorm(7) if norm else nn.Identity(), nn.Tanh(), nn.Linear(7, 4))
    g = torch.Generator().manual_seed(seed)
    return model, torch.randn(13, 2, 4, 4, generator=g), torch.randint(0, 4, (13,), generator=g)


def prepared(estimator, **hyper):
    model, x, y = model_and_batch(norm=hyper.get("fop_metric") != "damped")
    fisher = "empirical" if estimator == "miniblock" else "type2"
    hyper = {"weight_decay": 0.01, **hyper}
    opt = curvlab.optimizer(model, estimator, "fop", damping=0.05, fisher=fisher, ema_decay=0.0, **hyper)
    F.cross_entropy(model(x), y).backward()
    stats = opt._collect_stats()
    assert opt._accumulate(stats)
    opt.refresh()
    return opt, stats


def reference_directions(opt, halves):
    """The rule's loop before the fast path: parameter-shaped halves, coupled decay, :func:`reference_terms`."""
    cfg, out = opt.rule.config, {}
    with torch.no_grad():
        for unit in opt.units:
            out[unit.name] = _reference_unit(unit, *halves[unit.name], cfg)
    return out


def _reference_unit(unit, m1, m2, cfg):
    g1, g2 = decayed(unit, m1), decayed(unit, m2)
    return reference_terms(unit, g1, g2, cfg["fop_gtot"], cfg["fop_tau"], cfg["fop_metric"])


def decayed(unit, m):
    """Parameter-shaped half gradient with the coupled weight decay, as the rule forms it."""
    wd = unit.hyper("weight_decay")
    return [t.to(p.dtype).add(p, alpha=wd) for t, p in zip(unit.adapter.from_matrix(unit.module, m), unit.params)]


def assert_matches(opt, dirs, ref):
    assert [u.name for u, _, _ in dirs] == list(ref)
    for unit, g_avg, direction in dirs:
        ga, _, scalars, want = ref[unit.name]
        assert unit.matrix_native
        for what, got, exp in (("g_avg", g_avg, ga), ("direction", direction, want)):
            scale = max(float(t.abs().max()) for t in exp)
            for a, b in zip(got, exp):
                assert_close(a, b, rtol=1e-12, atol=1e-13 * scale, what=f"{what} of {unit.name}")
        diag = opt.rule.last_diagnostics[unit.name]
        for key, value in zip(("s", "beta", "eta"), scalars):
            assert diag[key] == pytest.approx(value, rel=1e-11, abs=1e-13), (unit.name, key)


CASES = [("kfac", {}), ("kfac", {"weight_decay": 0.0}), ("kfac", {"fop_metric": "damped"}), ("kfac", {"fop_gtot": "sum"}),
         ("kfac", {"damping_style": "exact"}), ("isaac", {"fop_metric": "damped"}), ("ekfac", {}),
         ("shampoo", {}), ("miniblock", {}), ("identity", {})]


@pytest.mark.parametrize("estimator, hyper", CASES, ids=[f"{e}-{h}" for e, h in CASES])
def test_matrix_path_equals_the_plain_formula(estimator, hyper):
    opt, stats = prepared(estimator, **hyper)
    halves = {u.name: stats[u.name].sub_batch_grads() for u in opt.units}
    ref = reference_directions(opt, halves)
    with torch.no_grad():                         # as in the optimizer's step
        dirs = opt.rule.directions(opt.units, stats)
    assert_matches(opt, dirs, ref)
    # the parameter-shaped entry point (the rule's fallback for units whose parameters are not in the curvature's
    # dtype) is the same arithmetic
    for unit in opt.units:
        g1, g2 = (decayed(unit, m) for m in halves[unit.name])
        with torch.no_grad():
            terms = fop_terms(unit, g1, g2, opt.rule.config["fop_gtot"], metric=opt.rule.config["fop_metric"])
        _, gp, scalars, want = ref[unit.name]
        for a, b in zip(terms.direction + terms.g_perp, want + gp):
            assert_close(a, b, rtol=1e-12, atol=1e-13 * float(b.abs().max()), what=f"fop_terms of {unit.name}")
        assert (terms.s, terms.beta, terms.eta) == pytest.approx(scalars, rel=1e-11, abs=1e-13)


class Halves:
    """Stands in for :class:`curvlab.distributed.DataParallel`: the even / odd ranks' mean gradients."""

    def __init__(self, halves):
        self.halves = halves

    def fop_halves(self, units, stats):
        return {name: (a.clone(), b.clone()) for name, (a, b) in self.halves.items()}    # new each step, as there


@pytest.mark.parametrize("estimator, wd", [("kfac", 0.0), ("kfac", 0.01), ("shampoo", 0.01)])
def test_data_parallel_halves_take_the_same_path(estimator, wd):
    opt, stats = prepared(estimator, weight_decay=wd)
    halves = {}
    for unit in opt.units:                        # halves unlike the single-process split (another weighting)
        m1, m2 = stats[unit.name].sub_batch_grads()
        halves[unit.name] = (0.8 * m1 + 0.3 * m2, m2 - 0.2 * m1)
    opt.rule.dist = Halves(halves)
    with torch.no_grad():
        dirs = opt.rule.directions(opt.units, stats)
    assert_matches(opt, dirs, reference_directions(opt, halves))


def test_zero_average_gradient_gives_a_zero_step_in_float32():
    """(F.2)'s guard: with ``g_avg = 0`` the denominator is 0; its floor (1e-300, below float32's range) is the
    dtype's smallest normal number in float32, so ``s = 0`` and the step is 0 rather than NaN."""
    model, x, y = model_and_batch()
    model = model.float()
    opt = curvlab.optimizer(model, "kfac", "fop", damping=0.05, fisher="type2", ema_decay=0.0)
    F.cross_entropy(model(x.float()), y).backward()
    stats = opt._collect_stats()
    assert opt._accumulate(stats)
    opt.refresh()
    unit = opt.units[0]
    g = [torch.randn_like(p) for p in unit.params]
    terms = fop_terms(unit, g, [-t for t in g])
    assert (terms.s, terms.beta, terms.eta) == (0.0, 0.0, 1.0)
    assert all(bool((d == 0).all()) for d in terms.direction)


@pytest.mark.parametrize("shape", [(11, 5), (7, 3, 5)], ids=["rows", "sequence"])
def test_sub_batch_grads_without_the_homogeneous_copy(shape):
    """The half-batch gradients from the raw inputs (``g^T x`` and the bias column ``g^T 1``) equal the product with
    the homogeneous rows ``g^T [x 1]`` (what they were computed from before), odd batch, one or several rows each."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    opt = curvlab.optimizer(model, "kfac", "fop", damping=0.05, fisher="empirical")
    x = torch.randn(*shape)
    F.mse_loss(model(x), torch.zeros(*shape[:-1], 4)).backward()
    stats = opt._collect_stats()
    for unit in opt.units:
        st = stats[unit.name]
        fast = st.sub_batch_grads()
        assert st._raw_inputs is not None and "_inputs" not in st.__dict__     # the raw path was taken
        (g, _), = st.output_rows("real")
        a, n = st.input_rows(), shape[0]
        for got, sl in zip(fast, (slice(0, (n + 1) // 2), slice((n + 1) // 2, n))):
            want = g[sl].reshape(-1, g.shape[-1]).T @ a[sl].reshape(-1, a.shape[-1]) / g[sl].shape[0]
            assert_close(got, want, rtol=1e-12, atol=1e-15, what=f"half-batch gradient of {unit.name}")
