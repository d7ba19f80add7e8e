"""The held-out reduction ratio of the LM damping (curvlab.damping, ``damping_rho="next"``; Martens & Grosse 2015
eq. Q.2 with the actual change measured on the NEXT step's batch).

rho equals a hand computation (explicit forward passes at both parameter vectors on the next batch, M from
curvlab.exact's GGN of the adaptation step's batch); the step that measures it returns the same loss, .grad and
parameters as a fixed-damping run given the same damping (the extra closure call leaves no trace); the pending
record survives a checkpoint; the closure is required on the step after an adaptation step; the default is the
step's own batch ("same") and is unchanged.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import curvlab
from helpers import random_batches as batches
from helpers import small_tanh_mlp as mlp
from curvlab import exact


def closure_for(opt, model, x, y, calls=None):
    def closure():
        if calls is not None:
            calls.append(curvlab.capture.is_paused())
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def loss_and_grad(model, theta, x, y):
    """Mean cross-entropy of the batch and its gradient at the flat parameter vector ``theta`` (a plain model)."""
    vector_to_parameters(theta, model.parameters())
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach()), parameters_to_vector([p.grad for p in model.parameters()])


@pytest.mark.parametrize("rule", ["natural", "qmodel"])
@pytest.mark.parametrize("wd", [0.0, 0.02])
def test_held_out_rho_equals_a_hand_computation(float64, rule, wd):
    """rho_t = (h_{B_t+1}(theta_t+1) - h_{B_t+1}(theta_t)) / (M_{B_t}(delta_t) - M_{B_t}(0)) for every adaptation
    step (interval 1: the step that measures rho also predicts its own, from records of its first closure call)."""
    model = mlp()
    plain = copy.deepcopy(model)                                  # no curvlab hooks on this copy
    lam0 = 0.05
    opt = curvlab.optimizer(model, "kfac", rule, lr=0.3, damping=lam0, weight_decay=wd, damping_adapt="lm",
                            damping_rho="next", damping_interval=1, inv_interval=1, fisher="type2")
    data = batches(4)
    thetas = [parameters_to_vector(model.parameters()).detach().clone()]
    for x, y in data:
        opt.step(closure_for(opt, model, x, y))
        thetas.append(parameters_to_vector(model.parameters()).detach().clone())
    history = opt.damping_history
    assert [h["step"] for h in history] == [0, 1, 2] and [h["measured_at"] for h in history] == [1, 2, 3]
    lam = lam0
    for t, entry in enumerate(history):
        theta, delta = thetas[t], thetas[t + 1] - thetas[t]
        x, y = data[t]
        _, g = loss_and_grad(plain, theta, x, y)
        vector_to_parameters(theta, plain.parameters())
        G = exact.ggn(plain, x, y, "cross_entropy")
        g = g + wd * theta                                          # coupled weight decay: part of h
        predicted = g @ delta + 0.5 * delta @ G @ delta + 0.5 * (lam + wd) * delta @ delta
        xn, yn = data[t + 1]                                        # the NEXT batch at both parameter vectors
        h_after, _ = loss_and_grad(plain, thetas[t + 1], xn, yn)
        h_before, _ = loss_and_grad(plain, theta, xn, yn)
        l2 = wd * float(theta @ delta + 0.5 * delta @ delta)
        assert entry["predicted"] == pytest.approx(float(predicted), rel=1e-9, abs=1e-15)
        assert entry["h_before"] == pytest.approx(h_before, rel=1e-13)
        assert entry["h_after"] == pytest.approx(h_after, rel=1e-13)
        assert entry["rho"] == pytest.approx((h_after + l2 - h_before) / float(predicted), rel=1e-9)
        assert entry["damping_before"] == lam
        lam = entry["damping"]
    assert any(h["damping"] != h["damping_before"] for h in history)     # the LM rule acted on these rhos


CONFIGS = {"kfac-natural": ("kfac", "natural", {}), "kfac-qmodel": ("kfac", "qmodel", {}),
           "shampoo-natural-gamma": ("shampoo", "natural", {"gamma_adapt": True, "gamma_interval": 2}),
           "kfac-qmodel-gamma-klclip": ("kfac", "qmodel", {"gamma_adapt": True, "gamma_interval": 2, "kl_clip": 1e-2})}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_measuring_step_is_the_step_without_the_extra_call(float64, name):
    """A fixed-damping run given, before each step, the damping the held-out run used in that step returns the same
    loss and leaves the same .grad and parameters, bit for bit (and, with gamma_adapt, the same gammas): the extra
    closure call at the old parameters changes nothing but the damping, and this step's statistics are kept."""
    est, rule, extra = CONFIGS[name]
    hyper = dict(lr=0.2, damping=0.3, inv_interval=1, fisher="type2", ema_decay=0.5, **extra)
    model_a, model_b = mlp(), mlp()
    opt_a = curvlab.optimizer(model_a, est, rule, damping_adapt="lm", damping_rho="next", damping_interval=1,
                              damping_thresholds=(0.6, 0.9), **hyper)
    opt_b = curvlab.optimizer(model_b, est, rule, **hyper)
    calls = []
    for step, (x, y) in enumerate(batches(6)):
        calls.clear()
        loss_a = opt_a.step(closure_for(opt_a, model_a, x, y, calls))
        assert calls == ([False] if step == 0 else [False, True])   # one extra call (paused) from step 1 on
        for g in opt_b.param_groups:
            g["damping"] = opt_a.param_groups[0]["damping"]         # the damping step `step` used
        loss_b = opt_b.step(closure_for(opt_b, model_b, x, y))
        assert torch.equal(loss_a, loss_b), step
        for p, q in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad), step
        assert [g.get("gamma") for g in opt_a.param_groups] == [g.get("gamma") for g in opt_b.param_groups]
    moved = {h["damping"] for h in opt_a.damping_history} | {0.3}
    assert len(moved) > 1, "the damping never moved: the comparison would not show the step uses the new value"
    assert not opt_a.quadratic.passes()
    assert opt_a.capture is None or all(not r for r in opt_a.capture._records.values())


def test_pending_record_survives_a_checkpoint(float64):
    def make(model):
        return curvlab.optimizer(model, "kfac", "qmodel", damping=0.1, damping_adapt="lm", damping_rho="next",
                                 damping_interval=2, fisher="type2", inv_interval=1)

    data = batches(6)
    model = mlp()
    opt = make(model)
    for x, y in data[:3]:                                           # step 2 adapts: its record is pending
        opt.step(closure_for(opt, model, x, y))
    sd = copy.deepcopy(opt.state_dict())
    assert sd["curvlab"]["damping_pending"]["step"] == 2 and len(sd["curvlab"]["damping_history"]) == 1
    model2 = mlp(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = make(model2)
    opt2.load_state_dict(sd)
    for x, y in data[3:]:
        opt.step(closure_for(opt, model, x, y))
        opt2.step(closure_for(opt2, model2, x, y))
    assert [h["step"] for h in opt2.damping_history] == [0, 2, 4]
    assert opt2.damping_history == opt.damping_history
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    fresh = make(mlp())                                             # no pending record in a "same"-free checkpoint
    fresh.load_state_dict({**sd, "curvlab": {k: v for k, v in sd["curvlab"].items() if k != "damping_pending"}})
    assert fresh.lm.pending is None


def test_the_closure_is_needed_on_the_step_after_an_adaptation_step(float64):
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", damping_adapt="lm", damping_rho="next", damping_interval=2)
    (x, y), = batches(1)
    F.cross_entropy(model(x), y).backward()
    opt.step()                                                      # step 0 adapts: no closure needed yet
    assert opt.lm.pending is not None and not opt.damping_history
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"(?s)damping_rho='next'.*step 1, after adaptation step 0.*"
                                         r"def closure\(\):.*damping_rho='same'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)) and opt.step_count == 1
    with pytest.raises(ValueError, match="must return the loss"):
        opt.step(lambda: None)
    assert opt.lm.pending is not None and opt.lm.pending.step == 0   # still pending
    opt.step(closure_for(opt, model, x, y))
    assert [h["measured_at"] for h in opt.damping_history] == [1]


def test_option_is_validated_and_the_default_is_the_steps_own_batch(float64):
    with pytest.raises(curvlab.hyper.HyperParameterError, match="damping_rho"):
        curvlab.optimizer(mlp(), "kfac", "natural", damping_adapt="lm", damping_rho="held_out")
    runs = {}
    for rho in (None, "same"):
        model = mlp()
        opt = curvlab.optimizer(model, "kfac", "natural", lr=0.2, damping=0.3, damping_adapt="lm", damping_interval=1,
                                inv_interval=1, **({"damping_rho": rho} if rho else {}))
        calls = []
        for x, y in batches(3):
            opt.step(closure_for(opt, model, x, y, calls))
        assert calls == [False, True] * 3                           # today's: the extra call after the update
        assert "measured_at" not in opt.damping_history[0] and "damping_pending" not in opt.state_dict()["curvlab"]
        runs[rho] = (model, opt)
    (m0, o0), (m1, o1) = runs[None], runs["same"]
    assert o0.damping_history == o1.damping_history
    assert all(torch.equal(p, q) for p, q in zip(m0.parameters(), m1.parameters()))
