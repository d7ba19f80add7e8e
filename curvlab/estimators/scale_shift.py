"""The curvature of normalization layers' scale and shift (LayerNorm, RMSNorm): one small block per layer.

A LayerNorm computes ``s = gamma * xhat + beta`` elementwise (``xhat`` the normalized input), so it has no
Kronecker structure: each feature ``j`` has its own input ``xhat_j``. Following kfac-jax's "scale and shift"
blocks (``ScaleAndShiftFull`` / ``ScaleAndShiftDiagonal``), the block is built from per-example gradients::

    pe_n = [ sum_t g_{n,t} * xhat_{n,t},  sum_t g_{n,t} ]        (d x k, k = trainable columns of [gamma | beta])
    F    = (1/N) sum_v w sum_n vec(pe_{v,n}) vec(pe_{v,n})^T      ("dense")   or its diagonal ("diagonal")

with ``g`` the real output gradients (``fisher="empirical"``) or the back-propagated Fisher vectors
(``"mc"``/``"type2"``) at the scale of one example. For ``(N, C)`` outputs the dense block IS the layer's block
of the empirical Fisher / GGN (exact, tested against :mod:`curvlab.exact`). EMA with ``ema_decay``;
``solve(V) = (F + lambda I)^-1 V`` (Cholesky at refresh, the numerics ladder of :func:`curvlab.linalg.spd_inverse`);
``mv`` undamped; the matrix view is ``(d, k)`` (:class:`curvlab.adapters.ScaleShiftAdapter`).

Every estimator that reads output gradients (K-FAC, MBF, EKFAC, ...) gets this block for its normalization
layers (``norm_curvature``: ``"auto"`` = dense up to 1024 parameters per layer, diagonal above; ``"dense"``,
``"diagonal"``, or ``"off"`` for the first-order fallback); Shampoo preconditions the ``(d, k)`` view with its
own gradient statistics; ISAAC (input-based, no output gradients) leaves them to the first-order fallback.
"""
from __future__ import annotations

from typing import Any

import torch

from ..curvature import Curvature
from ..linalg import add_diagonal, spd_inverse
from ..stats import LayerStats

DENSE_MAX = 1024

class ScaleShiftCurvature(Curvature):
    """Dense or diagonal Fisher block of one normalization layer's ``[gamma | beta]``."""

    reductions = {"F": "mean_sym", "diag": "mean"}
    refreshed = ("inv",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.shape[0] * self.shape[1]
        mode = self.config.get("norm_curvature", "auto")
        self.diagonal = mode == "diagonal" or (mode == "auto" and size > DENSE_MAX)
        self.F: torch.Tensor | None = None
        self.inv: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.inv is not None

    def statistics(self, stats: LayerStats) -> dict[str, torch.Tensor]:
        kind = "real" if self.config["fisher"] == "empirical" else "fisher"
        acc = None
        for g, w in stats.output_rows(kind):                             # (N, T, d), per example
            pe = stats.example_grads(g)                                   # (N, d, k)
            n = pe.shape[0]
            pe = pe.reshape(n, -1)                                        # row-major vec of (d, k)
            term = pe.square().sum(0) * (w / n) if self.diagonal else pe.T @ pe * (w / n)
            acc = term if acc is None else acc + term
        return {"diag": acc} if self.diagonal else {"F": acc}

    def accumulate(self, new: dict[str, torch.Tensor], ema_decay: float) -> None:
        self.F = self.ema(self.F, new["diag" if self.diagonal else "F"], ema_decay)

    def refresh(self, damping: float) -> None:
        if self.F is None:
            return
        if self.diagonal:
            self.inv = 1.0 / (self.F + damping).clamp_min(torch.finfo(self.F.dtype).tiny)
        else:
            self.inv = spd_inverse(add_diagonal(self.F, damping), f"{self.name} (scale/shift block)", self.events)

    def solve(self, mat: torch.Tensor) -> torch.Tensor:
        v = mat.reshape(-1)
        out = self.inv * v if self.diagonal else self.inv @ v
        return out.reshape(mat.shape)

    def mv(self, mat: torch.Tensor) -> torch.Tensor:
        v = mat.reshape(-1)
        return (self.F * v if self.diagonal else self.F @ v).reshape(mat.shape)

    def dense(self) -> torch.Tensor:
        if self.F is None:
            raise RuntimeError(f"layer {self.name!r} has no scale/shift statistics yet: run a forward/backward first")
        return self._param_dense(torch.diag(self.F) if self.diagonal else self.F)

    def state_dict(self) -> dict[str, Any]:
        return {"F": self.F, "inv": self.inv}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.F, self.inv = state["F"], state["inv"]
