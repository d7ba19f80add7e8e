"""The held-out choice of the curvature's damping gamma (curvlab.factor_damping, ``gamma_score="next"``).

The three held-out losses equal a brute-force computation in float64 (three fixed-damping optimizers take step t
on batch B, each resulting model is evaluated on B' by a plain forward pass); the winner becomes gamma and the
step that measures it equals a fixed-damping run given the winner (the extra closure calls leave no trace); the
pending proposal survives a checkpoint; the closure is required on the step after a gamma step; no quadratic
model is built for it.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import curvlab
from helpers import random_batches as batches
from helpers import small_tanh_mlp as mlp
from curvlab.factor_damping import ORDER


def closure_for(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


HYPER = dict(rule="natural", lr=0.5, momentum=0.0, kl_clip=None, inv_interval=1)


@pytest.mark.parametrize("estimator", ["kfac", "shampoo", "miniblock"])
@pytest.mark.parametrize("damping", [1e-3, 0.1, 10.0])
def test_held_out_choice_equals_brute_force(float64, estimator, damping):
    (x0, y0), (x1, y1) = batches(2)
    factors = {"down": 0.5, "up": 2.0, "keep": 1.0}
    brute = []
    for key in ORDER:                                                # step 0 on B at each candidate, loss on B'
        model = mlp()
        opt = curvlab.optimizer(model, estimator, damping=damping * factors[key], **HYPER)
        opt.step(closure_for(opt, model, x0, y0))
        with torch.no_grad():
            brute.append(float(F.cross_entropy(model(x1), y1)))
    model = mlp()
    opt = curvlab.optimizer(model, estimator, damping=damping, gamma_adapt=True, gamma_score="next",
                            gamma_interval=100, gamma_omega=0.5, **HYPER)
    assert opt.quadratic is None and opt.needs_closure
    opt.step(closure_for(opt, model, x0, y0))
    assert opt.gamma_history == [] and opt.gamma.pending is not None
    loss1 = opt.step(closure_for(opt, model, x1, y1))
    entry, = opt.gamma_history
    assert entry["losses"] == pytest.approx(brute, rel=1e-11), (entry["losses"], brute)
    assert float(loss1.detach()) == pytest.approx(brute[-1], rel=1e-12)     # the step's own call is the "keep" point
    best = min(range(3), key=lambda i: (brute[i], i != 2))
    assert entry["choice"] == ORDER[best] and entry["measured_at"] == 1 and entry["step"] == 0
    assert opt.param_groups[0]["gamma"] == pytest.approx(damping * factors[ORDER[best]], rel=1e-15)
    assert opt.param_groups[0]["damping"] == damping                 # lambda is not gamma's business
    # step 1 is the step a fixed-damping run takes at the winner (after step 0 at the current gamma)
    ref = mlp()
    fixed = curvlab.optimizer(ref, estimator, damping=damping, **HYPER)
    fixed.step(closure_for(fixed, ref, x0, y0))
    fixed.param_groups[0]["damping"] = opt.param_groups[0]["gamma"]
    ref_loss = fixed.step(closure_for(fixed, ref, x1, y1))
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-12, atol=1e-14)
    assert float(loss1.detach()) == float(ref_loss.detach())
    for p, q in zip(model.parameters(), ref.parameters()):          # .grad: the step's own batch at theta_1
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_the_choice_moves_gamma_both_ways(float64):
    """A far too large gamma is lowered, a far too small one (lr 3: the step overshoots) is raised (labels from a
    linear teacher, so that a step on one batch helps the next)."""
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(5, 3, generator=g)
    xs = [torch.randn(32, 5, generator=g) for _ in range(8)]
    data = [(x, (x @ teacher).argmax(1)) for x in xs]
    ends = {}
    for start, lr in ((1e3, 0.5), (1e-6, 3.0)):
        model = mlp()
        opt = curvlab.optimizer(model, "kfac", "natural", lr=lr, momentum=0.0, kl_clip=None, damping=start,
                                gamma_adapt=True, gamma_score="next", gamma_interval=1, gamma_omega=0.5)
        for x, y in data:
            opt.step(closure_for(opt, model, x, y))
        ends[start] = [e["choice"] for e in opt.gamma_history]
    assert ends[1e3].count("down") >= 5, ends
    assert ends[1e-6].count("up") >= 3, ends


def test_pending_proposal_survives_a_checkpoint(float64):
    (x0, y0), (x1, y1) = batches(2)
    make = lambda m: curvlab.optimizer(m, "kfac", damping=0.1, gamma_adapt=True, gamma_score="next",  # noqa: E731
                                       gamma_interval=3, gamma_omega=0.5, **{k: v for k, v in HYPER.items()
                                                                              if k != "rule"})
    model = mlp()
    opt = make(model)
    opt.step(closure_for(opt, model, x0, y0))
    sd = copy.deepcopy(opt.state_dict())
    assert sd["curvlab"]["gamma_pending"]["step"] == 0
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    other = make(twin)
    other.load_state_dict(sd)
    opt.step(closure_for(opt, model, x1, y1))
    other.step(closure_for(other, twin, x1, y1))
    assert other.gamma_history == opt.gamma_history and len(opt.gamma_history) == 1
    assert torch.equal(flat(model), flat(twin))


def test_the_closure_is_needed_on_the_step_after_a_gamma_step(float64):
    (x, y), = batches(1)
    model = mlp()
    opt = curvlab.optimizer(model, "kfac", "natural", gamma_adapt=True, gamma_score="next", gamma_interval=2)
    F.cross_entropy(model(x), y).backward()
    opt.step()                                                       # the gamma step itself needs none
    before = flat(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"(?s)gamma_score='next'.*step 0.*step 1.*def closure\(\):.*"
                                         r"gamma_score='model'"):
        opt.step()
    assert torch.equal(flat(model), before) and opt.step_count == 1
    opt.step(closure_for(opt, model, x, y))
    assert [e["measured_at"] for e in opt.gamma_history] == [1]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()                                                       # step 2 is a gamma step again: no closure needed


def test_option_is_validated_and_the_default_is_the_model():
    with pytest.raises(curvlab.hyper.HyperParameterError, match="gamma_score"):
        curvlab.optimizer(mlp(), "kfac", gamma_adapt=True, gamma_score="held_out")
    opt = curvlab.optimizer(mlp(), "kfac", gamma_adapt=True)
    assert opt.config["gamma_score"] == "model" and not opt.needs_closure and opt.quadratic is not None
