"""Real training on scikit-learn's digits: K-FAC + natural gradient against momentum SGD."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import curvlab

pytest.importorskip("sklearn", reason="scikit-learn provides the bundled digits data set")
from curvlab.data import batches, load_digits  # noqa: E402
from curvlab.models import mlp, small_cnn  # noqa: E402


def train(estimator, epochs, seed=0, model_fn=None, **hyper):
    split = load_digits(seed=0)
    torch.manual_seed(seed)
    model = (model_fn or (lambda: mlp(64, 64, 2, 10, activation="tanh")))()
    opt = curvlab.optimizer(model, estimator, "natural", **hyper)
    gen = torch.Generator().manual_seed(seed)
    reshape = (lambda x: x.reshape(-1, 1, 8, 8)) if model_fn else (lambda x: x)
    for _ in range(epochs):
        for xb, yb in batches(split.x_train, split.y_train, 64, generator=gen):
            opt.zero_grad()
            F.cross_entropy(model(reshape(xb)), yb).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(reshape(split.x_test)).argmax(1) == split.y_test).float().mean().item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return acc, opt


# Best of a same-effort grid at 1-2 epochs (12 configurations each; K-FAC: lr {0.03,0.1,0.3} x momentum
# {0,0.5} x damping {0.03,0.1}; SGD: lr {0.03,0.1,0.3,1} x momentum {0,0.5,0.9}).
KFAC = dict(lr=0.1, damping=0.1, momentum=0.5, ema_decay=0.95, inv_interval=5)
SGD = dict(lr=0.3, momentum=0.9)


def test_kfac_reaches_95_percent_and_beats_sgd_at_equal_epochs():
    kfac_acc, opt = train("kfac", 8, **KFAC)
    sgd_acc, _ = train("identity", 8, **SGD)
    print(f"digits after 8 epochs: K-FAC {kfac_acc:.4f}, SGD {sgd_acc:.4f}")
    assert kfac_acc >= 0.95
    assert opt.skipped_steps == 0 and not opt.events
    early_kfac, _ = train("kfac", 1, **KFAC)
    early_sgd, _ = train("identity", 1, **SGD)
    print(f"digits after 1 epoch: K-FAC {early_kfac:.4f}, SGD {early_sgd:.4f}")
    assert early_kfac > early_sgd


@pytest.mark.parametrize("fisher", ["empirical", "type2"])
def test_kfac_trains_with_every_fisher_type(fisher):
    acc, _ = train("kfac", 3, fisher=fisher, **KFAC)
    assert acc >= 0.9


def test_kfc_trains_a_small_cnn():
    acc, opt = train("kfac", 3, model_fn=lambda: small_cnn(1, 8, 10, image_size=8), **KFAC)
    sgd_acc, _ = train("identity", 3, model_fn=lambda: small_cnn(1, 8, 10, image_size=8), **SGD)
    print(f"digits CNN after 3 epochs: KFC {acc:.4f}, SGD {sgd_acc:.4f}")
    assert all(c["preconditioned"] for c in opt.coverage())
    assert acc >= 0.9
