"""EKFAC plugin tests: exact identities against curvlab.exact (float64), solve/mv/dense consistency, checkpoint.

Runs from the repo root with the project's venv (``python -m pytest plugins/curvlab-ekfac/tests``) and is
also collected by the main suite through ``tests/test_plugins.py``."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab import exact


@contextlib.contextmanager
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    diff = (actual - expected).abs()
    tol = atol * max(1.0, float(expected.abs().max())) + rtol * expected.abs()
    bad = diff > tol
    if bool(bad.any()):
        k = int(diff.flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), diff.shape))
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} entries off; worst at {idx}: "
                             f"actual {actual[idx].item():.6e} expected {expected[idx].item():.6e}")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))


def ekfac_after_one_batch(model, x, y, **hyper):
    opt = curvlab.optimizer(model, "ekfac", "natural", fisher="empirical", ema_decay=0.0, **hyper)
    F.cross_entropy(model(x), y).backward()
    assert opt.update_curvature()
    opt.refresh()
    return opt


def test_ekfac_is_registered_through_the_entry_point():
    assert "ekfac" in curvlab.ESTIMATORS.names()
    assert curvlab.ESTIMATORS.get("ekfac").__module__ == "curvlab_ekfac"


def test_scaling_is_the_exact_empirical_fisher_diagonal_in_the_kfac_eigenbasis():
    """George et al. eq. 10: s = diag(Q^T F_emp Q) with Q = Q_G (x) Q_A, for ANY batch size (here 9)."""
    with float64():
        model = mlp()
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(9, 5, generator=g), torch.randint(0, 4, (9,), generator=g)
        opt = ekfac_after_one_batch(model, x, y)
        ref = exact.exact_blocks("empirical", model, x, y, modules=["0", "2"])
        for unit in opt.units:
            curv = unit.curvature
            q = torch.kron(curv.QG, curv.QA)
            idx = curv.adapter.param_order(curv.module)  # param order -> row-major vec(Wbar) reorder
            f_wbar = torch.empty_like(ref[unit.name])
            f_wbar[idx[:, None], idx] = ref[unit.name]
            close(curv.s.reshape(-1), (q.T @ f_wbar @ q).diagonal(), f"layer {unit.name} scaling")


def test_single_datum_dense_equals_exact_empirical_fisher():
    """One datum: F_emp = (g g^T) (x) (a a^T) is Kronecker and diagonal in the K-FAC eigenbasis, so EKFAC is exact."""
    with float64():
        model = mlp(2)
        x, y = torch.randn(1, 5), torch.tensor([3])
        opt = ekfac_after_one_batch(model, x, y)
        ref = exact.exact_blocks("empirical", model, x, y, modules=["0", "2"])
        for name, block in opt.blocks().items():
            close(block, ref[name], f"block {name}")


def test_ekfac_is_not_kfac_on_a_batch():
    """Guard against a vacuous oracle: on a batch EKFAC differs from K-FAC (eigenvalues are corrected)."""
    with float64():
        model = mlp()
        x, y = torch.randn(16, 5), torch.randint(0, 4, (16,))
        e = ekfac_after_one_batch(model, x, y).blocks()
        model.zero_grad()
        k = curvlab.optimizer(model, "kfac", "natural", fisher="empirical", ema_decay=0.0)
        F.cross_entropy(model(x), y).backward()
        k.update_curvature()
        kb = k.blocks()
        assert float((e["0"] - kb["0"]).norm() / kb["0"].norm()) > 1e-3


def test_solve_inverts_damped_mv_and_dense_matches_mv():
    with float64():
        model = mlp(3)
        x, y = torch.randn(12, 5), torch.randint(0, 4, (12,))
        opt = ekfac_after_one_batch(model, x, y, damping=0.05)
        for unit in opt.units:
            curv = unit.curvature
            v = torch.randn(curv.shape)
            close(curv.solve(curv.mv(v) + 0.05 * v), v, f"{unit.name} solve(mv + lambda)")
            dense_wbar = torch.empty_like(curv.dense())
            idx = curv.adapter.param_order(curv.module)
            dense_wbar[idx[:, None], idx] = curv.dense()
            close(dense_wbar @ v.reshape(-1), curv.mv(v).reshape(-1), f"{unit.name} dense vs mv")


def test_every_fisher_type_and_conv_train_and_checkpoint_roundtrip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    for fisher in ("empirical", "mc", "type2"):
        opt = curvlab.optimizer(model, "ekfac", "natural", fisher=fisher, **curvlab.ESTIMATORS.get("ekfac").suggested)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert opt.skipped_steps == 0 and all(bool(torch.isfinite(p).all()) for p in model.parameters())
        sd = opt.state_dict()
        opt2 = curvlab.optimizer(model, "ekfac", "natural", fisher=fisher)
        opt2.load_state_dict(sd)
        v = torch.randn(opt.units[0].curvature.shape)
        close(opt2.units[0].curvature.solve(v), opt.units[0].curvature.solve(v), f"{fisher} reloaded solve")
        opt.capture.remove()
        opt2.capture.remove()
