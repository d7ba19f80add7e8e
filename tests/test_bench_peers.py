"""Equal math between each peer library's step and its ``curvlab_equivalent`` (curvlab.bench.peers).

float64, a small MLP, a few steps: the parameter updates must agree to rounding (K-FAC peers, summed-statistics
Shampoo) or to the peer's root-iteration tolerance (ASDL's coupled Newton, 1e-6 on ``M - I``). Each peer is
optional (``pytest.importorskip``); the documented differences (bias conventions) are checked to be real.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlab.bench import peers
from helpers import assert_close


def _mlp(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias), nn.Tanh(),
                         nn.Linear(4, 3, bias=bias)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)


def _updates(peer: str, *, bias: bool, steps: int, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Total parameter change after ``steps`` steps: (peer, curvlab equivalent)."""
    model = _mlp(bias)
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peers.make_peer_step(peer, model, x, y, **settings)
        ours = peers.make_curvlab_step(peer, model, x, y, **settings)
        for _ in range(steps):
            theirs()
            ours()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    d_theirs = torch.cat([p.detach().flatten() for p in theirs.model.parameters()]) - start
    d_ours = torch.cat([p.detach().flatten() for p in ours.model.parameters()]) - start
    assert float(d_ours.norm()) > 1e-3, "the curvlab step did not move the parameters"
    return d_theirs, d_ours


BASE = dict(lr=0.1, damping=0.01, loss="cross_entropy")


@pytest.mark.parametrize("fisher", ["empirical", "type2"])
def test_asdl_kfac_equals_curvlab_kfac(fisher):
    pytest.importorskip("asdl")
    # 3 steps: statistics every step, inverses every 2nd (step 1 preconditions with step 0's inverses), momentum
    theirs, ours = _updates("asdl-kfac", bias=False, steps=3, momentum=0.9, stat_interval=1, inv_interval=2,
                            fisher=fisher, ema_decay=0.0, **BASE)
    assert_close(theirs, ours, rtol=1e-10, atol=1e-13, what=f"asdl-kfac ({fisher}) update")


@pytest.mark.parametrize("fisher", ["empirical", "type2"])
def test_curvlinops_kfac_equals_curvlab_kfac(fisher):
    pytest.importorskip("curvlinops")
    # with biases (curvlinops folds them into A like curvlab), EMA, refreshes every 2nd step, momentum
    theirs, ours = _updates("curvlinops-kfac", bias=True, steps=3, momentum=0.9, stat_interval=1, inv_interval=2,
                            fisher=fisher, ema_decay=0.7, **BASE)
    assert_close(theirs, ours, rtol=1e-10, atol=1e-13, what=f"curvlinops-kfac ({fisher}) update")


def test_asdl_shampoo_equals_curvlab_shampoo():
    pytest.importorskip("asdl")
    theirs, ours = _updates("asdl-shampoo", bias=False, steps=3, momentum=0.9, stat_interval=1, inv_interval=2,
                            ema_decay=0.0, **BASE)
    # ASDL's Newton stops at max|M - I| <= 1e-6: on these rank-deficient statistics (cond ~ 1/damping) its roots
    # are up to ~3e-6 relative off the eigh roots (measured): tolerance 3e-5 relative + 1e-5 of the largest entry
    assert_close(theirs, ours, rtol=3e-5, atol=1e-5 * float(ours.abs().max()), what="asdl-shampoo update")


def test_pytorch_optimizer_shampoo_equals_curvlab_shampoo():
    pytest.importorskip("pytorch_optimizer")
    theirs, ours = _updates("pytorch_optimizer-shampoo", bias=False, steps=3, momentum=0.0, stat_interval=1,
                            inv_interval=1, ema_decay=0.0, **BASE)
    assert_close(theirs, ours, rtol=1e-10, atol=1e-13, what="pytorch_optimizer-shampoo update")


@pytest.mark.parametrize("peer", ["asdl-kfac", "asdl-shampoo", "pytorch_optimizer-shampoo"])
def test_documented_bias_difference_is_real(peer):
    """DIFFERENCES says these peers treat biases differently: with biases the updates must NOT agree."""
    pytest.importorskip(peers._MODULES[peer][0])
    assert any("bias" in d for d in peers.DIFFERENCES[peer])
    theirs, ours = _updates(peer, bias=True, steps=1, momentum=0.0, stat_interval=1, inv_interval=1,
                            ema_decay=0.0, **BASE)
    assert float((theirs - ours).norm()) > 1e-3 * float(ours.norm())


def test_singd_step_runs():
    pytest.importorskip("singd")
    model = _mlp(True)
    x, y = _data()
    step = peers.make_peer_step("singd", model, x, y, lr=0.1, damping=0.01, momentum=0.9, stat_interval=2,
                                inv_interval=2)
    for _ in range(3):
        step()
    moved = sum(float((p - q).detach().abs().sum()) for p, q in zip(step.model.parameters(), model.parameters()))
    assert moved > 0 and all(torch.isfinite(p).all() for p in step.model.parameters())


def test_status_and_bad_arguments():
    status = peers.peer_status()
    assert set(status) == set(peers.PEERS) == set(peers.DIFFERENCES)
    assert all(v.startswith("ok (") or v.startswith("unavailable") for v in status.values())
    model, (x, y) = _mlp(False), _data()
    with pytest.raises(ValueError, match="peer must be one of"):
        peers.make_peer_step("kfac-pytorch", model, x, y, lr=0.1, damping=0.1, momentum=0.0, stat_interval=1,
                             inv_interval=1)
    with pytest.raises(ValueError, match="fisher"):
        peers.curvlab_equivalent("asdl-kfac", lr=0.1, damping=0.1, momentum=0.0, stat_interval=1, inv_interval=1,
                                 fisher="exact")
    with pytest.raises(ValueError, match="stat_interval"):
        peers.make_peer_step("asdl-kfac", model, x, y, lr=0.1, damping=0.1, momentum=0.0, stat_interval=0,
                             inv_interval=1)
