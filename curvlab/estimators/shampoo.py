"""Shampoo (Gupta, Koren & Singer, ICML 2018) with the practical variants of ALGORITHMS.md 1.3.

Per layer, in the adapter's matrix view ``Wbar = [W | b]`` (Conv2d: ``W`` is ``(c_out, c_in k k)``), from the
MEAN-LOSS gradient ``G`` of the weight part (not per-example quantities; the ``fisher`` option is ignored):

* statistics ``L = G G^T``, ``R = G^T G`` (eq. S.1), folded with ``shampoo_statistics``:
  ``"ema"`` (default): ``S <- xi S + (1 - xi) S_new`` with the pinned ``ema_decay`` xi (0 = current gradient
  only). Default because the practical variants (Anil et al. 2020; Shi et al. 2023) use EMA statistics, whose
  scale is stationary, so one lr and one relative epsilon serve a whole run; ``"sum"``: AdaGrad-style
  ``S <- S + S_new`` exactly as eq. S.1 (``ema_decay`` is then ignored; the paper's ``L_0 = eps I`` is replaced
  by the ridge added at refresh time);
* inverse roots ``(L + eps I)^-e`` and ``(R + eps I)^-e`` (eq. S.4, ``e = shampoo_exponent``, default 1/4 per
  side as in eq. S.2) recomputed in ``refresh(damping)`` in float64, by eigendecomposition (``"eigh"``,
  default: exact, eigenvalues clamped at 0) or by the coupled Newton iteration (``"newton"``, Iannazzo's
  inverse p-th root as in Google/ASDL ``ComputePower``; needs ``1/e`` integer; stops when
  ``max|M - I| <= NEWTON_TOL``, i.e. roots accurate to about ``NEWTON_TOL / p`` relative, and falls back to
  eigh with a reported event when it stalls). The statistics are never modified (the ASDL pitfall);
* ``eps`` is the pinned ``damping``, relative (``eps = damping * lambda_max`` of each factor, default: the
  Google/ASDL choice, invariant to the gradient scale and width-consistent, ALGORITHMS.md 5) or absolute
  (``shampoo_epsilon="absolute"``: ``eps = damping``). Eigen-directions whose damped eigenvalue lies below the
  float64 noise level ``n * eps_mach * lambda_max`` are treated as null (pseudo-inverse), so an all-zero
  gradient gives a zero direction, never NaN;
* ``solve(V) = (L + eps)^-e V (R + eps)^-e`` per block; bias column: diagonal AdaGrad-style
  ``(d + eps)^-2e * v`` with ``d`` the folded squares of the bias gradient (the order-1 case of eq. S.3,
  total exponent ``2e``: AdaGrad's ``1/2`` at ``e = 1/4``), eps from ``max d`` when relative. A
  parameterization may give the bias its own scale, ``bias_scale = (s, t)`` (default ``(1, 1)``: bit for bit the
  plain formula): ``s (d + t eps)^-2e * v`` (``scaling="mup"`` does: a bias is a fan-in-1 layer, ALGORITHMS.md 5);
* blocking: a weight dimension larger than ``shampoo_block_size`` is cut into consecutive blocks of that
  size (the last one smaller); every block ``(i, j)`` of ``W`` is an independent Shampoo matrix;
* grafting (``shampoo_grafting``): per layer the Shampoo direction is rescaled to the Frobenius norm of the
  grafted direction, ``"sgd"``: ``V``; ``"adagrad"``: ``V / sqrt(A + eps)`` with ``A`` the folded elementwise
  squared gradients (folded like the statistics: "sum" is AdaGrad, "ema" RMSProp). Where the Shampoo direction
  vanishes the grafted one is used as is. Grafting makes ``solve`` non-linear;
* ``mv(V) = L^e V R^e`` (bias: ``d^2e * v``) and ``dense() = blockdiag(kron(L^e, R^e), diag(d^2e))`` in
  module-parameter order, from the CURRENT statistics, undamped: the matrix ``C`` that the (ungrafted)
  damped preconditioner inverts, ``solve(mv(V)) ~= V`` after a refresh on full-rank statistics. For
  ``e = 1/4`` it is Shampoo's ``H = L^1/4 (x) R^1/4``, the Kronecker surrogate of full-matrix AdaGrad's
  ``(sum g g^T)^1/2`` (Gupta et al. 2018, Lemma 8 / Theorem 7). It is NOT a Fisher or GGN estimate.

For one gradient (``ema_decay=0``), ``e = 1/4`` and ``eps -> 0`` the step is the polar factor ``U V^T`` of
``G = U S V^T`` (ALGORITHMS.md 7.2 item 10).
"""
from __future__ import annotations

from typing import Any

import torch

from ..curvature import Curvature, Estimator
from ..kernels import gram
from ..hyper import HyperParameterError, Option, one_of, positive_int
from ..linalg import NumericsEvent, log, psd_eigh, symmetrize
from ..registry import register_estimator
from ..stats import LayerStats

NEWTON_TOL = 1e-10        # stop the coupled Newton iteration when max|M - I| <= this (float64)
NEWTON_TOL_LOW = 1e-6     # ... in a lower precision (shampoo_newton_dtype="statistics"; ASDL's tolerance)
NEWTON_MAX_ITERS = 100
POWER_ITERS = 200         # power iterations for lambda_max in the Newton path

_EPS64 = torch.finfo(torch.float64).eps
_TINY64 = torch.finfo(torch.float64).tiny


def _note(events: list[NumericsEvent] | None, layer: str, what: str) -> None:
    ev = NumericsEvent(layer, what)
    log.warning("curvlab numerics: %s", ev)
    if events is not None:
        events.append(ev)


def lambda_max(a: torch.Tensor, iters: int = POWER_ITERS, rtol: float = 1e-13) -> float:
    """Largest eigenvalue of the symmetric PSD ``a`` by power iteration (Rayleigh quotient, fixed start)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(a.shape[0], generator=gen, dtype=a.dtype).to(a.device) + 0.5
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = a @ v
        new, norm = float(v @ w), float(w.norm())
        if norm == 0.0:
            return 0.0
        v = w / norm
        if abs(new - lam) <= rtol * abs(new):
            return new
        lam = new
    return lam


def _newton_root(a: torch.Tensor, p: int, eps: float, top: float, tol: float = NEWTON_TOL) -> torch.Tensor | None:
    """``(a + eps I)^(-1/p)`` by the coupled Newton iteration in ``a``'s dtype; ``None`` if it does not reach
    ``tol``.

    ``X_0 = z^(1/p) I``, ``M_0 = z (a + eps I)``, ``z = (1 + p) / (2 lambda_max)``;
    ``T = ((p + 1) I - M) / p``, ``X <- X T``, ``M <- T^p M`` keeps ``M = X^p (a + eps I)``; ``M -> I``."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    z = (1.0 + p) / (2.0 * (top + eps))
    x = eye * z ** (1.0 / p)
    m = (a + eps * eye) * z
    err = float((m - eye).abs().max())
    for _ in range(NEWTON_MAX_ITERS):
        if err <= tol:
            break
        t = ((p + 1) * eye - m) / p
        m_new = torch.linalg.matrix_power(t, p) @ m
        err_new = float((m_new - eye).abs().max())
        if not err_new < float("inf") or (err < 1e-4 and err_new >= err):   # diverged, or stalled at rounding
            break
        x, m, err = x @ t, m_new, err_new
    return symmetrize(x) if err <= tol else None


def inverse_root(mat: torch.Tensor, exponent: float, damping: float, *, relative: bool = True,
                 method: str = "eigh", layer: str = "", events: list[NumericsEvent] | None = None,
                 newton_dtype: str = "float64") -> torch.Tensor:
    """``(mat + eps I)^-exponent`` in float64 for a symmetric PSD ``mat`` (ALGORITHMS.md eq. S.4).

    ``eps = damping * lambda_max(mat)`` if ``relative`` else ``damping``. Damped eigenvalues at or below
    ``n * eps_mach * lambda_max`` count as null directions (pseudo-inverse: root 0 there). With
    ``method="newton"`` and ``newton_dtype="statistics"`` the Newton iteration runs in ``mat``'s own dtype (to
    max|M - I| <= NEWTON_TOL_LOW below float64; ASDL's convention, ~2.5x faster in float32 than float64 on a CPU);
    a float64 ``mat`` is computed exactly as with ``"float64"``."""
    a = symmetrize(mat.double())
    n = a.shape[0]
    if method == "newton":
        top = lambda_max(a)
        eps = damping * top if relative else damping
        if top + eps == 0.0:
            return torch.zeros_like(a)
        low = newton_dtype == "statistics" and mat.dtype != torch.float64
        tol = NEWTON_TOL_LOW if low else NEWTON_TOL
        if top + eps > 0.0:
            root = _newton_root(symmetrize(mat) if low else a, round(1.0 / exponent), eps, top, tol)
            if root is not None:
                return root.double()
        _note(events, layer, f"coupled Newton inverse root did not reach max|M - I| <= {tol:g} "
                             f"in {NEWTON_MAX_ITERS} iterations (ill-conditioned or singular statistics); used eigh")
    evals, evecs = psd_eigh(a, layer, events)
    top = float(evals[-1])
    eps = damping * top if relative else damping
    shifted = evals + eps
    keep = shifted > n * _EPS64 * top
    inv = torch.where(keep, shifted.clamp_min(_TINY64) ** (-exponent), torch.zeros_like(shifted))
    return (evecs * inv) @ evecs.T


def diag_inverse_root(d: torch.Tensor, exponent: float, damping: float, relative: bool = True) -> torch.Tensor:
    """Elementwise ``(d + eps)^-exponent`` in float64 (``eps`` as in :func:`inverse_root`; zeros stay null)."""
    d = d.double().clamp_min(0.0)
    top = float(d.max()) if d.numel() else 0.0
    shifted = d + (damping * top if relative else damping)
    keep = shifted > _EPS64 * top
    return torch.where(keep, shifted.clamp_min(_TINY64) ** (-exponent), torch.zeros_like(shifted))


def psd_power(mat: torch.Tensor, exponent: float, layer: str = "",
              events: list[NumericsEvent] | None = None) -> torch.Tensor:
    """``mat^exponent`` (float64) of a symmetric PSD matrix, eigenvalues clamped at 0."""
    evals, evecs = psd_eigh(symmetrize(mat.double()), layer, events)
    return (evecs * evals ** exponent) @ evecs.T


def block_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` cutting ``range(n)`` into consecutive blocks of at most ``size``."""
    return [(s, min(s + size, n)) for s in range(0, n, size)] or [(0, 0)]


class ShampooCurvature(Curvature):
    """Blocked Shampoo factors ``L_ij``, ``R_ij`` of one layer's weight, diagonal statistics for its bias.

    ``stats`` holds the folded statistics (keys ``"L{i},{j}"``, ``"R{i},{j}"``, ``"bias"``, ``"graft"``);
    ``roots`` the damped inverse roots computed by :meth:`refresh` (same keys); ``blocks`` the
    ``(key, row slice, column slice)`` of every weight block."""

    #: data parallel (:mod:`curvlab.distributed`): statistics come from the already averaged gradient (no
    #: reduction); refresh sets ``roots``
    reductions = {"*": "none"}
    refreshed = ("roots",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        d_out, cols = self.shape
        self.has_bias = self.adapter.has_bias(self.module)
        self.n_weight = cols - int(self.has_bias)
        size = self.config["shampoo_block_size"]
        self.blocks = [(f"{i},{j}", slice(r0, r1), slice(c0, c1))
                       for i, (r0, r1) in enumerate(block_ranges(d_out, size))
                       for j, (c0, c1) in enumerate(block_ranges(self.n_weight, size))]
        self.exponent: float = self.config["shampoo_exponent"]
        self.grafting: str | None = self.config["shampoo_grafting"]
        self.stats: dict[str, torch.Tensor] = {}
        self.roots: dict[str, torch.Tensor] = {}
        self._powers: dict[str, torch.Tensor] | None = None
        #: ``(step, ridge)`` multipliers of the bias column's diagonal root (module doc); set by a parameterization
        self.bias_scale: tuple[float, float] = (1.0, 1.0)

    @property
    def ready(self) -> bool:
        return bool(self.roots)

    def statistics(self, stats: LayerStats) -> dict[str, torch.Tensor]:
        g = stats.grad
        if g is None:
            raise RuntimeError(f"layer {self.name!r}: Shampoo needs the layer's gradient, none was captured")
        out: dict[str, torch.Tensor] = {}
        for key, rows, cols in self.blocks:
            gb = g[rows, cols]
            out["L" + key] = gram(gb.T)
            out["R" + key] = gram(gb)
        if self.has_bias:
            out["bias"] = g[:, -1] ** 2
        if self.grafting == "adagrad":
            out["graft"] = g * g
        return out

    def accumulate(self, new: dict[str, torch.Tensor], ema_decay: float) -> None:
        summed = self.config["shampoo_statistics"] == "sum"
        for key, value in new.items():
            old = self.stats.get(key)
            self.stats[key] = (value if old is None else old + value) if summed else self.ema(old, value, ema_decay)
        self._powers = None

    def refresh(self, damping: float) -> None:
        if not self.stats:
            return
        relative = self.config["shampoo_epsilon"] == "relative"
        method, e = self.config["shampoo_root_method"], self.exponent
        roots = {}
        for key, _, _ in self.blocks:
            for side in "LR":
                roots[side + key] = inverse_root(self.stats[side + key], e, damping, relative=relative,
                                                 method=method, layer=f"{self.name} ({side} block {key})",
                                                 events=self.events,
                                                 newton_dtype=self.config["shampoo_newton_dtype"]).to(self.dtype)
        if self.has_bias:
            step, ridge = self.bias_scale
            root = diag_inverse_root(self.stats["bias"], 2 * e, damping * ridge, relative)
            roots["bias"] = (root * step if step != 1.0 else root).to(self.dtype)
        if self.grafting == "adagrad":
            roots["graft"] = diag_inverse_root(self.stats["graft"], 0.5, damping, relative).to(self.dtype)
        self.roots = roots

    def _apply(self, factors: dict[str, torch.Tensor], mat: torch.Tensor) -> torch.Tensor:
        """Blockwise ``F_L V F_R`` on the weight part and ``f * v`` on the bias column."""
        if len(self.blocks) == 1 and not self.has_bias:
            key = self.blocks[0][0]
            return factors["L" + key] @ mat @ factors["R" + key]
        out = torch.empty_like(mat)
        for key, rows, cols in self.blocks:
            out[rows, cols] = factors["L" + key] @ mat[rows, cols] @ factors["R" + key]
        if self.has_bias:
            out[:, -1] = factors["bias"] * mat[:, -1]
        return out

    def solve(self, mat: torch.Tensor) -> torch.Tensor:
        """Damped Shampoo direction ``L^-e V R^-e`` (per block; diagonal on the bias), grafted if asked."""
        out = self._apply(self.roots, mat)
        if self.grafting is None:
            return out
        graft = mat if self.grafting == "sgd" else self.roots["graft"] * mat
        ns, ng = out.norm(), graft.norm()
        tiny = torch.finfo(ns.dtype).tiny
        return torch.where(ns > tiny, out * (ng / ns.clamp_min(tiny)), graft)

    def _positive_powers(self) -> dict[str, torch.Tensor]:
        if not self.stats:
            raise RuntimeError(f"layer {self.name!r} has no Shampoo statistics yet: run a forward/backward first")
        if self._powers is None:
            e = self.exponent
            powers = {k: psd_power(v, e, self.name, self.events).to(self.dtype)
                      for k, v in self.stats.items() if k[0] in "LR"}
            if self.has_bias:
                powers["bias"] = self.stats["bias"].clamp_min(0.0) ** (2 * e) / self.bias_scale[0]
            self._powers = powers
        return self._powers

    def mv(self, mat: torch.Tensor) -> torch.Tensor:
        """Undamped ``C V = L^e V R^e`` (per block; ``d^2e * v`` on the bias) from the current statistics."""
        return self._apply(self._positive_powers(), mat)

    def dense(self) -> torch.Tensor:
        """``C`` = block-diagonal ``kron(L^e, R^e)`` (+ ``diag(d^2e)`` for the bias) in parameter order."""
        powers = self._positive_powers()
        d_out, cols = self.shape
        grid = torch.arange(d_out * cols, device=self.device).reshape(d_out, cols)
        c = torch.zeros(d_out * cols, d_out * cols, dtype=self.dtype, device=self.device)
        for key, rows, cs in self.blocks:
            idx = grid[rows, cs].reshape(-1)
            c[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(powers["L" + key], powers["R" + key])
        if self.has_bias:
            idx = grid[:, -1]
            c[idx, idx] = powers["bias"]
        return self._param_dense(c)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": dict(self.stats), "roots": dict(self.roots)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats, self.roots = dict(state["stats"]), dict(state["roots"])
        self._powers = None


def _exponent(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise HyperParameterError(f"{name} must be a number in (0, 1] (1/4 is Shampoo), got {value!r}")
    return float(value)


def _grafting(name: str, value: Any) -> str | None:
    return None if value is None else one_of("sgd", "adagrad")(name, value)


@register_estimator("shampoo")
class Shampoo(Estimator):
    """Shampoo: per layer ``L^-e G R^-e`` from gradient statistics (Gupta, Koren & Singer 2018)."""

    options = {
        "shampoo_exponent": Option(0.25, _exponent, "e: the step is L^-e G R^-e (eq. S.4); 1/4 is Shampoo"),
        "shampoo_statistics": Option("ema", one_of("ema", "sum"),
                                     "'ema': fold L, R with ema_decay; 'sum': AdaGrad-style running sum (eq. S.1)"),
        "shampoo_root_method": Option("eigh", one_of("eigh", "newton"),
                                      "inverse roots by float64 eigh or the coupled Newton iteration"),
        "shampoo_newton_dtype": Option("float64", one_of("float64", "statistics"),
                                       "shampoo_root_method='newton': iterate in float64 (to max|M - I| <= 1e-10) "
                                       "or in the statistics' dtype (to 1e-6 below float64: ASDL's convention)"),
        "shampoo_epsilon": Option("relative", one_of("relative", "absolute"),
                                  "ridge eps = damping * lambda_max (relative) or damping (absolute)"),
        "shampoo_grafting": Option(None, _grafting, "None, 'sgd' or 'adagrad': per-layer norm of the step"),
        "shampoo_block_size": Option(1024, positive_int, "dimensions above this are split into blocks"),
    }
    #: Ungrafted Shampoo on digits (MLP / CNN, batch 64, 4 epochs; seed 0: 96.4% / 95.6%). Each layer's step
    #: L^-1/4 G R^-1/4 has O(1) singular values whatever the gradient scale, hence the small lr; the CNN
    #: diverges from lr ~0.05. With shampoo_grafting="sgd", lr=0.1, momentum=0.9 also trains (97% / 97%). Measured
    #: without a KL clip, which is therefore turned off here (``defaults`` has it on).
    suggested = {"lr": 0.02, "damping": 0.03, "momentum": 0.5, "ema_decay": 0.95, "inv_interval": 5, "kl_clip": None}
    #: README "Defaults": the trust region of every estimator plus momentum 0.7 and roots every 5 steps. With the KL
    #: clip alone (momentum 0, roots every 10) the MLP 64-512-10 at batch 256 (18 steps in 3 epochs) reaches 0.90;
    #: momentum 0.9 trains every standard-parameterized digits model but leaves the muP CNN at batch 256 at 0.88
    defaults = {"kl_clip": 1e-3, "momentum": 0.7, "inv_interval": 5}
    curvature_class = ShampooCurvature

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        e = config["shampoo_exponent"]
        if config["shampoo_root_method"] == "newton" and abs(1.0 / e - round(1.0 / e)) > 1e-9:
            raise HyperParameterError(
                f"shampoo_root_method='newton' computes inverse p-th roots with integer p = 1/shampoo_exponent, "
                f"but shampoo_exponent={e!r} gives p = {1.0 / e:.6g}; use shampoo_root_method='eigh' or an "
                "exponent such as 1/2, 1/4, 1/8")

    def captures(self) -> set[str]:
        return {"grad"}
