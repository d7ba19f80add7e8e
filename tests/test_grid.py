"""Every (estimator, rule, scaling) triple in the registry either builds and takes one finite step on a small MLP,
or refuses at construction with a ValueError that says why (DESIGN.md: any triple forms an optimizer).

Parametrized over the registry at collection time, so new components (plugins included) are covered
automatically. Built-in triples outside MAY_REFUSE must build."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab

ESTIMATORS, RULES, SCALINGS = curvlab.ESTIMATORS.names(), curvlab.RULES.names(), curvlab.SCALINGS.names()
BUILTIN = {"estimator": {"identity", "isaac", "kfac", "miniblock", "shampoo"}, "rule": {"natural", "fop", "sngm"},
           "scaling": {"standard", "mup"}}
#: built-in triples that may refuse at construction (none today: every built-in triple must build and step)
MAY_REFUSE: set[tuple[str, str, str]] = set()
TRIPLES = [(e, r, s) for e in ESTIMATORS for r in RULES for s in SCALINGS]


@pytest.mark.parametrize("estimator,rule,scaling", TRIPLES, ids=["-".join(t) for t in TRIPLES])
def test_triple_builds_and_steps_or_refuses_clearly(estimator, rule, scaling):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    hyper = dict(curvlab.ESTIMATORS.get(estimator).suggested)
    if "base_width" in curvlab.SCALINGS.get(scaling).options:
        hyper["base_width"] = 8
    builtin = estimator in BUILTIN["estimator"] and rule in BUILTIN["rule"] and scaling in BUILTIN["scaling"]
    try:
        opt = curvlab.optimizer(model, estimator, rule, scaling, **hyper)
    except ValueError as err:
        assert builtin is False or (estimator, rule, scaling) in MAY_REFUSE, f"built-in triple refused: {err}"
        assert len(str(err)) > 40 and (rule in str(err) or estimator in str(err) or scaling in str(err)), str(err)
        return
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.skipped_steps == 0, opt.events
    after = list(model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "no parameter moved"
