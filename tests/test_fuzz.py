"""Fuzz: seeded random draws of valid and invalid hyper-parameters and small models over EVERY registered
estimator, rule and scaling (plugins included).

* a valid draw either builds and trains a few steps with finite parameters and finite optimizer state (a
  diverging step is skipped, never written), or -- when the (estimator, rule, scaling) triple itself refuses to
  compose -- refuses with a ValueError that names a component, also with the estimator's ``suggested`` settings;
* an invalid draw (one corrupted value or name) raises ``ValueError``/``TypeError`` whose message names the
  offending argument.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab.hyper import COMMON

ESTIMATORS, RULES, SCALINGS = curvlab.ESTIMATORS.names(), curvlab.RULES.names(), curvlab.SCALINGS.names()
VALID_DRAWS, INVALID_DRAWS = 36, 60


def draw_model(rng: random.Random) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(rng.randrange(10**6))
    n, classes = rng.choice([2, 5, 16]), rng.choice([2, 3])
    if rng.random() < 0.3:
        c = rng.choice([1, 2])
        model = nn.Sequential(nn.Conv2d(c, 3, 3, padding=rng.choice([0, 1]), bias=rng.random() < 0.5), nn.ReLU(),
                              nn.Flatten(), nn.LazyLinear(classes))
        x = torch.randn(n, c, 5, 5)
        model(x)  # materialize the lazy layer before the optimizer sees it
    else:
        d, width = rng.choice([3, 6]), rng.choice([4, 8, 12])
        layers: list[nn.Module] = [nn.Linear(d, width, bias=rng.random() < 0.7), rng.choice([nn.Tanh(), nn.ReLU()])]
        if rng.random() < 0.3:
            layers.append(nn.LayerNorm(width))  # a scale/shift block (or the fallback, e.g. under ISAAC)
        if rng.random() < 0.2:
            layers.append(nn.BatchNorm1d(width))  # an unsupported layer: first-order fallback
        layers.append(nn.Linear(width, classes))
        model = nn.Sequential(*layers)
        x = torch.randn(n, d)
    return model, x, torch.randint(0, classes, (n,))


def draw_valid(rng: random.Random, estimator: str) -> dict:
    hyper: dict = {
        "lr": 10 ** rng.uniform(-4, -0.5), "damping": 10 ** rng.uniform(-4, 0.5), "momentum": rng.choice([0.0, 0.5, 0.9]),
        "weight_decay": rng.choice([0.0, 1e-4, 1e-2]), "ema_decay": rng.choice([0.0, 0.5, 0.95]),
        "stat_interval": rng.choice([1, 1, 2]), "inv_interval": rng.choice([1, 3, 10]),
    }
    fishers = curvlab.ESTIMATORS.get(estimator).fisher_types
    hyper["fisher"] = rng.choice(list(fishers))
    return {k: v for k, v in hyper.items() if rng.random() < 0.8}


def finite_state(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(finite_state(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite_state(v) for v in obj)
    return True


@pytest.mark.parametrize("seed", range(VALID_DRAWS))
def test_valid_draw_trains_with_finite_parameters(seed):
    rng = random.Random(seed)
    est, rule, scaling = rng.choice(ESTIMATORS), rng.choice(RULES), rng.choice(SCALINGS)
    model, x, y = draw_model(rng)
    hyper = draw_valid(rng, est)
    if "base_width" in curvlab.SCALINGS.get(scaling).options:
        hyper["base_width"] = 4
    try:
        opt = curvlab.optimizer(model, est, rule, scaling, **hyper)
    except ValueError as err:  # the triple may refuse to compose; then it refuses with its own settings too
        msg = str(err)
        assert any(name in msg for name in (est, rule, scaling)), msg
        with pytest.raises(ValueError):
            curvlab.optimizer(model, est, rule, scaling, **curvlab.ESTIMATORS.get(est).suggested,
                              **({"base_width": 4} if "base_width" in hyper else {}))
        return
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), (est, rule, scaling, hyper)
    assert finite_state(opt.state_dict()["state"]) and finite_state(opt.state_dict()["curvlab"]["curvature"])
    assert opt.step_count + opt.skipped_steps == 3


def corruptions(rng: random.Random, est: str, rule: str, scaling: str) -> list[tuple[str, object]]:
    """(argument name, bad value) candidates; the name must appear in the error message."""
    bad = [("lr", -0.1), ("lr", math.nan), ("lr", "0.1"), ("damping", -1e-3), ("damping", math.inf),
           ("momentum", 1.0), ("momentum", -0.5), ("weight_decay", -1.0), ("ema_decay", 1.0), ("ema_decay", True),
           ("stat_interval", 0), ("stat_interval", 2.5), ("inv_interval", -3), ("inv_interval", "10"),
           ("fisher", "fishr"), ("fisher", None), ("loss", "xent"), ("kl_clip", 0.0), ("mc_samples", 0),
           ("capture", "hook"), ("layers", "0"), ("nonfinite", "ignore"), ("max_skipped_steps", 0),
           ("max_skipped_steps", 2.5),
           ("dampnig", 0.1), ("learning_rate", 0.1), ("momentun", 0.9)]
    options = {**curvlab.ESTIMATORS.get(est).options, **curvlab.RULES.get(rule).options,
               **curvlab.SCALINGS.get(scaling).options}
    for name, opt in options.items():
        if name in COMMON:
            continue
        d = opt.default
        if isinstance(d, bool):
            bad.append((name, "yes"))
        elif isinstance(d, str):
            bad += [(name, d + "_nope"), (name, 3.5)]
        elif isinstance(d, (int, float)):
            bad += [(name, "1"), (name, math.nan), (name, -1e9)]
    return bad


@pytest.mark.parametrize("seed", range(INVALID_DRAWS))
def test_invalid_draw_raises_with_a_message_naming_the_argument(seed):
    rng = random.Random(10_000 + seed)
    est, rule, scaling = rng.choice(ESTIMATORS), rng.choice(RULES), rng.choice(SCALINGS)
    model, _, _ = draw_model(rng)
    name, value = rng.choice(corruptions(rng, est, rule, scaling))
    try:
        curvlab.optimizer(model, est, rule, scaling, **{name: value})
    except (ValueError, TypeError) as err:
        msg = str(err)
        typo = name not in COMMON and name in ("dampnig", "learning_rate", "momentun")
        assert (f"{name!r}" in msg or f"{name} " in msg or f"{name}:" in msg) if not typo else f"{name!r}" in msg, msg
        assert len(msg) > 15
        return
    pytest.fail(f"{est}/{rule}/{scaling} accepted {name}={value!r}")


@pytest.mark.parametrize("seed", range(8))
def test_invalid_component_names_and_models_are_refused(seed):
    rng = random.Random(20_000 + seed)
    model, _, _ = draw_model(rng)
    kind = rng.choice(["estimator", "rule", "scaling"])
    real = rng.choice({"estimator": ESTIMATORS, "rule": RULES, "scaling": SCALINGS}[kind])
    typo = real[:-1] + ("x" if real[-1] != "x" else "y")
    args = {"estimator": "kfac", "rule": "natural", "scaling": "standard", kind: typo}
    with pytest.raises(ValueError, match=rf"unknown {kind} '{typo}'.*(Did you mean|Registered)"):
        curvlab.optimizer(model, **args)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        curvlab.optimizer(model, rng.choice(ESTIMATORS), rng.choice(RULES))
