"""Every (estimator, rule, scaling) triple in the registry trains, or refuses clearly at construction.

Parametrized over the registry, so plugin components are covered automatically: each triple trains an MLP
on digits for ~250 steps with the estimator's ``suggested`` hyper-parameters (updated by the rule's
``suggested``) and must lower the training loss without any non-finite value or skipped step.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import curvlab

pytest.importorskip("sklearn", reason="scikit-learn provides the bundled digits data set")
from curvlab.data import batches, load_digits  # noqa: E402
from curvlab.models import mlp  # noqa: E402

ESTIMATORS, RULES, SCALINGS = curvlab.ESTIMATORS.names(), curvlab.RULES.names(), curvlab.SCALINGS.names()
BUILTIN = {"estimator": {"identity", "isaac", "kfac", "miniblock", "shampoo"}, "rule": {"natural", "fop", "sngm"},
           "scaling": {"standard", "mup"}}
#: built-in triples that may refuse at construction (none today: every built-in triple must build and train)
MAY_REFUSE: set[tuple[str, str, str]] = set()
TRIPLES = [(e, r, s) for e in ESTIMATORS for r in RULES for s in SCALINGS]


def hyper_for(estimator: str, rule: str, scaling: str) -> dict:
    hyper = {**curvlab.ESTIMATORS.get(estimator).suggested, **curvlab.RULES.get(rule).suggested}
    if "base_width" in curvlab.SCALINGS.get(scaling).options:
        hyper["base_width"] = 32          # the model below is twice as wide: mup really rescales
    return hyper


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


@pytest.mark.parametrize("estimator,rule,scaling", TRIPLES, ids=["-".join(t) for t in TRIPLES])
def test_triple_trains_digits_or_refuses_clearly(estimator, rule, scaling, digits):
    torch.manual_seed(0)
    model = mlp(64, 64, 2, 10, activation="tanh")
    builtin = estimator in BUILTIN["estimator"] and rule in BUILTIN["rule"] and scaling in BUILTIN["scaling"]
    try:
        opt = curvlab.optimizer(model, estimator, rule, scaling, **hyper_for(estimator, rule, scaling))
    except ValueError as err:
        assert not builtin or (estimator, rule, scaling) in MAY_REFUSE, f"built-in triple refused: {err}"
        assert len(str(err)) > 40 and (rule in str(err) or estimator in str(err) or scaling in str(err)), str(err)
        return

    def train_loss():
        with torch.no_grad():
            return F.cross_entropy(model(digits.x_train), digits.y_train).item()

    start = train_loss()                  # after construction: mup re-initializes the weights
    gen = torch.Generator().manual_seed(0)
    steps = 0
    for _ in range(6):
        for xb, yb in batches(digits.x_train, digits.y_train, 32, generator=gen):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            steps += 1
    end = train_loss()
    with torch.no_grad():
        acc = (model(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    print(f"GRID {estimator:<10} {rule:<8} {scaling:<9} train loss {start:.3f} -> {end:.4f}  test acc {acc:.4f}")
    assert steps >= 250
    assert opt.skipped_steps == 0, opt.events
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert end < 0.5 * start, f"{estimator}/{rule}/{scaling}: train loss {start:.3f} -> {end:.3f}"
