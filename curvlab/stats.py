"""What an estimator sees of one layer on a statistics step: :class:`LayerStats`.

Estimators never touch hooks or backends. They ask a ``LayerStats`` for the views they need, each computed
lazily (and once) from whatever the capture backend recorded:

==================================  ==============================================================================
``input_rows()``                     homogeneous inputs / im2col patches, ``(N, T, d_in [+1])``
``output_rows(kind)``                per-example output gradients ``[(rows (N, T, d_out), weight), ...]``;
                                     ``kind="real"``: gradients of the real loss (``N_step * grad_output``, P0);
                                     ``kind="fisher"``: the back-propagated vectors of the ``fisher`` type
``kron_factors(kind, approx)``       K-FAC's ``(A, G)``, ``approx="expand"|"reduce"`` (eq. K.3/C.4, ALGORITHMS 11)
``per_example_grads()``              ``(N, d_out, d_in [+1])``: gradient of each example's loss ``l_n`` in the matrix
                                     view (``sum_t g_{n,t} abar_{n,t}^T``, real labels)
``grad``                             the mean-loss gradient in the matrix view (``p.grad``), or ``None``
==================================  ==============================================================================

A capture backend may subclass ``LayerStats`` to supply some views directly (BackPACK computes Kronecker
factors and per-example gradients itself); estimators cannot tell the difference.
"""
from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import nn

from .adapters import LayerAdapter
from .kernels import gram, homogeneous_gram


class LayerStats:
    def __init__(self, name: str, module: nn.Module, adapter: LayerAdapter, dtype: torch.dtype,
                 records: list | None = None, grad: torch.Tensor | None = None) -> None:
        self.name, self.module, self.adapter, self.dtype = name, module, adapter, dtype
        self.records = records or []
        self.grad = grad

    @property
    def batch_size(self) -> int:
        """Number of examples behind these statistics (pooled over back-propagated forwards)."""
        return sum(r.batch_size for r in self.records)

    def _use_rows(self, convert, tensors) -> torch.Tensor:
        """Rows of one record: each use converted, concatenated along the shared dimension (dim 1)."""
        rows = [convert(self.module, t).to(self.dtype) for t in tensors]   # integer inputs: embeddings
        return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]

    def _record_rows(self, convert) -> torch.Tensor:
        """Every record's rows (:meth:`_use_rows`), concatenated along the examples."""
        rows = [self._use_rows(convert, [u.inputs for u in r.uses]) for r in self.records]
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    @cached_property
    def _inputs(self) -> torch.Tensor:
        return self._record_rows(self.adapter.input_rows)

    def input_rows(self) -> torch.Tensor:
        """``(N, T, d_in [+1])`` homogeneous inputs, in the statistics dtype; the uses of a layer applied
        several times in one forward are concatenated along ``T`` (ALGORITHMS.md section 11)."""
        return self._inputs

    @cached_property
    def _raw_inputs(self) -> torch.Tensor | None:
        """``input_rows()`` without its homogeneous column, when that is how the adapter builds it (the bias
        trains with the weight) and the homogeneous rows were not formed already; else ``None``."""
        adapter = self.adapter
        if ("_inputs" in self.__dict__ or not (adapter.weight_trained and adapter.has_bias(self.module))
                or type(adapter).raw_input_rows is LayerAdapter.raw_input_rows):     # the adapter has no raw rows
            return None
        return self._record_rows(adapter.raw_input_rows)

    def output_rows(self, kind: str, per: str = "example") -> list[tuple[torch.Tensor, float]]:
        """Output-gradient rows ``(N, T, d_out)`` with their weights; see the module doc.

        ``per="example"``: the gradients of each of the layer's examples' loss (``kind="real"``) or the example's
        Fisher vectors (``"fisher"``); ``per="term"``: at the scale of one loss term (:mod:`curvlab.losses`), what
        K-FAC's ``G`` averages. The two differ only when an example has several loss terms (sequences)."""
        if kind not in ("real", "fisher"):
            raise ValueError(f"kind must be 'real' or 'fisher', got {kind!r}")
        cols: dict[int, list] = {}
        for r in self.records:
            if kind == "real":
                if any(u.real_grad is None for u in r.uses):
                    raise RuntimeError(f"layer {self.name!r}: real output gradients were not captured")
                scale = r.term_scale if per == "term" else r.real_scale
                columns = [[(u.real_grad * scale, 1.0) for u in r.uses]]
            else:
                scale = 1.0 if per == "term" else math.sqrt(r.batch_size / r.terms)
                columns = [[(g * scale if scale != 1.0 else g, w) for g, w in (u.fisher_grads[j] for u in r.uses)]
                           for j in range(len(r.uses[0].fisher_grads))]
            for j, pairs in enumerate(columns):
                rows = self._use_rows(self.adapter.output_rows, [g for g, _ in pairs])
                cols.setdefault(j, []).append((rows, pairs[0][1]))
        return [(torch.cat([g for g, _ in parts]), parts[0][1]) for _, parts in sorted(cols.items())]

    def kron_factors(self, kind: str, approx: str = "expand") -> tuple[torch.Tensor, torch.Tensor]:
        """K-FAC factors ``(A, G)`` from ``kind`` output gradients (eq. K.3; KFC eq. C.4; ALGORITHMS.md 11).

        With inputs ``abar_{n,r}`` (``N`` examples of the layer, ``R`` rows each: positions, patches, uses),
        ``g`` the per-loss-term output rows and ``N_terms`` the loss terms behind them::

            expand:  A = 1/N_terms sum_{n,r} abar abar^T        G = 1/(N R) sum_v w sum_{n,r} g g^T
            reduce:  A = 1/N sum_n abar_n abar_n^T               G = 1/N_terms sum_v w sum_n gbar gbar^T
                     abar_n = (1/R) sum_r abar_{n,r},  gbar_n = sum_r g_{n,r}

        Expand with one loss term per example is KFC's split (A sums over locations, G averages); with a term
        per position it is the mean over (n, r) of both (Eschenhagen et al., NeurIPS 2023). Exact for deep
        linear networks: expand with a loss per position, reduce with one loss per sequence."""
        if approx not in ("expand", "reduce"):
            raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
        n_terms = sum(r.terms for r in self.records)
        raw = self._raw_inputs                 # A = [x 1]^T [x 1] blockwise, without the [x 1] copy
        rows = raw if raw is not None else self.input_rows()
        n, t, d_in = rows.shape
        square = gram if raw is None else homogeneous_gram
        if approx == "expand":
            a = square(rows.reshape(-1, d_in), 1.0 / n_terms)
        else:
            a = square(rows.mean(dim=1), 1.0 / n)
        g = None
        for out, weight in self.output_rows(kind, per="term"):
            if approx == "expand":
                term = gram(out.reshape(-1, out.shape[-1]), weight / (n * t))
            else:
                term = gram(out.sum(dim=1), weight / n_terms)
            g = term if g is None else g.add_(term)
        return a, g

    def per_example_grads(self) -> torch.Tensor:
        """``(N, d_out, d_in [+1])`` gradients of each example's loss (real labels) in the matrix view."""
        (g, _), = self.output_rows("real")
        return self.example_grads(g)

    def example_grads(self, g: torch.Tensor) -> torch.Tensor:
        """``(N, d_out, cols)`` per-example matrix-view gradients from output rows ``g`` ``(N, T, d_out)``:
        ``sum_t g_{n,t} abar_{n,t}^T``, or the adapter's elementwise form (normalization layers)."""
        if getattr(self.adapter, "elementwise", False):
            return self.adapter.elementwise_grads(g, self.input_rows())
        return torch.einsum("nto,nti->noi", g, self.input_rows())

    def sub_batch_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-loss gradients ``(g1, g2)`` of the first and second half of the batch, matrix view.

        From ONE forward/backward (FOP, ALGORITHMS.md 2.2): ``g_k = (1/|B_k|) sum_{n in B_k} sum_t
        g_{n,t} abar_{n,t}^T`` with real labels, two matmuls, no per-example gradients materialized.
        Halves are ``n < ceil(N/2)`` and the rest; the batch needs at least 2 examples.
        """
        (g, _), = self.output_rows("real")
        n = g.shape[0]
        if n < 2:
            raise ValueError(f"layer {self.name!r}: sub-batch gradients need a batch of at least 2 examples")
        half = (n + 1) // 2
        if getattr(self.adapter, "elementwise", False):
            pe = self.example_grads(g)
            return pe[:half].mean(0), pe[half:].mean(0)
        raw = self._raw_inputs                 # [x 1] blockwise: g^T x, then the bias column g^T 1 (no [x 1] copy)
        a = raw if raw is not None else self.input_rows()
        out = []
        for sl in (slice(0, half), slice(half, n)):
            gs, xs = g[sl], a[sl]
            gs2 = gs.reshape(-1, gs.shape[-1])
            m = gs2.T @ xs.reshape(-1, xs.shape[-1])
            if raw is not None:
                m = torch.cat([m, gs2.sum(0).unsqueeze(1)], dim=1)
            out.append(m.div_(gs.shape[0]))
        return out[0], out[1]
