"""What curvlab's estimators read from the BackPACK backend (:mod:`curvlab.backpack_capture`): the records of the
user's forwards and the :class:`~curvlab.stats.LayerStats` view of BackPACK's results.

:class:`ForwardRecord` is one back-propagated forward of the user's model (its inputs and ``dL/df``: times ``N``,
the real per-example output gradient, pitfall P0 of ALGORITHMS.md section 0); :class:`LayerRecord` is one layer's
share of one replayed forward; :class:`BackpackLayerStats` turns BackPACK's Kronecker factors and per-example
gradients into curvlab's conventions (K-FAC eq. K.3, KFC eq. C.4; Martens & Grosse 2015, Grosse & Martens 2016):

* ``A = (1/N) sum_{n,t} abar abar^T`` with the homogeneous bias row ``[[A_bp, s], [s^T, T]]``,
  ``s = (1/N) sum_{n,t} a_{n,t}`` from the replay's layer inputs (BackPACK gives no bias row);
* ``G`` and the output rows from BackPACK's back-propagated square root ``S``, which carries ``1/sqrt(N)`` (mean
  reduction) and ``1/sqrt(M)`` (``M`` MC samples): rows ``sqrt(N) S`` (``sqrt(N M) S`` with weight ``1/M`` for
  mc), a Conv2d's output factor divided by its ``T`` locations;
* per-example gradients ``N * grad_batch`` (BackPACK's BatchGrad of a mean loss is ``(1/N) grad l_n``);
* several forwards per step pooled as in the hooks backend: factors weighted by batch size, rows concatenated.

The conventions are derived and tested in the module docstring of :mod:`curvlab.backpack_capture` and in
``tests/test_backpack_backend.py``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .capture import accumulates_into
from .stats import LayerStats

if TYPE_CHECKING:
    from .backpack_capture import Replay

__all__ = ["ForwardRecord", "LayerRecord", "BackpackLayerStats", "input_tensors"]


class ForwardRecord:
    """One back-propagated forward of the user's model: its inputs and ``dL/df``."""

    def __init__(self, args: tuple, kwargs: dict, batch_size: int, params: list[Tensor]) -> None:
        self.args, self.kwargs, self.batch_size, self.params = args, kwargs, batch_size, params
        self.versions = [t._version for t in input_tensors(args, kwargs)]
        self.out_grad: Tensor | None = None
        self.output: Tensor | None = None          # the model output (detached), for the loss check

    @property
    def output_grad(self) -> Tensor | None:
        return self.out_grad

    def set_grad(self, grad: Tensor) -> None:
        if accumulates_into(self.params):          # a training backward only (the capture contract)
            self.out_grad = grad.detach() if self.out_grad is None else self.out_grad + grad.detach()


class LayerRecord:
    """One layer's share of one replayed forward, with the attributes the parent ``LayerStats`` reads."""

    def __init__(self, replay: "Replay", index: int, name: str) -> None:
        self.replay, self.index, self.name = replay, index, name
        self.batch_size = replay.forwards[index].batch_size
        self.uses = [self]                                        # one use per forward (BackPACK: no sharing)
        #: ``real_grad`` is ``N_pass dL/ds``; the step's per-example scale is ``N_step`` (curvlab.capture)
        self.real_scale = sum(fw.batch_size for fw in replay.forwards) / self.batch_size
        self.term_scale = self.real_scale                          # (N, C) outputs only: one term per example
        self.terms = self.batch_size

    def result(self, kind: str) -> dict[str, Any]:
        return self.replay.run(kind)[self.index][self.name]

    @property
    def inputs(self) -> Tensor:
        return self.result(next(iter(self.replay.results), "forward"))["input"]

    @property
    def real_grad(self) -> Tensor:
        return self.result("real")["sqrt"][0] * math.sqrt(self.batch_size)

    @property
    def fisher_grads(self) -> list[tuple[Tensor, float]]:
        sqrt = self.result("fisher")["sqrt"]
        m = sqrt.shape[0] if self.replay.capture.fisher == "mc" else 1
        return [(s * math.sqrt(self.batch_size * m), 1.0 / m) for s in sqrt]


class BackpackLayerStats(LayerStats):
    """:class:`LayerStats` whose Kronecker factors and per-example gradients come from BackPACK; the other
    views (input rows, output rows, sub-batch gradients) are the parent's, on the replay's records."""

    def kron_factors(self, kind: str, approx: str = "expand") -> tuple[Tensor, Tensor]:
        if kind not in ("real", "fisher"):
            raise ValueError(f"kind must be 'real' or 'fisher', got {kind!r}")
        if approx != "expand":
            return super().kron_factors(kind, approx)
        a_sum = g_sum = 0.0
        for rec in self.records:
            res = rec.result(kind)
            if "G" not in res:                                   # frozen weight: BackPACK gave no factors
                return super().kron_factors(kind, approx)
            rows = self.adapter.input_rows(self.module, res["input"].to(self.dtype))
            a = res["A"].to(self.dtype)
            if self.adapter.has_bias(self.module):
                col = rows.sum(dim=1).mean(dim=0)                                  # [s; T]
                a = torch.cat([torch.cat([a, col[:-1, None]], 1), col[None, :]], 0)
            scale = rec.real_scale ** 2 if kind == "real" else 1.0     # N_pass -> N_step (curvlab.capture)
            a_sum = a_sum + a * rec.batch_size
            g_sum = g_sum + res["G"].to(self.dtype) * (rec.batch_size * scale / rows.shape[1])
        return a_sum / self.batch_size, g_sum / self.batch_size

    def per_example_grads(self) -> Tensor:
        mats, bias = [], self.adapter.has_bias(self.module)
        d_out = self.adapter.shape(self.module)[0]
        for rec in self.records:
            res, n = rec.result("batch_grad"), rec.batch_size
            if res["gw"] is None or (bias and res["gb"] is None):
                return super().per_example_grads()
            mat = res["gw"].reshape(n, d_out, -1)
            if bias:
                mat = torch.cat([mat, res["gb"].reshape(n, d_out, 1)], dim=2)
            mats.append(mat.to(self.dtype) * (n * rec.real_scale))   # BatchGrad of a mean loss: (1/N) grad l_n
        return torch.cat(mats)


def input_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors among a forward's positional and keyword arguments (whose in-place changes a replay detects)."""
    return [t for t in list(args) + list(kwargs.values()) if isinstance(t, Tensor)]
