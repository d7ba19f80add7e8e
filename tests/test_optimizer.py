"""The optimizer as a torch.optim.Optimizer: solve/damping identities, checkpoints, schedulers, baselines."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.units import inner
from helpers import assert_close, one_step_blocks


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def data(n=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def train(model, opt, steps, seed=1, n=16):
    losses = []
    for k in range(steps):
        x, y = data(n, seed + k, next(model.parameters()).dtype)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("style", ["pi", "exact"])
def test_solve_is_the_damped_inverse(style, float64):
    model = mlp()
    x, y = data()
    lam = 0.03
    _, opt = one_step_blocks(model, x, y, fisher="type2", damping=lam, damping_style=style)
    opt.refresh()
    curv = opt.units[0].curvature
    A, G = curv.A, curv.G
    if style == "pi":
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        M = torch.kron(G + math.sqrt(lam) / pi * torch.eye(6), A + pi * math.sqrt(lam) * torch.eye(6))
    else:
        M = torch.kron(G, A) + lam * torch.eye(36)
    V = torch.randn(6, 6)
    expected = torch.linalg.solve(M, V.reshape(-1)).reshape(6, 6)
    assert_close(curv.solve(V), expected, rtol=1e-9, atol=1e-12, what=f"solve ({style})")
    assert_close(curv.mv(V), (torch.kron(G, A) @ V.reshape(-1)).reshape(6, 6), what="mv (undamped)")


def test_pi_damping_invariant_to_moving_a_scalar_between_factors(float64):
    model = mlp()
    x, y = data()
    _, opt = one_step_blocks(model, x, y, fisher="type2", damping=0.01)
    curv = opt.units[0].curvature
    V = torch.randn(6, 6)
    curv.refresh(0.01)
    before = curv.solve(V)
    curv.A, curv.G = curv.A * 7.0, curv.G / 7.0
    curv.refresh(0.01)
    assert_close(curv.solve(V), before, rtol=1e-10, what="pi-damped solve after (7A, G/7)")


def test_identity_natural_is_momentum_sgd():
    ref_model = mlp(dtype=torch.float32)
    model = copy.deepcopy(ref_model)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = curvlab.optimizer(model, "identity", "natural", lr=0.1, momentum=0.9, weight_decay=1e-3)
    train(ref_model, ref, 5)
    train(model, opt, 5)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_close(p, q, rtol=1e-6, atol=1e-7, what="identity vs torch SGD")


def test_state_dict_round_trip_resumes_identically(float64):
    hyper = dict(lr=0.05, damping=1e-2, momentum=0.9, ema_decay=0.9, inv_interval=3, stat_interval=2,
                 fisher="mc", kl_clip=1e-2)
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", **hyper)
    train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 5, seed=100)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2 = mlp(seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = curvlab.optimizer(model2, "kfac", "natural", **hyper)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.step_count == 4
    train(model2, opt2, 5, seed=100)
    for (name, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume: max diff {float((p - q).abs().max())}"


def test_mismatched_checkpoint_is_refused():
    model = mlp(dtype=torch.float32)
    opt = curvlab.optimizer(model, "kfac", "natural")
    train(model, opt, 1)
    other = curvlab.optimizer(mlp(dtype=torch.float32), "identity", "natural")
    with pytest.raises(ValueError, match="written by"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not a curvlab"):
        other.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_lr_scheduler_drives_the_step():
    model = mlp(dtype=torch.float32)
    opt = curvlab.optimizer(model, "kfac", "natural", lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    # a zero learning rate must freeze the parameters
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.clone() for p in model.parameters()]
    train(model, opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_kfac_step_is_the_preconditioned_gradient(float64):
    """One step from a fresh state with momentum 0 moves each layer by -lr * G_d^-1 grad A_d^-1."""
    model = mlp()
    x, y = data()
    opt = curvlab.optimizer(model, "kfac", "natural", lr=0.3, damping=1e-2, fisher="type2", ema_decay=0.0, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for unit, (w0, b0, gw, gb) in zip(opt.units, [before[0:2] + grads[0:2], before[2:4] + grads[2:4]]):
        mat = torch.cat([gw, gb[:, None]], dim=1)
        step = unit.curvature.inverses["G_inv"] @ mat @ unit.curvature.inverses["A_inv"]
        assert_close(unit.params[0] - w0, -0.3 * step[:, :-1], what=f"weight step {unit.name}")
        assert_close(unit.params[1] - b0, -0.3 * step[:, -1], what=f"bias step {unit.name}")


def test_kl_clip_bounds_the_step(float64):
    model = mlp()
    x, y = data()
    opt = curvlab.optimizer(model, "kfac", "natural", lr=1.0, damping=1e-3, kl_clip=1e-4, fisher="type2")
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    # with nu the clip factor: sum <delta, g> = -lr * nu * sum <C^-1 g, g> and lr^2 nu^2 sum<C^-1 g, g> = kappa
    quad = -sum(float(((p.detach() - b) * g).sum()) for p, b, g in zip(model.parameters(), before, grads))
    v = sum(float(inner(u.solve(g), g)) for u, g in zip(opt.units, [grads[0:2], grads[2:4]]))
    nu = quad / v           # lr = 1
    assert nu < 1.0
    assert nu ** 2 * v == pytest.approx(1e-4, rel=1e-8)


def test_gradients_are_untouched_by_capture(float64):
    """The extra backward passes for mc/type2 must not change p.grad."""
    for fisher in ("mc", "type2", "empirical"):
        model = mlp()
        x, y = data()
        F.cross_entropy(model(x), y).backward()
        ref = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        opt = curvlab.optimizer(model, "kfac", "natural", fisher=fisher)
        F.cross_entropy(model(x), y).backward()
        for p, r in zip(model.parameters(), ref):
            assert torch.equal(p.grad, r), f"fisher={fisher}: capture changed the gradient"
        opt.capture.remove()


def test_forward_without_backward_does_not_pollute_statistics(float64):
    model = mlp()
    x, y = data()
    _, opt_ref = one_step_blocks(model, x, y, fisher="type2")
    opt = curvlab.optimizer(model, "kfac", "natural", fisher="type2", ema_decay=0.0)
    model(torch.randn(7, 5))          # e.g. an evaluation forward with grad enabled, never back-propagated
    F.cross_entropy(model(x), y).backward()
    opt.update_curvature()
    for u, r in zip(opt.units, opt_ref.units):
        assert_close(u.curvature.A, r.curvature.A, what=f"A of {u.name}")
        assert_close(u.curvature.G, r.curvature.G, what=f"G of {u.name}")


def test_statistics_only_on_stat_steps():
    model = mlp(dtype=torch.float32)
    opt = curvlab.optimizer(model, "kfac", "natural", stat_interval=3, ema_decay=0.5)
    seen = []
    for k in range(7):
        before = opt.units[0].curvature.A
        before = None if before is None else before.clone()     # the EMA updates the factor in place
        train(model, opt, 1, seed=k)
        seen.append(before is None or not torch.equal(opt.units[0].curvature.A, before))
    assert seen == [True, False, False, True, False, False, True]
