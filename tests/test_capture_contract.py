"""The capture contract (curvlab.capture), for EVERY registered estimator x rule (plugins included).

Statistics come only from training passes (a forward whose backward accumulates into the optimized
parameters' ``.grad`` before ``step()``); other autograd work leaves the curvature and the update bit-for-bit
unchanged; micro-batches pool into one batch; several uses of a layer are one example's positions; any subset
of a layer's parameters may train; a layer whose forward is never seen falls back to first order with a
warning (``strict=True`` raises).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from helpers import assert_close

PAIRS = [(e, r) for e in curvlab.ESTIMATORS.names() for r in curvlab.RULES.names()]
IDS = ["-".join(p) for p in PAIRS]


def fisher_of(estimator: str, wanted: str = "type2") -> str:
    types = curvlab.ESTIMATORS.get(estimator).fisher_types
    return wanted if wanted in types else types[0]


def hyper(estimator: str, rule: str, **extra) -> dict:
    h = {**curvlab.ESTIMATORS.get(estimator).suggested, **curvlab.RULES.get(rule).suggested}
    h.update(inv_interval=2, stat_interval=1)
    h.update(extra)
    return h


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def data(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def state_tensors(opt) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state (curvature statistics, inverses, momentum) in a fixed order."""
    out, stack = [], [opt.state_dict()]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item[k] for k in sorted(item, key=str, reverse=True))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return out


def train(estimator, rule, between=None, steps: int = 3, fisher: str = "mc", **extra):
    """Three plain steps; ``between(model)`` runs after every step (extra autograd work)."""
    model = net()
    opt = curvlab.optimizer(model, estimator, rule, **hyper(estimator, rule, fisher=fisher_of(estimator, fisher),
                                                           **extra))
    x, y = data()
    for k in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x + 0.1 * k), y).backward()
        opt.step()
        if between is not None:
            between(model)
    return model, opt


def other_work(model: nn.Module) -> None:
    """What a research loop does between steps: autograd.grad of another objective, an evaluation forward
    with grad enabled that is never back-propagated, and a backward into something else than the parameters."""
    x2 = torch.linspace(-1, 1, 5 * 6).reshape(5, 6)
    params = [p for p in model.parameters() if p.requires_grad]
    gnorm = torch.autograd.grad(model(x2).pow(2).mean(), params)
    assert all(torch.isfinite(g).all() for g in gnorm)
    model(x2 * 2)                                          # never back-propagated
    xin = x2.clone().requires_grad_(True)
    model(xin).sum().backward(inputs=[xin])               # backward into the input only


FISHER_CASES = [(e, r, f) for e, r in PAIRS for f in curvlab.ESTIMATORS.get(e).fisher_types]


@pytest.mark.parametrize("estimator,rule,fisher", FISHER_CASES, ids=["-".join(c) for c in FISHER_CASES])
def test_other_autograd_work_leaves_curvature_and_update_unchanged(estimator, rule, fisher):
    ref_model, ref_opt = train(estimator, rule, fisher=fisher)
    model, opt = train(estimator, rule, between=other_work, fisher=fisher)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), f"{estimator}/{rule}/{fisher}: parameter {name} changed by other autograd work"
    mine, ref = state_tensors(opt), state_tensors(ref_opt)
    assert len(mine) == len(ref) and all(torch.equal(a, b) for a, b in zip(mine, ref)), \
        f"{estimator}/{rule}/{fisher}: optimizer state changed by other autograd work"


@pytest.mark.parametrize("estimator,rule", PAIRS, ids=IDS)
def test_micro_batches_pool_into_one_batch(estimator, rule, float64):
    """Two micro-batches, each mean loss halved (the usual idiom), step exactly like the whole batch."""
    results = []
    for split in (False, True):
        model = net()
        opt = curvlab.optimizer(model, estimator, rule, **hyper(estimator, rule, fisher=fisher_of(estimator)))
        x, y = data(8)
        for k in range(2):
            opt.zero_grad()
            xs = x + 0.1 * k
            if split:
                for sl in (slice(0, 4), slice(4, 8)):
                    (F.cross_entropy(model(xs[sl]), y[sl]) * 0.5).backward()
            else:
                F.cross_entropy(model(xs), y).backward()
            opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert_close(results[1], results[0], rtol=1e-9, atol=1e-12, what=f"{estimator}/{rule}: micro-batch parameters")


class Shared(nn.Module):
    """A layer applied twice in one forward (a recurrent cell / shared projection)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(6, 5)
        self.cell = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.cell(h))
        h = torch.tanh(self.cell(h))
        return self.out(h)


@pytest.mark.parametrize("estimator,rule", PAIRS, ids=IDS)
def test_shared_layer_trains_with_its_uses_as_positions(estimator, rule):
    model = Shared()
    opt = curvlab.optimizer(model, estimator, rule, strict=True, **hyper(estimator, rule, fisher=fisher_of(estimator)))
    x, y = data(16)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.skipped_steps == 0 and all(torch.isfinite(p).all() for p in model.parameters())
    assert min(losses[6:]) < losses[0], f"{estimator}/{rule}: no progress on the shared-layer model: {losses}"


def frozen_net() -> nn.Module:
    model = net()
    model[0].bias.requires_grad_(False)       # only the bias frozen
    model[2].weight.requires_grad_(False)     # only the weight frozen
    return model


@pytest.mark.parametrize("estimator,rule", PAIRS, ids=IDS)
def test_partly_frozen_layers(estimator, rule):
    model = frozen_net()
    frozen = {"0.bias": model[0].bias.detach().clone(), "2.weight": model[2].weight.detach().clone()}
    trained = {"0.weight": model[0].weight.detach().clone(), "2.bias": model[2].bias.detach().clone()}
    opt = curvlab.optimizer(model, estimator, rule, **hyper(estimator, rule, fisher=fisher_of(estimator)))
    how = {c["name"]: c["how"] for c in opt.coverage()}
    assert "bias frozen" in how["0"] and "weight frozen" in how["2"], how
    x, y = data()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), f"frozen {name} changed"
    for name, before in trained.items():
        assert not torch.equal(params[name], before), f"trainable {name} did not change"
    assert opt.skipped_steps == 0


class ThroughWeight(nn.Module):
    """``proj`` is used through its weight (as nn.MultiheadAttention uses out_proj), never called."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 5)
        self.proj = nn.Linear(5, 3)

    def forward(self, x):
        return F.linear(torch.tanh(self.inp(x)), self.proj.weight, self.proj.bias)


@pytest.mark.parametrize("estimator,rule", PAIRS, ids=IDS)
def test_never_called_layer_falls_back_with_one_warning(estimator, rule):
    model = ThroughWeight()
    opt = curvlab.optimizer(model, estimator, rule, **hyper(estimator, rule, fisher=fisher_of(estimator)))
    x, y = data()
    before = model.proj.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    mine = [w for w in caught if issubclass(w.category, curvlab.CaptureWarning)]
    if opt.capture is None:                   # nothing captured from forwards: nothing to miss
        assert not mine
    else:
        assert len(mine) == 1 and "'proj'" in str(mine[0].message) and "through its parameters" in str(mine[0].message)
        assert mine[0].filename == __file__, "the warning must point at the user's step() call"
    assert not torch.equal(model.proj.weight, before) and opt.step_count == 3 and opt.skipped_steps == 0
    if opt.capture is not None:
        strict = curvlab.optimizer(ThroughWeight(), estimator, rule, strict=True,
                                   **hyper(estimator, rule, fisher=fisher_of(estimator)))
        m = strict.param_groups[0]["params"][0]
        F.cross_entropy(strict.model(x), y).backward()
        with pytest.raises(RuntimeError, match=r"'proj'.*strict=True"):
            strict.step()
        assert m is strict.param_groups[0]["params"][0]


@pytest.mark.parametrize("estimator,rule", PAIRS, ids=IDS)
def test_an_evaluation_closure_inside_paused_leaves_the_step_unchanged(estimator, rule):
    """``zero_grad``, forward and backward of another batch inside ``paused()`` between the training pass and
    ``step()`` (the adaptive dampings' extra closure calls): with ``.grad`` put back, the step is the plain one."""
    def evaluate(model, opt):
        saved = [p.grad.clone() for p in model.parameters()]
        with curvlab.capture.paused():
            opt.zero_grad()
            F.cross_entropy(model(torch.linspace(-1, 1, 30).reshape(5, 6)), torch.tensor([0, 1, 2, 0, 1])).backward()
        for p, g in zip(model.parameters(), saved):
            p.grad = g

    runs = []
    for between in (None, evaluate):
        model = net()
        opt = curvlab.optimizer(model, estimator, rule, **hyper(estimator, rule))
        x, y = data()
        for k in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x + 0.1 * k), y).backward()
            if between is not None:
                between(model, opt)
            opt.step()
        runs.append((model, opt))
    (ref, ref_opt), (model, opt) = runs
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), f"{estimator}/{rule}: parameter {name} changed by a paused evaluation closure"
    mine, theirs = state_tensors(opt), state_tensors(ref_opt)
    assert len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs)), \
        f"{estimator}/{rule}: optimizer state changed by a paused evaluation closure"
