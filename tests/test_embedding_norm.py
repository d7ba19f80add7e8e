"""Embedding and LayerNorm/RMSNorm curvature (curvlab.adapters.EmbeddingAdapter / ScaleShiftAdapter,
curvlab.estimators.scale_shift) against curvlab.exact in float64 on tiny cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab import exact
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("float64")


def blocks_after_one_step(model, x, y, loss, estimator="kfac", fisher="type2", **hyper):
    opt = curvlab.optimizer(model, estimator, "natural", loss=loss, fisher=fisher, ema_decay=0.0, **hyper)
    (F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)) if loss == "cross_entropy"
     else F.mse_loss(model(x), y)).backward()
    assert opt.update_curvature()
    return opt.blocks(), opt


def test_embedding_kfac_is_exact_for_a_linear_model_on_tokens():
    """One-hot inputs: a linear model of the tokens with MSE at every position is a deep linear network, where
    K-FAC-expand is exact; the input factor is the diagonal of token counts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3))
    x, y = torch.randint(0, 7, (5, 6)), torch.randn(5, 6, 3)
    blocks, opt = blocks_after_one_step(model, x, y, "mse")
    ref = exact.exact_blocks("ggn", model, x, y, loss="mse", modules=list(blocks))
    for name in blocks:
        assert_close(blocks[name], ref[name], rtol=1e-10, atol=1e-14, what=f"block {name}")
    a = opt.units[0].curvature.A
    counts = torch.bincount(x.reshape(-1), minlength=7).to(a.dtype) / x.numel()
    assert_close(a, torch.diag(counts), atol=0, what="embedding input factor = token frequencies")


def test_embedding_per_example_gradients_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randint(0, 6, (7, 4)), torch.randint(0, 3, (7,))
    opt = curvlab.optimizer(model, "miniblock", "natural", miniblock_size="layer", ema_decay=0.0)
    F.cross_entropy(model(x), y).backward()
    opt.update_curvature()
    blocks = opt.blocks()
    ref = exact.exact_blocks("empirical", model, x, y, modules=list(blocks))
    for name in blocks:
        assert_close(blocks[name], ref[name], rtol=1e-10, atol=1e-14, what=f"empirical block {name}")


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "layernorm_no_bias", "layernorm_frozen_scale"])
@pytest.mark.parametrize("fisher,kind", [("type2", "ggn"), ("empirical", "empirical")])
def test_norm_scale_shift_block_is_the_exact_fisher_block(norm, fisher, kind):
    torch.manual_seed(0)
    layer = nn.RMSNorm(6) if norm == "rmsnorm" else nn.LayerNorm(6, bias=norm != "layernorm_no_bias")
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        if getattr(layer, "bias", None) is not None:
            layer.bias.uniform_(-0.3, 0.3)
    if norm == "layernorm_frozen_scale":
        layer.weight.requires_grad_(False)
    model = nn.Sequential(nn.Linear(5, 6), layer, nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    blocks, opt = blocks_after_one_step(model, x, y, "cross_entropy", fisher=fisher)
    assert "1" in blocks, opt.coverage_report()
    ref = exact.exact_blocks(kind, model, x, y, modules=["1"])
    assert_close(blocks["1"], ref["1"], rtol=1e-10, atol=1e-14, what=f"{norm} block ({kind})")


def test_norm_curvature_options():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    full, _ = blocks_after_one_step(model, x, y, "cross_entropy", fisher="empirical")
    diag, _ = blocks_after_one_step(model, x, y, "cross_entropy", fisher="empirical", norm_curvature="diagonal")
    assert_close(diag["1"], torch.diag(torch.diagonal(full["1"])), what="diagonal scale/shift block")
    opt = curvlab.optimizer(model, "kfac", "natural", norm_curvature="off")
    assert not {c["name"]: c for c in opt.coverage()}["1.weight"]["preconditioned"]
    opt = curvlab.optimizer(model, "isaac", "natural")
    assert "reads no output gradients" in {c["name"]: c["how"] for c in opt.coverage()}["1.weight"]


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_per_example_blocks_are_exact_on_sequences(loss):
    """MBF with one block per layer is the empirical Fisher block: exact on (N, T, d) inputs whatever T, with a
    loss term at every position (the per-example gradient sums the positions; ALGORITHMS.md 11)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 3))
    x = torch.randint(0, 6, (7, 4))
    if loss == "mse":
        y = torch.randn(7, 4, 3)
        opt = curvlab.optimizer(model, "miniblock", "natural", loss="mse", miniblock_size="layer", ema_decay=0.0)
        F.mse_loss(model(x), y).backward()
        ref_model, ref_x, ref_y = model, x, y
    else:
        y = torch.randint(0, 3, (7, 4))
        opt = curvlab.optimizer(model, "miniblock", "natural", miniblock_size="layer", ema_decay=0.0)
        F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
    assert opt.update_curvature()
    blocks = opt.blocks()
    if loss == "cross_entropy":                   # exact.py takes (N, C) logits: the per-example loss by hand
        params = [p for p in model.parameters()]

        def example_loss(i):
            return F.cross_entropy(model(x[i:i + 1]).reshape(-1, 3), y[i].reshape(-1))

        grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(example_loss(i), params)]) for i in range(7)]
        pe = torch.stack(grads)
        offsets, start = {}, 0
        for name, m in model.named_children():
            n = sum(p.numel() for p in m.parameters())
            offsets[name], start = (start, start + n), start + n
        for name in blocks:
            a, b = offsets[name]
            assert_close(blocks[name], pe[:, a:b].T @ pe[:, a:b] / 7, rtol=1e-10, atol=1e-14, what=f"block {name}")
        return
    ref = exact.exact_blocks("empirical", ref_model, ref_x, ref_y, loss="mse", modules=list(blocks))
    for name in blocks:
        assert_close(blocks[name], ref[name], rtol=1e-10, atol=1e-14, what=f"empirical block {name} ({loss})")
