"""MBF (mini-block empirical Fisher) against the exact empirical Fisher of curvlab.exact (ALGORITHMS.md 3 and
7.2 item 6). float64 throughout; the expected block pattern is built here from the parameter layout alone."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlab
from curvlab import exact
from curvlab.linalg import batched_cholesky, chol_solve
from curvlab.linalg import FactorizationError
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("float64")


def block_ids(module: nn.Module, layout: str, m: int = 0) -> torch.Tensor:
    """Mini-block label of every parameter entry, in the order ``cat([weight.reshape(-1), bias])``."""
    w = module.weight
    d_out, k_in = w.shape[0], w[0].numel()
    rows = torch.arange(d_out).repeat_interleave(k_in)
    cols = torch.arange(k_in).repeat(d_out)
    if module.bias is not None:
        rows, cols = torch.cat([rows, torch.arange(d_out)]), torch.cat([cols, torch.full((d_out,), k_in)])
    if layout == "rows":
        return rows
    if layout == "chunks":                      # contiguous chunks of <= m along [W[i, :], b_i]
        return rows * 10_000 + cols // m
    if layout == "kernel":                      # (out, in) kernel slices; the bias column is its own block
        return rows * 10_000 + cols // w[0, 0].numel()
    if layout == "diag":
        return torch.arange(rows.numel())
    assert layout == "layer"
    return torch.zeros_like(rows)


def fitted(model, batches, loss="cross_entropy", ema_decay=0.0, refresh=True, **hyper):
    opt = curvlab.optimizer(model, "miniblock", "natural", loss=loss, ema_decay=ema_decay, **hyper)
    for x, y in batches:
        getattr(F, loss)(model(x), y).backward()
        assert opt.update_curvature()
        model.zero_grad()
    if refresh:
        opt.refresh()
    opt.capture.remove()
    return opt


def conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 5),
                         nn.Tanh(), nn.Linear(5, 3, bias=False))


def mlp(seed=0, d_in=12):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, 3))


def data(n, shape, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


CASES = {  # hyper-parameters -> (layout of the conv layer, layout of the Linear layers)
    "rows+kernel (defaults)": ({}, ("kernel", 0), ("rows", 0)),
    "size 4 + channel": ({"miniblock_size": 4, "miniblock_conv": "channel"}, ("rows", 0), ("chunks", 4)),
    "chunked mode": ({"miniblock_mode": "chunked", "miniblock_chunk": 7, "miniblock_conv": "channel"},
                     ("chunks", 7), ("chunks", 7)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_miniblock_is_the_exact_empirical_fisher_subblock(case):
    """Conv2d with padding and stride, Linear with and without bias: dense() = E masked by the layout."""
    hyper, conv_layout, lin_layout = CASES[case]
    model = conv_net()
    x, y = data(6, (2, 5, 5))
    opt = fitted(model, [(x, y)], **hyper)
    blocks = opt.blocks()
    ref = exact.exact_blocks("empirical", model, x, y, modules=list(blocks))
    for name, layout in {"0": conv_layout, "3": lin_layout, "5": lin_layout}.items():
        ids = block_ids(model[int(name)], *layout)
        mask = ids[:, None] == ids[None, :]
        assert_close(blocks[name], ref[name] * mask, atol=1e-14, what=f"{case}: layer {name}")
        assert (ref[name][mask] != 0).float().mean() > 0.9, "vacuous: the exact blocks are mostly zero"


def test_size_one_is_the_diagonal_empirical_fisher():
    model = mlp()
    x, y = data(9, (12,))
    blocks = fitted(model, [(x, y)], miniblock_size=1).blocks()
    ref = exact.exact_blocks("empirical", model, x, y, modules=list(blocks))
    for name in blocks:
        assert_close(blocks[name], torch.diag(ref[name].diagonal()), atol=1e-14, what=f"layer {name}")


def test_one_block_per_layer_is_the_dense_empirical_fisher_block():
    model = conv_net(1)
    x, y = data(5, (2, 5, 5), seed=1)
    blocks = fitted(model, [(x, y)], miniblock_size="layer", miniblock_conv="layer").blocks()
    ref = exact.exact_blocks("empirical", model, x, y, modules=list(blocks))
    for name in blocks:
        assert_close(blocks[name], ref[name], atol=1e-14, what=f"layer {name}")


def test_linear_on_sequences_uses_summed_per_example_gradients():
    """T > 1 rows per example (Linear on (N, L, d)): the per-example gradient is a sum over positions."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3))
    x, y = data(7, (3, 4), seed=2)
    opt = fitted(model, [(x, y)], miniblock_size=3)
    blocks = opt.blocks()
    ref = exact.exact_blocks("empirical", model, x, y, modules=list(blocks))
    for name in blocks:
        ids = block_ids(model[int(name)], "chunks", 3)
        assert_close(blocks[name], ref[name] * (ids[:, None] == ids[None, :]), atol=1e-14, what=f"layer {name}")


def test_ema_of_two_batches():
    model = mlp(3)
    (x1, y1), (x2, y2) = data(8, (12,), seed=1), data(5, (12,), seed=2)
    blocks = fitted(model, [(x1, y1), (x2, y2)], ema_decay=0.7).blocks()
    e1 = exact.exact_blocks("empirical", model, x1, y1, modules=list(blocks))
    e2 = exact.exact_blocks("empirical", model, x2, y2, modules=list(blocks))
    for name in blocks:
        ids = block_ids(model[int(name)], "rows")
        expected = (0.7 * e1[name] + 0.3 * e2[name]) * (ids[:, None] == ids[None, :])
        assert_close(blocks[name], expected, atol=1e-14, what=f"layer {name}")


def damped(curv, dense: torch.Tensor, lam: float, relative: bool, ids: torch.Tensor) -> torch.Tensor:
    """Dense damped block-diagonal matrix: lambda, or lambda * mean(diag) of each entry's block."""
    diag = dense.diagonal()
    if relative:
        means = {int(b): float(diag[ids == b].mean()) for b in ids.unique()}
        return dense + torch.diag(torch.tensor([lam * means[int(b)] for b in ids]))
    return dense + lam * torch.eye(dense.shape[0])


SOLVE_CASES = {"rows+kernel (defaults)": CASES["rows+kernel (defaults)"], "size 4 + channel": CASES["size 4 + channel"],
               "one block per layer": ({"miniblock_size": "layer", "miniblock_conv": "layer"}, ("layer", 0),
                                       ("layer", 0))}


@pytest.mark.parametrize("case,relative", [("rows+kernel (defaults)", False), ("size 4 + channel", True),
                                           ("one block per layer", False), ("one block per layer", True)])
def test_solve_is_the_damped_block_diagonal_inverse(case, relative):
    hyper, conv_layout, lin_layout = SOLVE_CASES[case]
    model = conv_net(4)
    lam = 0.05
    opt = fitted(model, [data(6, (2, 5, 5), seed=4)], damping=lam,
                 miniblock_damping="relative" if relative else "absolute", **hyper)
    gen = torch.Generator().manual_seed(0)
    for unit, layout in zip(opt.units, [conv_layout, lin_layout, lin_layout]):
        curv, idx = unit.curvature, unit.adapter.param_order(unit.module)
        V = torch.randn(*curv.shape, generator=gen)
        M = damped(curv, curv.dense(), lam, relative, block_ids(unit.module, *layout))
        expected = torch.linalg.solve(M, V.reshape(-1)[idx])
        assert_close(curv.solve(V).reshape(-1)[idx], expected, rtol=1e-9, atol=1e-12, what=f"solve {unit.name}")
        assert_close(curv.mv(V).reshape(-1)[idx], curv.dense() @ V.reshape(-1)[idx], what=f"mv {unit.name}")


@pytest.mark.parametrize("n,relative", [(5, False), (30, True)])
def test_woodbury_agrees_with_direct(n, relative):
    """eq. M.9 per row, N < d_in + 1 and N > d_in + 1; two batches kept (window 2) = the exact EMA."""
    batches = [data(n, (12,), seed=5), data(n + 3, (12,), seed=6)]
    common = dict(ema_decay=0.6, damping=0.02, miniblock_damping="relative" if relative else "absolute")
    direct = fitted(mlp(5), batches, miniblock_mode="direct", **common)
    wood = fitted(mlp(5), batches, miniblock_mode="woodbury", miniblock_window=2, **common)
    gen = torch.Generator().manual_seed(1)
    for ud, uw in zip(direct.units, wood.units):
        assert (ud.curvature.mode, uw.curvature.mode) == ("direct", "woodbury")
        V = torch.randn(*ud.curvature.shape, generator=gen)
        assert_close(uw.curvature.dense(), ud.curvature.dense(), atol=1e-14, what=f"dense {ud.name}")
        assert_close(uw.curvature.solve(V), ud.curvature.solve(V), rtol=1e-9, atol=1e-12, what=f"solve {ud.name}")
        assert_close(uw.curvature.mv(V), ud.curvature.mv(V), rtol=1e-10, atol=1e-13, what=f"mv {ud.name}")


def test_chunked_mode_equals_direct_mode_with_blocks_of_the_chunk_size():
    batches = [data(9, (12,), seed=7)]
    chunked = fitted(mlp(6), batches, miniblock_mode="chunked", miniblock_chunk=4, damping=0.01)
    direct = fitted(mlp(6), batches, miniblock_mode="direct", miniblock_size=4, damping=0.01)
    whole = fitted(mlp(6), batches, miniblock_mode="direct", damping=0.01)
    gen = torch.Generator().manual_seed(2)
    for uc, ud, uw in zip(chunked.units, direct.units, whole.units):
        V = torch.randn(*uc.curvature.shape, generator=gen)
        assert_close(uc.curvature.dense(), ud.curvature.dense(), atol=0, rtol=0, what=f"dense {uc.name}")
        assert_close(uc.curvature.solve(V), ud.curvature.solve(V), rtol=1e-12, what=f"solve {uc.name}")
        assert (uc.curvature.solve(V) - uw.curvature.solve(V)).abs().max() > 1e-6, "chunking changed nothing"


def test_auto_mode_follows_the_memory_budget():
    batches = [data(4, (300,), seed=8)]
    # first layer: direct 2 * 6 * 301^2 * 8 B = 8.7 MB; woodbury 6 * 16 * 8 B + ...: tiny
    auto = fitted(mlp(7, d_in=300), batches, miniblock_memory_mb=5.0, damping=0.1)
    assert [u.curvature.mode for u in auto.units] == ["woodbury", "direct"]
    big = fitted(mlp(7, d_in=300), [data(600, (300,), seed=8)], miniblock_memory_mb=1.0, miniblock_chunk=64,
                 damping=0.1, miniblock_cost=100.0)          # only the memory budget binds here
    curv = big.units[0].curvature                   # chunk 64: 2 * 6 * 301 * 64 * 8 B = 1.8 MB > 1 MB -> 32
    assert (curv.mode, curv.chunk) == ("chunked", 32)
    assert max(g.idx.shape[1] for g in curv.groups) == 32
    assert 0 < curv.memory_bytes() <= 2 ** 20
    assert fitted(mlp(7), batches[:0] + [data(4, (12,))]).units[0].curvature.mode == "direct"


def test_batched_ladder_repairs_only_failing_blocks_and_reports():
    events = []
    good = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]])            # PSD, rank 1: Cholesky fails, jitter works
    indefinite = torch.tensor([[1.0, 0.0], [0.0, -1.0]])         # needs the clamped eigendecomposition
    chol = batched_cholesky(torch.stack([good, singular, indefinite]).float(), "L", events).double()
    assert torch.isfinite(chol).all() and (chol.triu(1) == 0).all() and (chol.diagonal(dim1=1, dim2=2) > 0).all()
    assert_close(chol[0] @ chol[0].T, good, rtol=1e-6, atol=1e-6, what="untouched block")
    assert len(events) == 1 and "2/3 mini-blocks" in str(events[0]) and "1 with jitter" in str(events[0])
    assert "1 by eigendecomposition" in str(events[0])
    floor = 1e-10 * 7 / 6                                          # jitter * mean diag over all blocks
    assert_close(chol[2] @ chol[2].T, torch.diag(torch.tensor([1.0, floor])), rtol=1e-5, atol=1e-15, what="clamped")
    rhs = torch.randn(3, 2)
    assert_close(chol_solve(chol, rhs), torch.linalg.solve(chol @ chol.mT, rhs), rtol=1e-6, what="chol_solve")
    with pytest.raises(FactorizationError, match="'L'"):
        batched_cholesky(torch.stack([good, good * float("nan")]), "L", events)
    assert batched_cholesky(torch.stack([good, good]), "L", events).shape == (2, 2, 2) and len(events) == 1


def test_bad_configurations_name_the_layer_and_the_remedy(caplog):
    x, y = data(4, (2, 5, 5))
    with pytest.raises(ValueError, match=r"layer '0'.*woodbury.*'direct'"):
        fitted(conv_net(), [(x, y)], miniblock_mode="woodbury")
    with pytest.raises(ValueError, match=r"woodbury.*damping > 0"):
        fitted(mlp(), [data(4, (12,))], miniblock_mode="woodbury", damping=0.0)
    with pytest.raises(ValueError, match="fisher"):
        curvlab.optimizer(mlp(), "miniblock", fisher="mc")
    with pytest.raises(ValueError, match="miniblock_size"):
        curvlab.optimizer(mlp(), "miniblock", miniblock_size=0)
    with pytest.raises(ValueError, match="miniblock_conv"):
        curvlab.optimizer(mlp(), "miniblock", miniblock_conv="kernels")
    with caplog.at_level(logging.WARNING, logger="curvlab"):
        fitted(mlp(), [data(4, (12,))], miniblock_mode="woodbury", ema_decay=0.9, miniblock_window=2)
    assert "truncated" in caplog.text


@pytest.mark.parametrize("mode", ["direct", "woodbury"])
def test_state_dict_round_trip_and_training_step(mode):
    batches = [data(8, (12,), seed=9)]
    model = mlp(8)
    opt = curvlab.optimizer(model, "miniblock", lr=0.1, damping=0.1, miniblock_mode=mode, inv_interval=2)
    for x, y in batches * 3:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    clone = curvlab.optimizer(mlp(8), "miniblock", lr=0.1, damping=0.1, miniblock_mode=mode, inv_interval=2)
    clone.load_state_dict(opt.state_dict())
    V = torch.randn(6, 13)
    assert clone.units[0].curvature.mode == mode
    assert_close(clone.units[0].curvature.solve(V), opt.units[0].curvature.solve(V), what="solve after load")
    assert_close(clone.blocks()["0"], opt.blocks()["0"], what="blocks after load")


@pytest.mark.parametrize("width,m,d_out", [(7, 1, 4), (300, 40, 4), (300, 70, 256), (300, 260, 4), (300, 16, 256),
                                           (33, 8, 256), (33, 7, 256)])
def test_row_statistics_kernels_against_einsum(width, m, d_out):
    """The four kernels of the T = 1 fast path (diagonal, outer products, packed triangles, per-row GEMMs)."""
    from curvlab.estimators.miniblock_layout import _row_stats, _split
    gen = torch.Generator().manual_seed(width + m)
    a, g = torch.randn(5, width, generator=gen), torch.randn(5, d_out, generator=gen)
    for cols in _split(torch.arange(width).reshape(1, -1), m):
        ac = a[:, cols]
        expected = torch.einsum("ni,nck,ncl->ickl", g.square(), ac, ac).reshape(-1, *cols.shape[1:] * 2)
        assert_close(_row_stats(a, g, cols), expected, what=f"blocks of size {cols.shape[1]}")


def test_woodbury_refuses_an_ema_it_would_drop_and_auto_avoids_it():
    """miniblock_window=1 keeps one batch: an ema_decay > 0 would be silently ignored (the MBF figure's setting)."""
    with pytest.raises(curvlab.HyperParameterError, match=r"ema_decay=0.95 would be ignored.*miniblock_window >= 2"):
        curvlab.optimizer(mlp(), "miniblock", miniblock_mode="woodbury", ema_decay=0.95)
    batches = [data(4, (300,), seed=8), data(4, (300,), seed=9)]
    auto = fitted(mlp(7, d_in=300), batches, miniblock_memory_mb=5.0, damping=0.1, ema_decay=0.5)
    assert auto.units[0].curvature.mode == "chunked"                # honours the EMA instead of Woodbury
    kept = fitted(mlp(7, d_in=300), batches, miniblock_memory_mb=5.0, damping=0.1, ema_decay=0.5, miniblock_window=2)
    assert kept.units[0].curvature.mode == "woodbury"


@pytest.mark.parametrize("stat_interval,cost,chunk", [(1, 1.0, 4), (10, 1.0, 32), (10, 0.5, 16), (3, 100.0, 64)])
def test_auto_chunk_follows_the_cost_budget_and_equals_the_explicit_layout(stat_interval, cost, chunk):
    """Rows that fit neither directly nor as Woodbury are chunked at the largest halving of miniblock_chunk with
    chunk <= 6 * miniblock_cost * stat_interval; the result IS the explicit chunked mode of that width (float64,
    bit for bit)."""
    batches = [data(600, (300,), seed=8)]
    hyper = dict(miniblock_memory_mb=2.0, miniblock_chunk=64, damping=0.1, stat_interval=stat_interval)
    auto = fitted(mlp(7, d_in=300), batches, miniblock_cost=cost, **hyper)
    curv = auto.units[0].curvature
    assert (curv.mode, curv.chunk) == ("chunked", chunk)
    assert auto.units[1].curvature.mode == "direct"                 # 3 x 7 rows fit: the paper's blocks
    explicit = fitted(mlp(7, d_in=300), batches, miniblock_mode="chunked", **{**hyper, "miniblock_chunk": chunk})
    gen = torch.Generator().manual_seed(4)
    V = torch.randn(*curv.shape, generator=gen)
    ref = explicit.units[0].curvature
    assert_close(curv.dense(), ref.dense(), rtol=0, atol=0, what="dense")
    assert_close(curv.solve(V), ref.solve(V), rtol=0, atol=0, what="solve")


def test_auto_chunk_rule():
    from curvlab.estimators.miniblock_layout import auto_chunk
    assert auto_chunk(128, lambda m: 0, 1.0, 1.0, 10) == 32       # m <= 60
    assert auto_chunk(128, lambda m: 0, 1.0, 1.0, 100) == 128     # m <= 600: the cap
    assert auto_chunk(128, lambda m: m, 20.0, 100.0, 10) == 16    # memory binds
    assert auto_chunk(128, lambda m: 0, 1.0, 0.01, 1) == 1        # the diagonal at the end
