"""MBF's block layouts and statistics kernel (used by :mod:`curvlab.estimators.miniblock`; Bahamou, Goldfarb &
Ren, AISTATS 2023; ALGORITHMS.md 3.2-3.4).

* :func:`build_layout` -- the mini-block groups of a layer (per-row blocks, chunks, kernel slices, one block);
* :func:`auto_chunk` -- the chunk width of ``miniblock_mode="auto"`` when the per-row blocks do not fit;
* :func:`_row_stats` -- ``F_i = sum_n g_{n,i}^2 a_c a_c^T`` for every row and column chunk (eq. M.4) as GEMMs,
  without per-example gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_CHUNK = 2 ** 23  # largest intermediate of the statistics, in elements
_PACK_MIN_SIZE, _PACK_MIN_ROWS = 8, 256   # _row_stats packs blocks to their upper triangle from these on


# -- layouts ---------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Mini-blocks of one size ``m``: ``idx`` ``(B, m)`` indexes row-major ``vec(Wbar)``. ``cols`` ``(C, m)``
    is set when every row has the same column chunks (then ``B = d_out C``, blocks ordered (row, chunk))."""

    idx: Tensor
    cols: Tensor | None
    span: Any = False                   # :func:`_column_span`'s cache (False: not computed yet)


def _column_span(group: Group) -> tuple[int, int] | None:
    """``(lo, hi)`` when the group's column chunks tile the columns ``lo..hi-1`` in order (then its blocks are the
    rows of ``Wbar[:, lo:hi].reshape(-1, m)``), else ``None``. Cached on the group."""
    if group.cols is None:
        return None
    if group.span is False:
        cols = group.cols.reshape(-1)
        lo = int(cols[0])
        group.span = (lo, lo + cols.numel()) if torch.equal(cols.cpu(), torch.arange(lo, lo + cols.numel())) else None
    return group.span


def _split(t: Tensor, m: int) -> list[Tensor]:
    """Split the rows of ``t`` ``(B, k)`` into contiguous pieces of ``<= m``: ``(B q, m)`` and ``(B, k - q m)``."""
    b, k = t.shape
    if k <= m:
        return [t]
    q = k // m
    return [t[:, :q * m].reshape(b * q, m)] + ([t[:, q * m:]] if k > q * m else [])


def _rows(cols: Tensor, d_out: int, width: int) -> Group:
    idx = torch.arange(d_out).reshape(-1, 1, 1) * width + cols.unsqueeze(0)
    return Group(idx.reshape(-1, cols.shape[1]), cols)


def build_layout(weight_shape: torch.Size, shape: tuple[int, int], size: int | str | None, conv: str,
                 chunk: int | None = None) -> list[Group]:
    """The mini-block groups of a layer (see the module doc); ``chunk`` splits every block into ``<= chunk``."""
    d_out, width = shape
    style = conv if len(weight_shape) > 2 else ("layer" if size == "layer" else "rows")
    if style == "layer":
        groups = [Group(torch.arange(d_out * width).reshape(1, -1), None)]
    else:
        if style == "kernel":
            c_in, k = weight_shape[1], math.prod(weight_shape[2:])
            col_sets = [torch.arange(c_in * k).reshape(c_in, k)]
            if width > c_in * k:
                col_sets.append(torch.tensor([[width - 1]]))
        else:
            col_sets = [torch.arange(width).reshape(1, width)]
            if style == "rows" and isinstance(size, int):
                col_sets = _split(col_sets[0], size)
        groups = [_rows(c, d_out, width) for c in col_sets]
    if chunk is not None:
        groups = [_rows(c, d_out, width) for g in groups if g.cols is not None for c in _split(g.cols, chunk)] + \
                 [Group(i, None) for g in groups if g.cols is None for i in _split(g.idx, chunk)]
    return groups


def auto_chunk(start: int, state_bytes: Any, budget: float, cost: float, stat_interval: int) -> int:
    """The chunk width of ``miniblock_mode="auto"`` when the paper's per-row blocks fit neither directly nor in
    Woodbury form: ``start`` (``miniblock_chunk``) halved while the chunks' state (``state_bytes(chunk)``) exceeds
    ``budget`` bytes, or while their statistics cost more than ``cost`` times the layer's own forward+backward
    work per step. Chunks of width ``m`` cost ``N T d_out D m / 2`` multiply-adds per statistics step (packed
    upper triangles, eq. M.4) against ``3 N T d_out D`` for the layer's forward, input and weight gradients,
    so that bound is ``m <= 6 cost stat_interval``, whatever the layer's shape and batch (README "Performance")."""
    limit = 6.0 * cost * stat_interval
    chunk = start
    while chunk > 1 and (state_bytes(chunk) > budget or chunk > limit):
        chunk //= 2
    return chunk


def _diagonal_order(m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row and column of the upper-triangle entries of an ``m x m`` block, diagonal by diagonal."""
    rows = torch.cat([torch.arange(m - o, device=device) for o in range(m)])
    return rows, rows + torch.cat([torch.full((m - o,), o, device=device) for o in range(m)])


def _row_stats(a: Tensor, g: Tensor, cols: Tensor) -> Tensor:
    """``sum_n g_{n,i}^2 a_{n,c} a_{n,c}^T`` for every row ``i`` and column chunk ``c`` (eq. M.4 without 1/N):
    ``(d_out C, m, m)`` from ``a`` ``(N, D)``, ``g`` ``(N, d_out)``; no per-example gradient is formed.

    Blocks up to 256: one GEMM ``g^2^T Q`` with ``Q = a_c a_c^T`` flattened, packed to its upper triangle
    (half the flops) when the GEMM dominates (``d_out >= 256``, ``m >= 8``); the packed ``Q`` is built diagonal
    by diagonal from contiguous slices (``a_{c,k} a_{c,k+o}``, no index gathers) and the GEMM accumulates in place
    (measured 0.66-0.9x the time of the gathered form for 16- and 32-wide blocks of 512-row layers at
    ``N = 1024``, one thread); larger blocks:
    per row ``(A diag(g_i^2))^T A`` as batched GEMMs over rows."""
    (n, d_out), (c, m) = g.shape, cols.shape
    g2 = g.square()
    if m == 1:
        return (g2.T @ a[:, cols[:, 0]].square()).reshape(-1, 1, 1)
    if m <= 256 and (m < _PACK_MIN_SIZE or d_out < _PACK_MIN_ROWS):
        out = a.new_zeros(d_out, c * m * m)
        nc = -(-n // -(-n * c * m * m // _CHUNK))                                          # balanced chunks
        for s in range(0, n, nc):
            x = a[s:s + nc][:, cols]                                                       # (nc, C, m)
            out.addmm_(g2[s:s + nc].T, (x.unsqueeze(-1) * x.unsqueeze(-2)).reshape(len(x), -1))
        return out.view(-1, m, m)
    if m <= 256:
        # packed by diagonals: entries (k, k + o) for o = 0..m-1, each diagonal one product of two contiguous
        # slices of the chunk (no gathers); the GEMM accumulates straight into its slice of ``packed``
        t = m * (m + 1) // 2
        starts = [o * m - o * (o - 1) // 2 for o in range(m + 1)]                           # diagonal o's offset
        g2t = g2.T.contiguous()
        packed = a.new_zeros(d_out, c * t)
        cc, nc = max(1, _CHUNK // (n * t)), -(-n // -(-n * t // _CHUNK))          # balanced example chunks
        ac_all = a[:, cols]                                                                # (N, C, m)
        for c0 in range(0, c, cc):
            ac = ac_all[:, c0:c0 + cc]
            blk = packed[:, c0 * t:(c0 + ac.shape[1]) * t]
            for s in range(0, n, nc):
                x = ac[s:s + nc]
                q = x.new_empty(x.shape[0], x.shape[1], t)                                 # packed a a^T
                for o in range(m):
                    torch.mul(x[:, :, :m - o], x[:, :, o:], out=q[:, :, starts[o]:starts[o + 1]])
                blk.addmm_(g2t[:, s:s + nc], q.view(len(x), -1))
        rows_, cols_ = _diagonal_order(m, a.device)
        out, flat = a.new_empty(d_out * c, m * m), packed.view(-1, t)
        out.index_copy_(1, rows_ * m + cols_, flat).index_copy_(1, cols_ * m + rows_, flat)
        return out.view(-1, m, m)
    ac = a[:, cols]                                                                        # (N, C, m)
    at, an = ac.permute(1, 2, 0), ac.transpose(0, 1)                                      # (C, m, N), (C, N, m)
    out = a.new_empty(d_out, c, m, m)
    step = max(1, _CHUNK // (n * c * m))
    for s in range(0, d_out, step):
        out[s:s + step] = torch.matmul(at * g2[:, s:s + step].T[:, None, None, :], an)
    return out.reshape(-1, m, m)
