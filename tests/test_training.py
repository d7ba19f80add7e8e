"""Real training on scikit-learn's digits: K-FAC + natural gradient against momentum SGD."""
from __future__ import annotations

import pytest
pytest.importorskip("sklearn", reason="scikit-learn provides the bundled digits data set")
from helpers import train_digits  # noqa: E402


# Best of a same-effort grid at 1-2 epochs (12 configurations each; K-FAC: lr {0.03,0.1,0.3} x momentum
# {0,0.5} x damping {0.03,0.1}; SGD: lr {0.03,0.1,0.3,1} x momentum {0,0.5,0.9}).
KFAC = dict(lr=0.1, damping=0.1, momentum=0.5, ema_decay=0.95, inv_interval=5, kl_clip=None)   # = suggested
SGD = dict(lr=0.3, momentum=0.9)


def test_kfac_reaches_95_percent_and_beats_sgd_at_equal_epochs():
    kfac_acc, opt = train_digits("kfac", 8, **KFAC)
    sgd_acc, _ = train_digits("identity", 8, **SGD)
    print(f"digits after 8 epochs: K-FAC {kfac_acc:.4f}, SGD {sgd_acc:.4f}")
    assert kfac_acc >= 0.95
    assert opt.skipped_steps == 0 and not opt.events
    early_kfac, _ = train_digits("kfac", 1, **KFAC)
    early_sgd, _ = train_digits("identity", 1, **SGD)
    print(f"digits after 1 epoch: K-FAC {early_kfac:.4f}, SGD {early_sgd:.4f}")
    assert early_kfac > early_sgd


@pytest.mark.parametrize("fisher", ["empirical", "type2"])
def test_kfac_trains_with_every_fisher_type(fisher):
    acc, _ = train_digits("kfac", 3, fisher=fisher, **KFAC)
    assert acc >= 0.9


def test_kfc_trains_a_small_cnn():
    acc, opt = train_digits("kfac", 3, model="cnn", **KFAC)
    sgd_acc, _ = train_digits("identity", 3, model="cnn", **SGD)
    print(f"digits CNN after 3 epochs: KFC {acc:.4f}, SGD {sgd_acc:.4f}")
    assert all(c["preconditioned"] for c in opt.coverage())
    assert acc >= 0.9
