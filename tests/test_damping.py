"""Levenberg-Marquardt damping (curvlab.damping; Martens & Grosse 2015 sec. 6.5, eqs. Q.2-Q.3).

rho is 1 on an exactly quadratic problem with exact curvature; the damping moves by exactly omega in the
documented direction, stays within its bounds, adapts only every damping_interval steps, is written into the param
groups and survives a checkpoint; step() without a closure on an adaptation step raises naming damping_adapt;
the extra closure call captures nothing and leaves the gradient at the new parameters in .grad.
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
from helpers import assert_close


def least_squares(n=12, d=4, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return nn.Linear(d, m), torch.randn(n, d, generator=g), torch.randn(n, m, generator=g)


def closure_for(opt, model, x, y, loss_fn=F.mse_loss, after=None):
    """The standard closure; ``after(h)`` may replace the value of the calls made inside step (paused)."""
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if after is not None and curvlab.capture.is_paused():
            return after(loss)
        return loss
    return closure


def test_rho_is_one_on_linear_least_squares_with_exact_curvature(float64):
    for wd in (0.0, 0.03):   # a coupled weight decay is part of h and of the model: still exactly quadratic
        model, x, y = least_squares()
        opt = curvlab.optimizer(model, "identity", "qmodel", loss="mse", damping=0.0, damping_min=0.0,
                                weight_decay=wd, damping_adapt="lm", damping_interval=1)
        for _ in range(3):
            opt.step(closure_for(opt, model, x, y))
        rhos = [h["rho"] for h in opt.damping_history]
        assert len(rhos) == 3 and all(abs(r - 1.0) < 1e-10 for r in rhos), rhos


@pytest.mark.parametrize("rule", ["qmodel", "natural"])
def test_rho_equals_the_closed_form_with_damping(float64, rule):
    """With damping lambda the model is h's Taylor expansion plus lambda/2 |delta|^2: rho has a closed form. The
    natural rule (plain SGD here) takes the generic path: one forward-mode pass along its final update."""
    model, x, y = least_squares()
    lam = 0.3
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = curvlab.optimizer(model, "identity", rule, loss="mse", damping=lam, damping_adapt="lm", lr=0.4)
    h0 = float(F.mse_loss(model(x), y).detach())
    opt.step(closure_for(opt, model, x, y))
    delta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta0
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta0.split([p.numel() for p in model.parameters()])):
            p.copy_(t.view_as(p))
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    H = exact.hessian(model, x, y, "mse")
    actual, predicted = g @ delta + 0.5 * delta @ H @ delta, g @ delta + 0.5 * delta @ H @ delta + 0.5 * lam * delta @ delta
    entry = opt.damping_history[0]
    assert entry["predicted"] == pytest.approx(float(predicted), rel=1e-10)
    assert entry["h_after"] - entry["h_before"] == pytest.approx(float(actual), rel=1e-9)
    assert entry["h_before"] == pytest.approx(h0, rel=1e-14)
    assert entry["rho"] == pytest.approx(float(actual / predicted), rel=1e-9)


@pytest.mark.parametrize("case", ["decrease", "increase", "keep", "nonfinite"])
def test_damping_moves_by_exactly_omega(float64, case):
    model, x, y = least_squares()
    lam = 0.2
    opt = curvlab.optimizer(model, "identity", "qmodel", loss="mse", damping=lam, damping_adapt="lm",
                            damping_interval=3)
    omega = (19 / 20) ** 3
    after = {"decrease": None,                               # exactly quadratic: rho close to 1 (> 3/4)
             "increase": lambda h: h + 10.0,                 # the loss went up: rho < 0 < 1/4
             "keep": None, "nonfinite": lambda h: h * math.inf}[case]
    if case == "keep":   # h_after = h_before + 1/2 (M(delta) - M(0)): rho = 1/2
        def after(h):
            e = pending_entry()
            return torch.tensor(e["h_before"] + 0.5 * e["predicted"])

        def pending_entry():
            return {"h_before": float(F.mse_loss(before_model(x), y).detach()), "predicted": opt.rule.last["model_change"]}

        before_model = copy.deepcopy(model)
    opt.step(closure_for(opt, model, x, y, after=after))
    entry = opt.damping_history[-1]
    expected = {"decrease": lam * omega, "increase": lam / omega, "keep": lam, "nonfinite": lam / omega}[case]
    assert opt.param_groups[0]["damping"] == expected and entry["damping"] == expected
    assert entry["damping_before"] == lam and entry["step"] == 0
    if case == "keep":
        assert entry["rho"] == pytest.approx(0.5, rel=1e-9)
    if case == "nonfinite":
        assert entry["rho"] == -math.inf and "non-finite loss" in str(opt.events[-1])
    for _ in range(2):                                        # steps 1, 2: no adaptation, no closure needed
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert len(opt.damping_history) == 1 and opt.param_groups[0]["damping"] == expected
    opt.step(closure_for(opt, model, x, y))                   # step 3 adapts again
    assert [h["step"] for h in opt.damping_history] == [0, 3]


def test_bounds_are_respected(float64):
    model, x, y = least_squares()
    opt = curvlab.optimizer(model, "identity", "qmodel", loss="mse", damping=1e-3, damping_adapt="lm",
                            damping_interval=1, damping_omega=0.1, damping_min=2e-5, damping_max=0.5)
    for _ in range(4):                                        # quadratic: rho ~ 1, damping / 10 each time
        opt.step(closure_for(opt, model, x, y))
    assert [h["damping"] for h in opt.damping_history] == pytest.approx([1e-4, 2e-5, 2e-5, 2e-5], rel=1e-12)
    for _ in range(6):                                        # the loss "went up": damping * 10 up to the max
        opt.step(closure_for(opt, model, x, y, after=lambda h: h + 1.0))
    assert opt.damping_history[-1]["damping"] == 0.5 and max(h["damping"] for h in opt.damping_history) == 0.5


def test_the_adapted_damping_reaches_the_curvature_at_its_next_refresh(float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = curvlab.optimizer(model, "kfac", "natural", damping=0.1, lr=0.05, damping_adapt="lm", damping_interval=1,
                            inv_interval=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    seen = []
    real = opt.units[0].curvature.refresh
    opt.units[0].curvature.refresh = lambda damping: (seen.append(damping), real(damping))[1]
    for _ in range(3):
        opt.step(closure_for(opt, model, x, y, loss_fn=F.cross_entropy))
    dampings = [h["damping"] for h in opt.damping_history]
    assert seen == [0.1] + dampings[:2], (seen, dampings)     # each refresh uses the damping adapted before it
    assert all(math.isfinite(h["rho"]) for h in opt.damping_history)


def test_step_without_closure_on_an_adaptation_step_raises_before_anything_changes(float64):
    model, x, y = least_squares()
    opt = curvlab.optimizer(model, "kfac", "natural", loss="mse", damping_adapt="lm")
    before = [p.detach().clone() for p in model.parameters()]
    F.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match=r"(?s)damping_adapt='lm'.*step 0.*def closure\(\):.*opt\.step\(closure\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)) and opt.step_count == 0
    with pytest.raises(ValueError, match="must return the loss"):
        opt.step(lambda: None)


def test_extra_closure_call_captures_nothing_and_leaves_the_new_gradient(float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    runs = {}
    for adapt in (None, "lm"):
        m = copy.deepcopy(model)
        opt = curvlab.optimizer(m, "kfac", "natural", lr=0.1, damping=0.1, damping_adapt=adapt, damping_omega=0.99999,
                                damping_min=0.0, damping_thresholds=(-1e9, 1e9), damping_interval=1,
                                fisher="type2", ema_decay=0.5)
        for _ in range(2):
            opt.step(closure_for(opt, m, x, y, loss_fn=F.cross_entropy))
        runs[adapt] = (m, opt)
    (m0, o0), (m1, o1) = runs[None], runs["lm"]
    assert [h["damping"] for h in o1.damping_history] == [0.1, 0.1]        # thresholds made it a no-op
    for a, b in zip(m0.parameters(), m1.parameters()):                    # same curvature, same updates
        assert_close(b.detach(), a.detach(), rtol=1e-13, atol=1e-15, what="parameters with and without LM")
    fresh = copy.deepcopy(model)                                           # no curvlab hooks on this copy
    fresh.load_state_dict(m1.state_dict())
    F.cross_entropy(fresh(x), y).backward()
    for p, q in zip(m1.parameters(), fresh.parameters()):                  # .grad: the batch's gradient at new theta
        assert_close(p.grad, q.grad, rtol=1e-13, atol=1e-15, what=".grad after an adaptation step")
    assert not o1.quadratic.passes() and all(not r for r in o1.capture._records.values())


def test_state_dict_round_trip_keeps_the_adapted_damping(float64):
    def make(model):
        return curvlab.optimizer(model, "kfac", "qmodel", loss="mse", damping=0.05, damping_adapt="lm",
                                 damping_interval=2, fisher="type2")

    model, x, y = least_squares()
    opt = make(model)
    for k in range(3):
        opt.step(closure_for(opt, model, x + 0.1 * k, y))
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["damping"] != 0.05 and len(sd["curvlab"]["damping_history"]) == 2
    model2, _, _ = least_squares(seed=7)
    model2.load_state_dict(model.state_dict())
    opt2 = make(model2)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["damping"] == opt.param_groups[0]["damping"]
    assert opt2.damping_history == opt.damping_history and opt2.damping_history is not opt.damping_history
    for k in range(3, 5):
        opt.step(closure_for(opt, model, x + 0.1 * k, y))
        opt2.step(closure_for(opt2, model2, x + 0.1 * k, y))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-14, what="resumed parameters")
    assert opt2.damping_history == opt.damping_history


@pytest.mark.parametrize("name,value,match", [
    ("damping_adapt", "levenberg", "damping_adapt must be one of 'lm'"),
    ("damping_adapt", True, "damping_adapt"),
    ("damping_interval", 0, "damping_interval must be >= 1"),
    ("damping_omega", 1.0, r"damping_omega must lie in \(0, 1\)"),
    ("damping_omega", "0.9", "damping_omega must be a number"),
    ("damping_min", -1.0, "damping_min must be >= 0"),
    ("damping_max", 0.0, "damping_max must be > 0"),
    ("damping_thresholds", (0.75, 0.25), "damping_thresholds must be"),
    ("damping_thresholds", 0.5, "damping_thresholds must be a pair"),
])
def test_options_are_validated(name, value, match):
    with pytest.raises(curvlab.HyperParameterError, match=match):
        curvlab.optimizer(nn.Linear(2, 2), "kfac", "natural", **{"damping_adapt": "lm", name: value})


def test_min_above_max_is_refused():
    with pytest.raises(ValueError, match=r"damping_min \(1.0\) must not exceed damping_max \(0.5\)"):
        curvlab.optimizer(nn.Linear(2, 2), "kfac", "natural", damping_adapt="lm", damping_min=1.0, damping_max=0.5)


def test_default_omega_and_off_by_default():
    opt = curvlab.optimizer(nn.Linear(2, 2), "kfac", "natural", damping_adapt="lm", damping_interval=4)
    assert opt.lm.omega == pytest.approx((19 / 20) ** 4) and opt.lm.interval == 4
    plain = curvlab.optimizer(nn.Linear(2, 2), "kfac", "natural")
    assert plain.lm is None and plain.quadratic is None and plain.damping_history == []


def test_lm_with_qmodel_trains_digits():
    pytest.importorskip("sklearn", reason="scikit-learn provides the bundled digits data set")
    from curvlab.data import batches, load_digits
    from curvlab.models import mlp

    split = load_digits(seed=0)
    torch.manual_seed(0)
    model = mlp(64, 64, 2, 10, activation="tanh")
    opt = curvlab.optimizer(model, "kfac", "qmodel", damping=1.0, damping_adapt="lm", inv_interval=5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for xb, yb in batches(split.x_train, split.y_train, 64, generator=gen):
            opt.step(closure_for(opt, model, xb, yb, loss_fn=F.cross_entropy))
    with torch.no_grad():
        acc = (model(split.x_test).argmax(1) == split.y_test).float().mean().item()
    dampings = [h["damping"] for h in opt.damping_history]
    print(f"kfac/qmodel + LM: {acc:.4f}; damping {dampings[0]:.3g} -> {dampings[-1]:.3g} "
          f"(min {min(dampings):.3g}, max {max(dampings):.3g}) over {len(dampings)} adaptations")
    assert acc >= 0.9 and opt.skipped_steps == 0 and dampings[-1] < 1.0


@pytest.mark.parametrize("rule", curvlab.RULES.names())
def test_lm_composes_with_every_rule(rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    hyper = {**curvlab.ESTIMATORS.get("kfac").suggested, **curvlab.RULES.get(rule).suggested}
    opt = curvlab.optimizer(model, "kfac", rule, damping_adapt="lm", damping_interval=2, **hyper)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    for _ in range(6):
        opt.step(closure_for(opt, model, x, y, loss_fn=F.cross_entropy))
    assert [h["step"] for h in opt.damping_history] == [0, 2, 4] and opt.skipped_steps == 0
    for h in opt.damping_history:    # a defined ratio, or the documented "no predicted decrease" event
        assert math.isfinite(h["rho"]) or any("predicts no decrease" in str(e) for e in opt.events), h


def test_damping_refresh_refreshes_the_step_after_the_damping_moved():
    """damping_refresh=True: a refresh on the step after every LM move (and only then, besides inv_interval),
    with the new damping; the flag survives a checkpoint."""
    model, x, y = least_squares()
    opt = curvlab.optimizer(model, "kfac", "natural", damping=1e-4, damping_adapt="lm", damping_interval=2,
                            damping_refresh=True, inv_interval=100, kl_clip=None, lr=0.1, loss="mse")
    seen = []
    refresh = opt.refresh
    opt.refresh = lambda force=True: (seen.append((opt.step_count, force, opt.param_groups[0]["damping"]))
                                      or refresh(force))
    for _ in range(5):
        opt.step(closure_for(opt, model, x, y))
    moved = {h["step"] + 1 for h in opt.damping_history if h["damping"] != h["damping_before"] and h["step"] < 4}
    assert moved and {t for t, force, _ in seen if force} == {0} | moved
    for t, force, lam in seen:
        if force and t in moved:
            assert lam == next(h["damping"] for h in opt.damping_history if h["step"] + 1 == t)
    opt.refresh_next = True
    other = curvlab.optimizer(copy.deepcopy(model), "kfac", "natural", damping=1e-4, damping_adapt="lm",
                              damping_interval=2, damping_refresh=True, inv_interval=100, kl_clip=None, lr=0.1,
                              loss="mse")
    other.load_state_dict(opt.state_dict())
    assert other.refresh_next
