"""A torch.nn.TransformerEncoder language model (converted with curvlab.nn.convert) trains with every
estimator x rule: >= 90% of its parameters preconditioned, the loss falling, no skipped step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab

PAIRS = [(e, r) for e in curvlab.ESTIMATORS.names() for r in curvlab.RULES.names()]
V, T, D = 11, 8, 16


class TinyLM(nn.Module):
    """Token + position embeddings, a causal TransformerEncoder (batch_first), a Linear head: (N, T, V)."""

    def __init__(self, layers: int = 1):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        layer = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(D, V)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T), persistent=False)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head(self.encoder(h, mask=self.mask, is_causal=True))


def sequences(n: int = 32, seed: int = 0):
    """Next token = (token + step) mod V, the step drawn per sequence from {1, 2}: learnable in context."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    step = torch.randint(1, 3, (n, 1), generator=g)
    seq = (start + step * torch.arange(T + 1)) % V
    return seq[:, :-1], seq[:, 1:]


def lm_loss(model, x, y):
    return F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))


@pytest.mark.parametrize("estimator,rule", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_transformer_lm_trains_with_every_estimator_and_rule(estimator, rule):
    torch.manual_seed(0)
    model = curvlab.nn.convert(TinyLM())
    hyper = {**curvlab.ESTIMATORS.get(estimator).suggested, **curvlab.RULES.get(rule).suggested}
    opt = curvlab.optimizer(model, estimator, rule, strict=estimator != "isaac", **hyper)
    rows = opt.coverage()
    covered = sum(r["numel"] for r in rows if r["preconditioned"]) / sum(r["numel"] for r in rows)
    assert covered >= 0.90, opt.coverage_report()
    x, y = sequences()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.skipped_steps == 0 and all(torch.isfinite(p).all() for p in model.parameters())
    assert min(losses[-5:]) < 0.8 * losses[0], f"{estimator}/{rule}: loss {losses[0]:.3f} -> {losses[-5:]}"
