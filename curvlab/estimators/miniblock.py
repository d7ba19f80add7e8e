"""MBF: the mini-block empirical Fisher (Bahamou, Goldfarb & Ren, AISTATS 2023; ALGORITHMS.md section 3).

Each layer's block of the EMPIRICAL Fisher ``E = (1/N) sum_n grad l_n grad l_n^T`` (real labels, pitfall P0
handled by the capture backend) is approximated by a block-diagonal matrix of many small "mini-blocks",
each the exact sub-block of ``E`` over its entries of ``Wbar`` (the adapter's ``(d_out, d_in[+1])`` view):

* Linear (eq. M.3/M.4): one block per output neuron ``i`` over ``wbar_i = [W[i, :], b_i]``,
  ``F_i = (1/N) sum_n g_{n,i}^2 abar_n abar_n^T``. ``miniblock_size=m`` splits every row into contiguous
  chunks of ``<= m`` entries (``1`` = the diagonal empirical Fisher), ``"layer"`` = one block per layer (the
  dense empirical-Fisher block), ``None`` (default) = one block per row (the layout of ALGORITHMS 3.2 [U]).
* Conv2d (eq. M.1/M.2): ``miniblock_conv="kernel"`` (default) gives one ``k_h k_w`` block per (output channel
  ``i``, input channel ``j``) kernel slice and 1x1 blocks for the biases; the default because 3.2 argues
  that "many blocks of modest size" rules out per-channel blocks of up to 4608 entries [U].
  ``"channel"`` gives one block per output channel (``c_in k_h k_w (+1)``), ``"layer"`` one per layer.

Statistics go straight into the blocks, chunked so that no intermediate exceeds ``_CHUNK`` elements: with
one input row per example (Linear on 2-D inputs) ``F_i = A^T diag(g_i^2) A`` as batched GEMMs without any
per-example gradient; otherwise (Conv2d, Linear on sequences) per-example gradients are formed for a chunk
of examples at a time (ALGORITHMS 3.4) and reduced into the blocks. EMA (eq. M.5) uses ``ema_decay``;
Tikhonov damping (eq. M.6) is added per block at ``refresh`` only: ``miniblock_damping="absolute"``
(default: ``F_b + lambda I``, the pinned meaning of ``damping``) or ``"relative"`` (``F_b + lambda
mean(diag F_b) I``, suggested by 3.5/3.8 [U]). Blocks of one size are inverted by one batched Cholesky
call; failing blocks go through the ladder of :mod:`curvlab.linalg` (float64, jitter, clamped eigh),
reported as :class:`~curvlab.linalg.NumericsEvent` (:func:`curvlab.linalg.batched_cholesky`).

Storage modes (``miniblock_mode``, per layer; 3.2 (a)-(c)):

* ``"direct"``: stored blocks and their inverses (size <= 32) or Cholesky factors, ``2 sum_b m_b^2`` numbers;
* ``"woodbury"`` (eq. M.9, one block per row of a Linear layer on 2-D inputs): keeps ``Z_i = diag(g_i) Abar
  / sqrt(N)`` in factored form and one ``R x R`` core per row (``R`` = examples kept), exact for
  ``ema_decay=0``; with ``ema_decay>0`` it is an EMA truncated to the last ``miniblock_window`` batches, so
  ``ema_decay > 0`` needs ``miniblock_window >= 2`` (with one batch kept the EMA would be silently dropped: refused
  at construction, and ``"auto"`` then never picks Woodbury);
* ``"chunked"``: the direct mode with every block split into contiguous chunks of ``<= miniblock_chunk``;
* ``"auto"`` (default): direct if it fits ``miniblock_memory_mb``, else Woodbury if it applies and fits (both
  keep the paper's per-row blocks), else chunked, the chunk halved from ``miniblock_chunk`` until it fits the memory
  budget AND its statistics cost at most ``miniblock_cost`` (default 1) times the layer's forward+backward work per
  step, i.e. ``chunk <= 6 miniblock_cost stat_interval`` (:func:`curvlab.estimators.miniblock_layout.auto_chunk`;
  the per-row blocks of a 784-wide layer at batch 1024 cost ~130 times that work per statistics step, so at
  ``stat_interval=10`` the chunks are 32 wide). Decided at the first statistics step and logged.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from ..curvature import Curvature, Estimator
from ..hyper import FISHER_TYPES, HyperParameterError, Option, one_of, positive, positive_int
from ..linalg import NumericsEvent, add_diagonal, batched_cholesky, chol_solve
from ..registry import register_estimator
from ..stats import LayerStats
from .miniblock_layout import _CHUNK, Group, _column_span, _row_stats, _split, auto_chunk, build_layout  # noqa: F401

log = logging.getLogger("curvlab")
_INV_MAX = 32     # blocks up to this size keep their inverse (one bmm per solve), larger ones the Cholesky factor


def _size(name: str, value: Any) -> int | str | None:
    if value is None or value == "layer":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HyperParameterError(f"{name} must be None (one block per row), a positive int (chunk size) or "
                                  f"'layer' (one block per layer), got {value!r}")
    return value


def _drops_ema(cfg: dict[str, Any]) -> bool:
    """Woodbury mode keeps ``miniblock_window`` batches; with one, an ``ema_decay > 0`` would have no effect."""
    return cfg["ema_decay"] > 0 and cfg["miniblock_window"] == 1


# -- batched numerics ladder -----------------------------------------------------------------------------
def _factor(damped: Tensor, layer: str, events: list[NumericsEvent]) -> Tensor:
    """What ``solve`` keeps of the damped blocks: the inverse for blocks up to ``_INV_MAX`` (on CPU, triangular
    solves on many tiny blocks cost 4-8x a ``bmm``), the Cholesky factor above (where ``cholesky_inverse`` costs
    ~15x the factorization and two triangular solves ~1.5x a ``bmm``)."""
    chol = batched_cholesky(damped, layer, events)
    return torch.cholesky_inverse(chol) if chol.shape[-1] <= _INV_MAX else chol


def _solve(factor: Tensor, rhs: Tensor) -> Tensor:
    if factor.shape[-1] <= _INV_MAX:
        return torch.bmm(factor, rhs.unsqueeze(-1)).squeeze(-1)
    return chol_solve(factor, rhs)


def _block_damping(diag_mean: Tensor, damping: float, relative: bool) -> Tensor:
    """Per-block Tikhonov damping: ``lambda`` or ``lambda * mean(diag F_b)`` (zero blocks get the layer mean)."""
    if not relative:
        return torch.full_like(diag_mean, damping)
    floor = float(diag_mean.mean()) if bool((diag_mean > 0).any()) else 1.0
    return damping * torch.where(diag_mean > 0, diag_mean, torch.full_like(diag_mean, floor))


class MiniBlockCurvature(Curvature):
    """Block-diagonal mini-block empirical Fisher of one Linear / Conv2d layer."""

    #: data parallel (:mod:`curvlab.distributed`): direct/chunked blocks are means over examples; the Woodbury
    #: rows a / sqrt(N) and g are gathered over ranks; refresh sets ``factors`` or ``wood``
    reductions = {"blocks": "mean_sym", "a": "cat_rms", "g": "cat"}
    refreshed = ("factors", "wood")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode: str | None = None
        self.chunk: int | None = None
        self.groups: list[Group] = []
        self.blocks: list[Tensor] | None = None          # direct / chunked: EMA statistics per group
        self.factors: list[Tensor] | None = None         # inverses / Cholesky factors of the damped blocks
        self.history: list[tuple[Tensor, Tensor, float]] = []   # woodbury: (Abar/sqrt(N), g, EMA weight)
        self.wood: dict[str, Tensor] | None = None

    @property
    def ready(self) -> bool:
        return (self.wood if self.mode == "woodbury" else self.factors) is not None

    def _layout(self, chunk: int | None) -> list[Group]:
        cfg = self.config
        return build_layout(self.module.weight.shape, self.shape, cfg["miniblock_size"], cfg["miniblock_conv"], chunk)

    def _set_mode(self, mode: str, chunk: int | None) -> None:
        self.mode, self.chunk = mode, chunk
        self.groups = [Group(g.idx.to(self.device), None if g.cols is None else g.cols.to(self.device))
                       for g in self._layout(chunk)]

    def _plan(self, n: int, t: int) -> None:
        """Pick the storage mode (module doc) from the memory budget, the first time statistics arrive."""
        cfg, item = self.config, torch.finfo(self.dtype).bits // 8
        mode, budget, d_out = cfg["miniblock_mode"], cfg["miniblock_memory_mb"] * 2 ** 20, self.shape[0]

        def direct(chunk: int | None) -> int:
            return 2 * item * sum(g.idx.shape[0] * g.idx.shape[1] ** 2 for g in self._layout(chunk))

        base = self._layout(None)
        rows = t == 1 and len(base) == 1 and base[0].cols is not None and base[0].cols.shape[0] == 1
        r = n * cfg["miniblock_window"]
        woodbury = item * (d_out * r * r + r * sum(self.shape))
        if mode == "woodbury" and not rows:
            raise ValueError(f"layer {self.name!r}: miniblock_mode='woodbury' needs one block per output row of a "
                             f"layer with one input row per example (Linear on 2-D inputs, miniblock_size=None); "
                             f"use miniblock_mode='direct' or 'chunked'")
        chunk = cfg["miniblock_chunk"] if mode == "chunked" else None
        if mode == "auto":
            if direct(None) <= budget:
                mode = "direct"
            elif rows and woodbury <= min(budget, direct(None)) and not _drops_ema(cfg):
                mode = "woodbury"
            else:
                mode, chunk = "chunked", auto_chunk(cfg["miniblock_chunk"], direct, budget,
                                                    cfg["miniblock_cost"], cfg["stat_interval"])
            log.info("curvlab miniblock: layer %r uses mode %r%s", self.name, mode,
                     f" (chunks of <= {chunk})" if chunk else "")
        if mode == "woodbury" and cfg["ema_decay"] > 0:
            log.warning("curvlab miniblock: layer %r (woodbury mode) keeps an EMA truncated to the last %d "
                        "statistics batch(es) (miniblock_window)", self.name, cfg["miniblock_window"])
        self._set_mode(mode, chunk)

    # -- statistics (eq. M.1-M.4) ------------------------------------------------------------------------
    def statistics(self, stats: LayerStats) -> dict[str, Tensor]:
        """This batch's blocks (or Woodbury factors); the first call also fixes the storage mode (``_plan``)."""
        a = stats.input_rows()                                         # (N, T, D)
        (g, _), = stats.output_rows("real")                            # (N, T, d_out), N * grad_output
        n, t, width = a.shape
        if (width, g.shape[-1]) != (self.shape[1], self.shape[0]):
            raise ValueError(f"layer {self.name!r}: captured rows have d_in={width}, d_out={g.shape[-1]}, expected "
                             f"{self.shape[1]}, {self.shape[0]} (does the adapter match the module?)")
        if self.mode is None:
            self._plan(n, t)
        if self.mode == "woodbury":
            if t != 1:
                raise ValueError(f"layer {self.name!r}: woodbury mode got {t} input rows per example; it needs one")
            return {"a": a[:, 0] / math.sqrt(n), "g": g[:, 0].clone()}
        if t == 1 and all(gr.cols is not None for gr in self.groups):
            blocks = [_row_stats(a[:, 0], g[:, 0], gr.cols) / n for gr in self.groups]
        else:
            blocks = [a.new_zeros(gr.idx.shape[0], gr.idx.shape[1], gr.idx.shape[1]) for gr in self.groups]
            size = self.shape[0] * width
            step = max(1, _CHUNK // size)
            for s in range(0, n, step):
                peg = torch.einsum("nto,nti->noi", g[s:s + step], a[s:s + step]).reshape(-1, size)  # (M.1)
                for blk, gr in zip(blocks, self.groups):
                    x = peg[:, gr.idx]                                                                # (n, B, m)
                    blk += torch.einsum("nbk,nbl->bkl", x, x)                                          # (M.2)
            blocks = [b / n for b in blocks]
        return {f"blocks{k}": b for k, b in enumerate(blocks)}

    def accumulate(self, new: dict[str, Tensor], ema_decay: float) -> None:
        if self.mode == "woodbury":
            old = [(a, g, w * ema_decay) for a, g, w in self.history if w * ema_decay > 0]
            hist = old + [(new["a"], new["g"], 1.0 - ema_decay if old else 1.0)]
            self.history = hist[-self.config["miniblock_window"]:]
            return
        fresh = [new[f"blocks{k}"] for k in range(len(self.groups))]
        self.blocks = fresh if self.blocks is None else [self.ema(o, b, ema_decay) for o, b in zip(self.blocks, fresh)]

    def _stacked(self) -> tuple[Tensor, Tensor]:
        """``(Abar_hat (R, D), g_hat (R, d_out))`` of the kept batches with their (renormalized) EMA weights."""
        total = sum(w for _, _, w in self.history)
        a = torch.cat([a * math.sqrt(w / total) for a, _, w in self.history])
        return a, torch.cat([g for _, g, _ in self.history])

    def refresh(self, damping: float) -> None:
        relative = self.config["miniblock_damping"] == "relative"
        if self.mode == "woodbury":
            if not self.history:
                return
            if damping <= 0:
                raise ValueError(f"layer {self.name!r}: miniblock_mode='woodbury' needs damping > 0 (eq. M.9 divides "
                                 "by it); raise `damping` or use miniblock_mode='direct'")
            a, g = self._stacked()
            gt = g.T                                                                      # (d_out, R)
            lam = _block_damping(gt.square() @ a.square().sum(1) / a.shape[1], damping, relative)
            core = gt.unsqueeze(2) * (a @ a.T) * gt.unsqueeze(1)                          # Z_i Z_i^T
            core.diagonal(dim1=-2, dim2=-1).add_(lam.unsqueeze(1))
            self.wood = {"a": a, "g": g, "lam": lam,
                         "core": _factor(core, f"{self.name} (woodbury cores)", self.events)}
            return
        if self.blocks is None:
            return
        factors = []
        for blk in self.blocks:
            lam = _block_damping(blk.diagonal(dim1=-2, dim2=-1).mean(1), damping, relative)
            factors.append(_factor(add_diagonal(blk, lam.unsqueeze(1)), self.name, self.events))
        self.factors = factors

    # -- products ------------------------------------------------------------------------------------------
    def _apply(self, mats: list[Tensor], v: Tensor, op=lambda m, x: torch.bmm(m, x.unsqueeze(-1)).squeeze(-1)
               ) -> Tensor:
        """``op(block, v_block)`` for every group; a group of contiguous column chunks (every row cut the same
        way) reads and writes its entries through a reshaped column slice of ``v`` instead of an index gather
        and scatter (the same entries: row-major ``(row, chunk)`` order is the group's block order)."""
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)            # contiguous, whatever v's strides
        flat, out_flat = v.reshape(-1), out.view(-1)
        for gr, m in zip(self.groups, mats):
            span = _column_span(gr)
            if span is not None and v.dim() == 2 and v.shape[1] == self.shape[1]:
                lo, hi = span
                out[:, lo:hi] = op(m, v[:, lo:hi].reshape(gr.idx.shape)).view(v.shape[0], hi - lo)
            else:
                out_flat[gr.idx] = op(m, flat[gr.idx])
        return out

    def solve(self, mat: Tensor) -> Tensor:
        """``(F + lambda)^-1 V`` block by block (eq. M.7); Woodbury (eq. M.9) in woodbury mode."""
        if not self.ready:
            raise RuntimeError(f"layer {self.name!r}: no mini-block factors yet (gather statistics, then refresh)")
        if self.mode != "woodbury":
            return self._apply(self.factors, mat, _solve)
        w = self.wood
        u = (mat @ w["a"].T) * w["g"].T                                                  # Z_i v_i
        x = _solve(w["core"], u)
        return (mat - (x * w["g"].T) @ w["a"]) / w["lam"].unsqueeze(1)

    def mv(self, mat: Tensor) -> Tensor:
        """Undamped ``F V`` with the block-diagonal mini-block Fisher."""
        self._require_stats()
        if self.mode != "woodbury":
            return self._apply(self.blocks, mat)
        a, g = self._stacked()
        return ((mat @ a.T) * g.T * g.T) @ a

    def _require_stats(self) -> None:
        if self.blocks is None and not self.history:
            raise RuntimeError(f"layer {self.name!r} has no mini-block statistics yet: run a forward/backward first")

    def dense(self) -> Tensor:
        self._require_stats()
        blocks = self.blocks
        if self.mode == "woodbury":
            a, g = self._stacked()
            blocks = [_row_stats(a, g, self.groups[0].cols)]
        size = self.shape[0] * self.shape[1]
        out = torch.zeros(size, size, dtype=self.dtype, device=self.device)
        for gr, blk in zip(self.groups, blocks):
            out[gr.idx.unsqueeze(2), gr.idx.unsqueeze(1)] = blk
        return self._param_dense(out)

    def memory_bytes(self) -> int:
        """Bytes held by this layer's curvature state (statistics, Cholesky factors, Woodbury factors)."""
        tensors = list(self.blocks or []) + list(self.factors or []) + list((self.wood or {}).values())
        tensors += [t for a, g, _ in self.history for t in (a, g)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "chunk": self.chunk, "blocks": self.blocks, "factors": self.factors,
                "history": list(self.history), "wood": None if self.wood is None else dict(self.wood)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] is not None:
            self._set_mode(state["mode"], state["chunk"])
        self.blocks, self.factors = state["blocks"], state["factors"]
        self.history, self.wood = list(state["history"]), state["wood"]


@register_estimator("miniblock")
class MiniBlock(Estimator):
    """MBF: block-diagonal empirical Fisher of many small mini-blocks per layer (Bahamou et al., AISTATS 2023)."""

    options = {
        "fisher": Option("empirical", one_of(*FISHER_TYPES),
                         "MBF is defined on the empirical Fisher (real labels); default 'empirical' here"),
        "miniblock_size": Option(None, _size, "Linear rows: None = one block per output neuron [W[i,:], b_i] "
                                              "(eq. M.4); int m = chunks of <= m inputs (1 = diagonal); 'layer'"),
        "miniblock_conv": Option("kernel", one_of("kernel", "channel", "layer"),
                                 "Conv2d: one block per (out, in) kernel slice (eq. M.2) | per output channel | "
                                 "one per layer"),
        "miniblock_mode": Option("auto", one_of("auto", "direct", "woodbury", "chunked"),
                                 "storage/solve: by memory budget | stored blocks | Woodbury (eq. M.9) | chunked"),
        "miniblock_chunk": Option(128, positive_int, "largest block size of the chunked mode (m_max)"),
        "miniblock_memory_mb": Option(512.0, positive, "per-layer memory budget of miniblock_mode='auto' (MiB)"),
        "miniblock_cost": Option(1.0, positive, "miniblock_mode='auto', when rows are chunked: the chunks' "
                                                "statistics may cost at most this times the layer's forward+backward "
                                                "work per step (chunk <= 6 * cost * stat_interval)"),
        "miniblock_window": Option(1, positive_int, "woodbury mode: statistics batches kept (truncated EMA)"),
        "miniblock_damping": Option("absolute", one_of("absolute", "relative"),
                                    "per block F_b + lambda I | F_b + lambda mean(diag F_b) I"),
    }
    #: measured without a KL clip, which is therefore turned off here (``defaults`` has it on: README "Defaults")
    suggested = {"lr": 0.01, "damping": 0.05, "momentum": 0.9, "ema_decay": 0.95, "inv_interval": 5, "kl_clip": None}
    fisher_types = ("empirical",)
    curvature_class = MiniBlockCurvature

    @classmethod
    def defaults_for(cls, rule: str, config: dict[str, Any]) -> dict[str, Any]:
        """``miniblock_mode="woodbury"`` with ``miniblock_window=1`` uses the current batch only: ``ema_decay`` 0
        unless you pass one (a nonzero one is then refused, see ``__init__``)."""
        if config["miniblock_mode"] == "woodbury" and config["miniblock_window"] == 1:
            return {"ema_decay": 0.0}
        return {}

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if config["miniblock_mode"] == "woodbury" and _drops_ema(config):
            decay = config["ema_decay"]
            keep = math.ceil(math.log(0.05) / math.log(decay)) if decay < 1 else None
            raise HyperParameterError(
                f"miniblock_mode='woodbury' keeps the last miniblock_window=1 statistics batch only, so "
                f"ema_decay={decay!r} would be ignored; set ema_decay=0 (current batch, what this computes), "
                f"miniblock_window >= 2 (a truncated EMA{f'; {keep} batches hold 95% of its weight' if keep else ''}), "
                "or miniblock_mode='direct' / 'chunked' (a full EMA)")

    def captures(self) -> set[str]:
        return {"inputs", "real_grads"}
