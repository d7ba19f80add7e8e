"""The step's fast paths (foreach momentum plan, scaled updates, global norm) against per-tensor references
written from the rules' definitions, in float64 (README "Performance")."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.rules import Plan
from curvlab.units import global_norm, inner

from helpers import assert_close

pytestmark = pytest.mark.usefixtures("float64")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(k):
    g = torch.Generator().manual_seed(k)
    return torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)


def reference_run(model, rule, groups, wd_style, steps):
    """theta, m by the definitions: natural m <- mu m + d; sngm m <- mu m + d/||d||; theta -= lr m (+ decoupled)."""
    bufs: dict[int, torch.Tensor] = {}
    for k in range(steps):
        x, y = batch(k)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            entries = []
            for g in groups:
                for p in g["params"]:
                    d = p.grad.clone()
                    if g["wd"] and wd_style == "coupled":
                        d = d + g["wd"] * p
                    entries.append((g, p, d))
            scale = 1.0
            if rule == "sngm":
                scale = 1.0 / float(torch.sqrt(sum((d * d).sum() for _, _, d in entries)))
            for g, p, d in entries:
                m = scale * d
                if g["mu"] or rule == "sngm":
                    m = m if id(p) not in bufs else g["mu"] * bufs[id(p)] + m
                    bufs[id(p)] = m
                p -= g["lr"] * m
                if g["wd"] and wd_style == "decoupled":
                    p -= g["lr"] * g["wd"] * (p + g["lr"] * m)          # decay of the pre-step theta
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("rule", ["natural", "sngm"])
@pytest.mark.parametrize("wd_style", ["coupled", "decoupled"])
@pytest.mark.parametrize("mus", [(0.9, 0.9), (0.0, 0.5)])
def test_identity_step_matches_the_definition(rule, wd_style, mus):
    """Per-group lr / momentum / weight decay (two groups, one with momentum 0) over 4 steps, to 1e-12."""
    model = mlp()
    ref_model = mlp()
    first = list(model[0].parameters())
    rest = [p for m in (model[2], model[4]) for p in m.parameters()]
    key = "sngm_weight_decay" if rule == "sngm" else "weight_decay_style"
    opt = curvlab.optimizer(model, "identity", rule, lr=0.05, momentum=mus[0], weight_decay=1e-2, **{key: wd_style})
    # a second parameter group with other hyper-parameters: rebuild the groups by hand
    opt.param_groups[0]["params"] = first
    opt.add_param_group({"params": rest, "lr": 0.02, "momentum": mus[1], "weight_decay": 0.0})
    opt._bind_groups()
    ref_first = list(ref_model[0].parameters())
    ref_rest = [p for m in (ref_model[2], ref_model[4]) for p in m.parameters()]
    groups = [{"params": ref_first, "lr": 0.05, "mu": mus[0], "wd": 1e-2},
              {"params": ref_rest, "lr": 0.02, "mu": mus[1], "wd": 0.0}]
    for k in range(4):
        x, y = batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    want = reference_run(ref_model, rule, groups, wd_style, 4)
    for p, q in zip(model.parameters(), want):
        assert_close(p, q, rtol=1e-12, atol=1e-14, what=f"{rule} {wd_style} {mus}")


def test_global_norm_is_the_weighted_euclidean_norm():
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(4, 3, generator=g), torch.randn(3, generator=g)]
    b = [torch.randn(7, generator=g)]
    want = torch.sqrt(0.25 * inner(a, a) + 9.0 * inner(b, b))
    assert_close(global_norm([(0.5, a), (-3.0, b)]), want, rtol=1e-14, atol=0, what="weighted norm")
    assert_close(global_norm([(1.0, a), (1.0, b)]), torch.sqrt(inner(a, a) + inner(b, b)), rtol=1e-14, atol=0,
                 what="plain norm")


def test_plan_scaled_updates_apply_and_materialize():
    p, q = torch.ones(3), torch.zeros(2)
    t, u = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])
    plan = Plan(scaled=[(p, t, -0.5), (q, u, 2.0)])
    deltas = dict((id(k), v) for k, v in plan.deltas())
    assert_close(deltas[id(p)], -0.5 * t, rtol=0, atol=0, what="materialized delta")
    assert [x is t or x is u for x in plan.tensors()] == [True, True]
    state: dict = {}
    plan.apply(state)
    assert_close(p, 1.0 - 0.5 * t, rtol=0, atol=0, what="p")
    assert_close(q, 2.0 * u, rtol=0, atol=0, what="q")
    assert torch.equal(t, torch.tensor([1.0, 2.0, 3.0])), "the scaled tensor must not be modified"


@pytest.mark.parametrize("rows", [5, 300])
def test_homogeneous_gram_is_the_gram_of_the_padded_rows(rows):
    """A = [x 1]^T [x 1] blockwise (no copy) equals the reference on the padded matrix, below and above the
    paneled gram's width threshold."""
    from curvlab.kernels import homogeneous_gram
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, rows, generator=g)
    padded = torch.cat([x, torch.ones(37, 1)], dim=1)
    assert_close(homogeneous_gram(x, 0.3), 0.3 * padded.T @ padded, rtol=1e-13, atol=1e-13, what="A")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_factors_without_the_homogeneous_copy(approx):
    """kron_factors through the raw rows equals the factors from the homogeneous rows (Linear on sequences)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = curvlab.optimizer(model, "kfac", fisher="empirical", kfac_approx=approx)
    x, y = torch.randn(4, 7, 6), torch.randint(0, 3, (4, 7))
    F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
    stats = opt._collect_stats()
    for s in stats.values():
        assert s._raw_inputs is not None
        a_fast, g_fast = s.kron_factors("real", approx)
        s.__dict__.pop("_raw_inputs")
        s.input_rows()                                    # homogeneous rows formed: the reference path
        assert s._raw_inputs is None
        a_ref, g_ref = s.kron_factors("real", approx)
        assert_close(a_fast, a_ref, rtol=1e-13, atol=1e-14, what=f"A {s.name}")
        assert_close(g_fast, g_ref, rtol=0, atol=0, what=f"G {s.name}")


def test_kfac_ema_in_place_matches_the_formula_and_spares_the_callers_tensors():
    from curvlab.estimators.kfac import KroneckerCurvature
    torch.manual_seed(2)
    model = nn.Linear(3, 2)
    opt = curvlab.optimizer(model, "kfac")
    curv = opt.units[0].curvature
    assert isinstance(curv, KroneckerCurvature)
    news = [{"A": torch.randn(4, 4), "G": torch.randn(2, 2)} for _ in range(4)]
    copies = [{k: v.clone() for k, v in n.items()} for n in news]
    want = None
    for new in news:
        curv.accumulate(new, 0.9)
        want = {k: v.clone() for k, v in new.items()} if want is None else \
            {k: 0.9 * want[k] + 0.1 * new[k] for k in new}
    for k in ("A", "G"):
        assert_close(getattr(curv, k), want[k], rtol=1e-13, atol=1e-14, what=k)
    assert all(torch.equal(n[k], c[k]) for n, c in zip(news, copies) for k in n), "statistics were modified"


def test_kfac_solve_with_the_padded_inverse_equals_the_plain_product():
    """A layer of 200 inputs + bias (201 columns, padded to 208 in solve) against G_d^-1 V A_d^-1."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(200, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = curvlab.optimizer(model, "kfac", fisher="empirical", damping=1e-2)
    x, y = torch.randn(50, 200), torch.randint(0, 3, (50,))
    F.cross_entropy(model(x), y).backward()
    opt.update_curvature()
    opt.refresh()
    curv = opt.units[0].curvature
    inv = curv.inverses
    assert curv._padded_factor(inv["A_inv"], "A_inv").shape == (208, 208)
    V = torch.randn(6, 201, generator=torch.Generator().manual_seed(1))
    expected = inv["G_inv"] @ V @ inv["A_inv"]
    # the association (and BLAS blocking with the thread count) differs: entries near 0 get an absolute bound at
    # the float64 rounding of the product's scale
    assert_close(curv.solve(V), expected, rtol=1e-12, atol=1e-13 * float(expected.abs().max()), what="padded solve")
    opt.refresh()                                   # a new inverse: the padded copy follows it
    assert curv._padded_factor(curv.inverses["A_inv"], "A_inv")[:201, :201].equal(curv.inverses["A_inv"])


def test_kfac_mv_with_the_padded_factor_follows_the_in_place_ema():
    """``mv`` pads ``A`` (201 -> 208 columns) like ``solve`` pads its inverse; the EMA updates ``A`` in place, and the
    cached padded copy must follow it (keyed on the tensor's version, not only its identity)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(200, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = curvlab.optimizer(model, "kfac", fisher="empirical", damping=1e-2, ema_decay=0.9)
    curv = opt.units[0].curvature
    V = torch.randn(6, 201, generator=torch.Generator().manual_seed(2))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(50, 200, generator=g), torch.randint(0, 3, (50,), generator=g)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.update_curvature()
        expected = curv.G @ V @ curv.A
        assert_close(curv.mv(V), expected, rtol=1e-12, atol=1e-13 * float(expected.abs().max()), what="padded mv")
        assert curv._padded_factor(curv.A, "A")[:201, :201].equal(curv.A)


def test_every_peer_has_a_cost_note():
    from curvlab.bench.peers import COST_NOTES, PEERS
    assert set(COST_NOTES) == set(PEERS)
    assert all(note.startswith(("cheaper", "dearer", "not the same")) for note in COST_NOTES.values())


def test_shampoo_newton_in_the_statistics_dtype():
    """shampoo_newton_dtype='statistics': a float32 statistic gets its root from a float32 Newton iteration (to
    max|M - I| <= 1e-6), within float32 accuracy of the float64 eigh root; a float64 one is computed exactly as
    with the float64 default."""
    from curvlab.estimators.shampoo import inverse_root
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 40, generator=g)
    mat = x.T @ x / 300
    ref = inverse_root(mat, 0.25, 1e-3, method="eigh")
    low = inverse_root(mat.float(), 0.25, 1e-3, method="newton", newton_dtype="statistics")
    assert low.dtype == torch.float64
    assert float((low - ref).abs().max() / ref.abs().max()) < 1e-4
    same = inverse_root(mat, 0.25, 1e-3, method="newton", newton_dtype="statistics")
    assert torch.equal(same, inverse_root(mat, 0.25, 1e-3, method="newton"))
    assert_close(same, ref, rtol=1e-8, atol=1e-9, what="float64 Newton root")


def test_miniblock_solve_of_a_non_contiguous_matrix():
    """The column-slice fast path of MBF's solve takes strided inputs (an embedding's transposed view)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = curvlab.optimizer(model, "miniblock", miniblock_mode="chunked", miniblock_chunk=3, damping=0.1)
    F.cross_entropy(model(torch.randn(20, 6)), torch.randint(0, 3, (20,))).backward()
    opt.update_curvature()
    opt.refresh()
    curv = opt.units[0].curvature
    v = torch.randn(7, 5).T                                   # (5, 7), not contiguous
    assert_close(curv.solve(v), curv.solve(v.contiguous()), rtol=0, atol=0, what="strided solve")
