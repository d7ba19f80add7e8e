"""EKFAC: eigenvalue-corrected K-FAC (George, Laurent, Bouthillier, Ballas & Vincent, NeurIPS 2018).

A curvlab plugin (entry point ``curvlab.plugins: ekfac = "curvlab_ekfac"``). Per layer, in the adapter's matrix
view ``Wbar`` (``d_out x (d_in+1)``, row-major, so the Kronecker order is ``G (x) A`` as in
:mod:`curvlab.estimators.kfac`):

* K-FAC factors ``A``, ``G`` (K-FAC eq. K.3 / C.4, EMA with ``ema_decay``) give the Kronecker eigenbasis
  ``A = Q_A diag(e_A) Q_A^T``, ``G = Q_G diag(e_G) Q_G^T``, recomputed every ``inv_interval`` steps
  (George et al., Algorithm 1, "amortized eigendecomposition");
* the eigenvalue correction (their eq. 9-10): instead of ``e_G (x) e_A``, the second moment of the per-example
  gradients IN that basis, ``s = (1/N) sum_n w (Q_G^T Gbar_n Q_A)^2`` (elementwise), with ``Gbar_n`` the
  per-example gradient in the matrix view built from the rows of the ``fisher`` type (one column with
  weight 1 for ``empirical``/``mc``; weighted columns for ``type2``). It minimizes the Frobenius distance to
  the Fisher among matrices diagonal in the basis (their Theorem / eq. 8), so with the empirical Fisher
  ``s = diag(Q^T F_emp Q)`` exactly -- the identity tested against :mod:`curvlab.exact`;
* ``s`` is re-estimated from the latest batch when the basis is refreshed and EMA-updated (``ema_decay``) on
  every statistics step in between (their Algorithm 1, lines 9-11);
* ``solve(V) = Q_G [(Q_G^T V Q_A) / (s + lambda)] Q_A^T``, ``mv(V) = Q_G [s * (Q_G^T V Q_A)] Q_A^T``,
  ``dense() = (Q_G (x) Q_A) diag(vec s) (Q_G (x) Q_A)^T`` in module-parameter order.

Stale bases: between refreshes (``inv_interval > 1``) new gradients may have components outside the range the
factors had at the last refresh; there the eigenbasis is an arbitrary orthonormal completion (eigh of a
rank-deficient factor), so ``s`` in those coordinates depends on floating-point rounding (valid EKFAC, but two
capture backends then drift apart at the 1e-4 level). ``suggested`` therefore uses ``inv_interval = 1`` (basis and
scaling from the current EMA factors and batch every step; the layers of small models make this cheap), which
makes the update basis-independent and reproducible across backends; larger intervals are the paper's
amortization for big layers.

Damping is the plain Tikhonov ``lambda`` added to ``s`` (the paper's choice; no pi-splitting is needed since
``s`` is not a Kronecker product). Before the first refresh there is no basis: the first ``refresh`` builds it
from the current factors and takes ``s`` from the latest batch.
"""
from __future__ import annotations

from typing import Any

import torch

from curvlab import Curvature, Estimator, register_estimator
from curvlab.linalg import psd_eigh
from curvlab.stats import LayerStats

__all__ = ["EKFAC", "EigenCorrectedCurvature"]
__version__ = "0.1.0"


class EigenCorrectedCurvature(Curvature):
    """``(Q_G (x) Q_A) diag(s) (Q_G (x) Q_A)^T`` for one Linear / Conv2d layer."""

    #: data parallel (curvlab.distributed): factors are means, per-example gradients are gathered over ranks,
    #: column weights are the same on every rank
    reductions = {"A": "mean_sym", "G": "mean_sym", "pe": "cat", "w": "none"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.QA: torch.Tensor | None = None
        self.QG: torch.Tensor | None = None
        self.s: torch.Tensor | None = None
        #: per-example gradient columns of the latest statistics step, kept to re-estimate ``s`` at refresh
        self._last: list[tuple[torch.Tensor, float]] = []
        self.damping = 0.0

    @property
    def ready(self) -> bool:
        return self.s is not None and self.QA is not None

    def statistics(self, stats: LayerStats) -> dict[str, torch.Tensor]:
        kind = "real" if self.config["fisher"] == "empirical" else "fisher"
        a, g = stats.kron_factors(kind)
        rows = stats.input_rows()
        out: dict[str, torch.Tensor] = {"A": a, "G": g}
        for j, (gr, w) in enumerate(stats.output_rows(kind)):
            # per-example gradient of the column: sum_t g_{n,t} abar_{n,t}^T (rows are per-example dl_n/dout)
            pe = torch.einsum("nto,nti->noi", gr, rows)
            out[f"pe{j}"] = pe
            out[f"w{j}"] = torch.tensor(float(w), dtype=pe.dtype)
        return out

    @staticmethod
    def _columns(new: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, float]]:
        return [(new[f"pe{j}"], float(new[f"w{j}"])) for j in range(sum(k.startswith("pe") for k in new))]

    def _scaling(self, cols: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
        """``(1/N) sum_n sum_j w_j (Q_G^T Gbar_{n,j} Q_A)^2`` in the current basis (George et al. eq. 10)."""
        s = None
        for pe, w in cols:
            proj = self.QG.T @ pe @ self.QA  # (N, d_out, d_in) batched
            term = proj.square().mean(0) * w
            s = term if s is None else s + term
        return s

    def accumulate(self, new: dict[str, torch.Tensor], ema_decay: float) -> None:
        self.A = self.ema(self.A, new["A"], ema_decay)
        self.G = self.ema(self.G, new["G"], ema_decay)
        self._last = self._columns(new)
        if self.QA is not None and self.s is not None:
            self.s = self.ema(self.s, self._scaling(self._last), ema_decay)

    def refresh(self, damping: float) -> None:
        self.damping = float(damping)
        if self.A is None or self.G is None or not self._last:
            return
        _, self.QA = psd_eigh(self.A, f"{self.name} (factor A)", self.events)
        _, self.QG = psd_eigh(self.G, f"{self.name} (factor G)", self.events)
        self.s = self._scaling(self._last)

    def _require(self) -> None:
        if not self.ready:
            raise RuntimeError(f"layer {self.name!r} has no EKFAC basis yet: run a forward/backward and a step first")

    def solve(self, mat: torch.Tensor) -> torch.Tensor:
        self._require()
        denom = self.s + self.damping
        tiny = torch.finfo(denom.dtype).tiny ** 0.5
        return self.QG @ ((self.QG.T @ mat @ self.QA) / denom.clamp_min(tiny)) @ self.QA.T

    def mv(self, mat: torch.Tensor) -> torch.Tensor:
        self._require()
        return self.QG @ (self.s * (self.QG.T @ mat @ self.QA)) @ self.QA.T

    def dense(self) -> torch.Tensor:
        if self.s is None and self.A is not None:
            self.refresh(self.damping)  # dense() is for inspection: build the basis from what was gathered
        self._require()
        q = torch.kron(self.QG, self.QA)
        return self._param_dense((q * self.s.reshape(1, -1)) @ q.T)

    def state_dict(self) -> dict[str, Any]:
        return {"A": self.A, "G": self.G, "QA": self.QA, "QG": self.QG, "s": self.s, "damping": self.damping}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"A", "G", "QA", "QG", "s", "damping"} - set(state)
        if missing:
            raise ValueError(f"layer {self.name!r}: EKFAC checkpoint entry lacks {sorted(missing)}")
        if state["QA"] is not None and state["s"] is not None and tuple(state["s"].shape) != tuple(self.shape):
            raise ValueError(f"layer {self.name!r}: checkpoint scaling has shape {tuple(state['s'].shape)}, "
                             f"the layer's matrix view is {tuple(self.shape)}; load it into the same model")
        self.A, self.G, self.QA, self.QG, self.s = state["A"], state["G"], state["QA"], state["QG"], state["s"]
        self.damping = float(state["damping"])
        self._last = []


@register_estimator("ekfac")
class EKFAC(Estimator):
    """EKFAC: K-FAC eigenbasis with per-coordinate second moments (George et al. 2018)."""

    #: measured without a KL clip (the default ``kl_clip=1e-3`` of curvlab.Estimator.defaults is turned off here)
    suggested = {"lr": 0.1, "damping": 0.1, "momentum": 0.5, "ema_decay": 0.95, "inv_interval": 1, "kl_clip": None}
    curvature_class = EigenCorrectedCurvature

    def captures(self) -> set[str]:
        return {"inputs", "real_grads" if self.config["fisher"] == "empirical" else "fisher_grads"}
