"""ISAAC's two-parameter zeta (Petersen et al., ICLR 2023, eq. I.2; ALGORITHMS.md 6.1) against the dense formula in
float64, its lambda_g -> inf limit (today's zeta*, eq. I.6) and its curvature C (solve = lambda_a (C + lambda_a I)^-1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab


def setup(lam_g, branch="auto", n=6, bias="plain", **extra):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(n, 7), torch.randint(0, 4, (n,))
    opt = curvlab.optimizer(model, "isaac", damping=0.3, fisher="empirical", isaac_lambda_g=lam_g,
                            isaac_branch=branch, isaac_bias=bias, **extra)
    acts = {}

    def keep(module, inputs, output):
        output.retain_grad()
        acts.update(x=inputs[0], z=output)

    model[0].register_forward_hook(keep)
    F.cross_entropy(model(x), y).backward()
    opt.update_curvature()
    opt.refresh()
    return model, opt, acts, n


@pytest.mark.parametrize("branch", ["woodbury", "direct"])
@pytest.mark.parametrize("lam_g", [1e-3, 0.7, 50.0])
def test_two_parameter_zeta_equals_the_dense_formula(float64, branch, lam_g):
    """zeta = lambda_g lambda_a (Gbar^T Gbar/b + lambda_g I)^-1 grad_W (X^T X/b + lambda_a I)^-1 with Gbar the
    per-example output gradients (empirical Fisher: real labels, N * grad_output) and b = N; bias plain."""
    model, opt, acts, n = setup(lam_g, branch)
    x, gout = acts["x"], acts["z"].grad                     # gout: gradient of the MEAN loss, carries 1/N
    gbar = n * gout
    G = gbar.T @ gbar / n
    A = x.T @ x / n
    grad_w = gout.T @ x
    lam_a = 0.3
    want = lam_g * lam_a * torch.linalg.solve(G + lam_g * torch.eye(5), grad_w) @ torch.linalg.inv(
        A + lam_a * torch.eye(7))
    unit = opt.units[0]
    got_w, got_b = unit.solve([model[0].weight.grad, model[0].bias.grad])
    torch.testing.assert_close(got_w, want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got_b, model[0].bias.grad, rtol=0, atol=0)      # plain bias: unchanged


def test_lambda_g_to_infinity_recovers_zeta_star(float64):
    model, star, _, _ = setup(None)
    v = [model[0].weight.grad, model[0].bias.grad]
    want = star.units[0].solve(v)
    _, big, _, _ = setup(1e12)
    got = big.units[0].solve(v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-15)
    _, mid, _, _ = setup(1.0)
    assert (mid.units[0].solve(v)[0] - want[0]).norm() > 1e-3 * want[0].norm()      # finite lambda_g differs


@pytest.mark.parametrize("bias", ["plain", "homogeneous"])
def test_solve_is_lambda_a_times_the_damped_inverse_of_dense(float64, bias):
    """C = I (x) A + G (x) (A + lambda_a I) / lambda_g (module doc): solve = lambda_a (C + lambda_a I)^-1, mv = C."""
    model, opt, _, _ = setup(0.5, bias=bias)
    unit = opt.units[0]
    c = unit.curvature.dense()
    v = [torch.randn_like(p) for p in unit.params]
    flat = torch.cat([t.reshape(-1) for t in v])
    want = 0.3 * torch.linalg.solve(c + 0.3 * torch.eye(len(c)), flat)
    got = torch.cat([t.reshape(-1) for t in unit.solve(v)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in unit.mv(v)]), c @ flat, rtol=1e-12, atol=1e-14)


def test_two_parameter_zeta_trains_and_is_refused_where_it_cannot_apply():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    opt = curvlab.optimizer(model, "isaac", isaac_lambda_g=1.0, lr=0.5, fisher="mc", seed=0)
    first = float(F.cross_entropy(model(x), y).detach())
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert float(F.cross_entropy(model(x), y).detach()) < 0.7 * first
    with pytest.raises(curvlab.HyperParameterError, match="isaac_lambda_g"):
        curvlab.optimizer(model, "isaac", isaac_lambda_g=1.0, isaac_fused=True)
    with pytest.raises(curvlab.HyperParameterError, match="isaac_lambda_g"):
        curvlab.optimizer(model, "isaac", isaac_lambda_g=-1.0)
    units = {u.name: u for u in curvlab.optimizer(nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 3)),
                                                  "isaac", scaling="mup", isaac_lambda_g=1.0).units}
    assert [units[n].curvature.lambda_g_mult for n in ("0", "2")] == [0.25, 1.0]      # 1 / r_out, base width 64
