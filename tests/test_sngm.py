"""SNGM (ALGORITHMS.md 4, 7.2 item 7): global normalization, scale invariance, bounded momentum."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab

pytestmark = pytest.mark.usefixtures("float64")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g), torch.randint(0, 4, (16,), generator=g)


def run(model, opt, steps, loss_scale=1.0):
    traj = []
    for k in range(steps):
        x, y = batch(k)
        opt.zero_grad()
        (loss_scale * F.cross_entropy(model(x), y)).backward()
        opt.step()
        traj.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    return traj


def test_first_step_has_global_norm_lr():
    model = mlp()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt = curvlab.optimizer(model, "identity", "sngm", lr=0.037, momentum=0.9)
    after = run(model, opt, 1)[0]
    assert float((after - before).norm()) == pytest.approx(0.037, rel=1e-12)


@pytest.mark.parametrize("wd_style", ["coupled", "decoupled"])
def test_loss_scale_leaves_the_trajectory_unchanged(wd_style):
    a, b = mlp(), mlp()
    kw = dict(lr=0.05, momentum=0.9, sngm_weight_decay=wd_style, weight_decay=0.0)
    ta = run(a, curvlab.optimizer(a, "identity", "sngm", **kw), 10)
    tb = run(b, curvlab.optimizer(b, "identity", "sngm", **kw), 10, loss_scale=1000.0)
    for k, (p, q) in enumerate(zip(ta, tb)):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), f"step {k}: max diff {float((p - q).abs().max())}"


@pytest.mark.parametrize("estimator", ["identity", "kfac"])
def test_momentum_norm_is_bounded(estimator):
    model = mlp()
    beta = 0.9
    opt = curvlab.optimizer(model, estimator, "sngm", lr=0.01, momentum=beta, damping=0.1)
    for k in range(30):
        run(model, opt, 1)
        u = torch.cat([opt.state[p]["sngm_momentum"].reshape(-1) for p in model.parameters()])
        assert float(u.norm()) <= 1.0 / (1.0 - beta) + 1e-12
    assert float(u.norm()) > 1.0           # the bound is approached, not trivially satisfied


def test_sngm_with_kfac_normalizes_the_preconditioned_direction():
    model = mlp()
    ref = copy.deepcopy(model)
    x, y = batch(0)
    opt = curvlab.optimizer(model, "kfac", "sngm", lr=0.02, damping=0.1, fisher="type2", ema_decay=0.0)
    nat = curvlab.optimizer(ref, "kfac", "natural", lr=1.0, damping=0.1, fisher="type2", ema_decay=0.0)
    for m, o in ((model, opt), (ref, nat)):
        F.cross_entropy(m(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    nat.step()
    d = torch.cat([(b - r.detach()).reshape(-1) for b, r in zip(before, ref.parameters())])   # C^-1 g
    step = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    assert torch.allclose(step, -0.02 * d / d.norm(), rtol=1e-10, atol=1e-14)


def test_kl_clip_is_refused():
    with pytest.raises(ValueError, match="kl_clip has no effect with rule='sngm'"):
        curvlab.optimizer(mlp(), "identity", "sngm", kl_clip=1e-3)
