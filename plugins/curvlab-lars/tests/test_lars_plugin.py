"""LARS plugin tests: the trust-ratio formula against an independent computation, the layer-wise invariant
``||delta theta_u|| = lr * eta * ||theta_u||`` (wd = 0, no momentum), momentum, training, refusal of kl_clip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab


def model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.randn(20, 6), torch.randint(0, 3, (20,))


def one_step(estimator: str, **hyper):
    model, x, y = model_and_batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = curvlab.optimizer(model, estimator, "lars", **hyper)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return model, before, grads, opt


def test_lars_is_registered_through_the_entry_point():
    assert curvlab.RULES.get("lars").__module__ == "curvlab_lars"


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_identity_lars_matches_you_et_al_formula(wd):
    lr, eta = 0.5, 0.02
    model, before, grads, _ = one_step("identity", lr=lr, lars_eta=eta, weight_decay=wd)
    after = list(model.parameters())
    for layer in (0, 1):  # each Linear is one unit: (weight, bias)
        w, g = before[2 * layer: 2 * layer + 2], grads[2 * layer: 2 * layer + 2]
        wn = torch.sqrt(sum((t ** 2).sum() for t in w))
        gn = torch.sqrt(sum((t ** 2).sum() for t in g))
        local = eta * wn / (gn + wd * wn)
        for k in range(2):
            expected = w[k] - lr * local * (g[k] + wd * w[k])
            torch.testing.assert_close(after[2 * layer + k].detach(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["identity", "kfac", "shampoo"])
def test_relative_step_per_layer_is_lr_times_eta(estimator):
    """With wd = 0 and no momentum, ||delta theta_u|| / ||theta_u|| = lr * eta whatever the direction."""
    lr, eta = 0.3, 0.01
    model, before, _, opt = one_step(estimator, lr=lr, lars_eta=eta, damping=0.1)
    after = [p.detach() for p in model.parameters()]
    for layer in (0, 1):
        sl = slice(2 * layer, 2 * layer + 2)
        dn = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after[sl], before[sl])))
        wn = torch.sqrt(sum((b ** 2).sum() for b in before[sl]))
        assert abs(float(dn / wn) - lr * eta) < 1e-5 * lr * eta, (estimator, layer, float(dn / wn))
    if opt.capture:
        opt.capture.remove()


def test_momentum_accumulates_scaled_steps():
    model, x, y = model_and_batch(1)
    opt = curvlab.optimizer(model, "identity", "lars", lr=0.1, lars_eta=0.05, momentum=0.9)
    deltas = []
    for _ in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        deltas.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    buf = opt.state[next(model.parameters())]["momentum_buffer"]
    torch.testing.assert_close(deltas[1][0], -0.1 * buf)
    assert float(deltas[1][0].norm()) > float(deltas[0][0].norm())  # heavy ball: the second step is longer


def test_lars_over_kfac_trains():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = curvlab.optimizer(model, "kfac", "lars", lr=1.0, lars_eta=0.02, momentum=0.9, damping=0.1)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first, (first, float(loss.detach()))
    opt.capture.remove()


@pytest.mark.parametrize("bad,match", [({"lars_eta": 0.0}, "lars_eta"), ({"lars_eta": "big"}, "lars_eta"),
                                       ({"lars_eat": 0.1}, "lars_eta"), ({"kl_clip": 0.01}, "kl_clip")])
def test_bad_options_are_refused_with_a_message(bad, match):
    model, _, _ = model_and_batch()
    with pytest.raises((ValueError, TypeError), match=match):
        curvlab.optimizer(model, "identity", "lars", **bad)
