"""Greedy factor damping gamma (curvlab.factor_damping; Martens & Grosse 2015 sec. 6.6).

The choice equals a brute-force evaluation in float64: three separate fixed-damping optimizers give the three
candidate updates, whose M(delta) - M(0) (eq. Q.1) is formed with the exact GGN of the batch (curvlab.exact);
off by default nothing changes, and with every candidate clamped to the same value the trajectory equals the plain
one bit for bit; gamma survives a checkpoint; estimators whose solve ignores the damping are refused.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab import exact
from curvlab.factor_damping import ORDER


def problem(seed=0, n=24, d=5, h=6, c=3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double()
    return model, torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def one_step(model, x, y, **hyper):
    opt = curvlab.optimizer(model, **hyper)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    opt.step()
    return opt, grad, torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before


@pytest.mark.parametrize("estimator", ["kfac", "shampoo", "miniblock"])
def test_greedy_choice_equals_brute_force_model_values(estimator: str) -> None:
    choices = set()
    # lr 3 overshoots (more damping wins), lr 0.01 is short (less damping wins)
    for damping, weight_decay, lr in ((1e-3, 0.0, 3.0), (0.3, 0.0, 0.5), (30.0, 1e-2, 0.5), (1.0, 0.0, 0.01)):
        model, x, y = problem()
        hyper = dict(estimator=estimator, rule="natural", lr=lr, momentum=0.0, kl_clip=None,
                     weight_decay=weight_decay, inv_interval=1)
        G = exact.ggn(model, x, y, "cross_entropy")
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        omega = math.sqrt(19 / 20) ** 20
        brute = []
        for factor in (omega, 1 / omega, 1.0):                # ORDER: down, up, keep
            _, grad, delta = one_step(copy.deepcopy(model), x, y, damping=damping * factor, **hyper)
            g = grad + weight_decay * theta
            brute.append((float(g @ delta + 0.5 * delta @ (G @ delta) + 0.5 * (damping + weight_decay) * delta @ delta),
                          damping * factor, delta))
        opt, _, delta = one_step(model, x, y, damping=damping, gamma_adapt=True, **hyper)
        entry = opt.gamma_history[0]
        assert entry["candidates"] == pytest.approx([b[1] for b in brute], rel=1e-15)
        assert entry["changes"] == pytest.approx([b[0] for b in brute], rel=1e-9, abs=1e-13)
        best = min(range(3), key=lambda i: (brute[i][0], i != 2))
        assert entry["choice"] == ORDER[best]
        assert opt.param_groups[0]["gamma"] == pytest.approx(brute[best][1], rel=1e-15)
        assert opt.param_groups[0]["damping"] == damping                    # lambda is not gamma's business
        torch.testing.assert_close(delta, brute[best][2], rtol=1e-10, atol=1e-13)
        choices.add(entry["choice"])
    assert len(choices) >= 2, choices                                       # the test exercises a real choice


def test_qmodel_uses_its_own_model_value_and_keeps_the_winners_state() -> None:
    model, x, y = problem(seed=1)
    opt = curvlab.optimizer(model, "kfac", "qmodel", damping=1e-2, gamma_adapt=True, gamma_interval=2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    entries = opt.gamma_history
    assert [e["step"] for e in entries] == [0, 2]
    last = entries[-1]
    best = ORDER.index(last["choice"])
    assert last["changes"][best] == min(last["changes"]) and all(math.isfinite(c) for c in last["changes"])
    assert opt.rule.predicted_change == last["changes"][best]               # the applied step's M, not the last plan's
    assert opt.param_groups[0]["gamma"] == last["gamma"] and opt.param_groups[0]["damping"] == 1e-2


def trajectory(**hyper):
    model, x, y = problem(seed=2)
    opt = curvlab.optimizer(model, "kfac", "natural", damping=0.1, inv_interval=2, **hyper)
    for _ in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_off_by_default_and_a_pinned_gamma_reproduce_the_plain_run() -> None:
    plain, theta = trajectory()
    assert plain.gamma is None and plain.quadratic is None and "gamma" not in plain.param_groups[0]
    assert plain.gamma_history == [] and plain.config["gamma_adapt"] is False
    # all three candidates clamped to 0.1: every gamma step keeps it (its refreshes fall on the plain run's refresh
    # steps, inv_interval = gamma_interval = 2), so the updates are the plain run's bit for bit
    pinned, theta_pinned = trajectory(gamma_adapt=True, gamma_interval=2, damping_min=0.1, damping_max=0.1)
    assert [e["choice"] for e in pinned.gamma_history] == ["keep"] * 4
    assert torch.equal(theta, theta_pinned)


def test_gamma_moves_and_survives_a_checkpoint() -> None:
    model, x, y = problem(seed=3)
    opt = curvlab.optimizer(model, "kfac", "natural", damping=100.0, gamma_adapt=True, gamma_interval=1,
                            gamma_omega=0.5, kl_clip=None)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert [e["gamma"] for e in opt.gamma_history] == [50.0, 25.0, 12.5]   # far too large: down every time
    assert all(e["gamma_before"] / e["gamma"] == 2.0 for e in opt.gamma_history)
    other = curvlab.optimizer(copy.deepcopy(model), "kfac", "natural", damping=100.0, gamma_adapt=True,
                              gamma_interval=1, gamma_omega=0.5, kl_clip=None)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["gamma"] == 12.5 and other.gamma_history == opt.gamma_history


def test_refused_where_the_damping_does_not_enter_solve() -> None:
    model, _, _ = problem()
    with pytest.raises(ValueError, match="identity.*ignores the damping.*gamma_adapt=False"):
        curvlab.optimizer(model, "identity", gamma_adapt=True)
    with pytest.raises(ValueError, match="isaac_fused=True.*gamma_adapt=False"):
        curvlab.optimizer(model, "isaac", isaac_fused=True, kl_clip=None, gamma_adapt=True)
    with pytest.raises(ValueError, match=r"gamma_omega must lie in \(0, 1\).*sqrt\(19/20\)\^gamma_interval"):
        curvlab.optimizer(model, "kfac", gamma_adapt=True, gamma_omega=1.5)
