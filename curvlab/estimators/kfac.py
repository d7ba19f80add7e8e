"""K-FAC (Martens & Grosse, ICML 2015) and KFC for convolutions (Grosse & Martens, ICML 2016).

Per layer, in the adapter's matrix view ``Wbar`` (``d_out x (d_in+1)``, flattened row-major, so the
Kronecker order is ``G (x) A`` -- ALGORITHMS.md writes the column-major ``A (x) G``):

* statistics (eq. K.3 / C.4) from ``N`` examples with ``T`` rows each (``T = 1`` for Linear on 2-D input,
  ``T = H_out W_out`` for Conv2d)::

      A = (1/N)     sum_{n,t} abar_{n,t} abar_{n,t}^T
      G = (1/(N T)) sum_{n,t} w g_{n,t} g_{n,t}^T

  with ``g`` the per-example output gradients of the chosen ``fisher`` type (pitfall P0 handled by the
  capture backend) and ``w`` the weight of each back-propagated vector (:mod:`curvlab.losses`);
* EMA (eq. K.4) with ``ema_decay`` as the weight of the old factors;
* ``damping_style="pi"`` (default, eq. K.5): ``A + pi sqrt(lambda) I`` and ``G + sqrt(lambda)/pi I`` with
  the trace-norm ``pi``, inverted by Cholesky every ``inv_interval`` steps; invariant to moving a scalar
  between ``A`` and ``G``. Default because it is what ASDL / FOP / the muP paper use and it costs one
  Cholesky per factor;
* ``damping_style="exact"`` (eq. K.8): the exact inverse of ``G (x) A + lambda I`` through the
  eigendecompositions of both factors;
* ``damping_style="explicit"``: ``A + rho_A I`` and ``G + rho_B I`` with ``rho_A = lambda m_A`` and
  ``rho_B = lambda m_B`` (the per-side form of muP for K-FAC, Ishikawa & Karakida, ICLR 2024, eq. P.3);
* ``damping_style="trace"``: ``rho_A = lambda m_A tr(A)``, ``rho_B = lambda m_B tr(G)`` (the
  trace-proportional heuristic of ALGORITHMS.md 5.1, width-consistent in every layer type);
* per-side multipliers ``(m_A, m_B) = damping_sides`` (default ``(1, 1)``) are set per layer by a
  parameterization through :meth:`curvlab.units.Unit.set_damping_sides` (``scaling="mup"`` does); in the
  ``pi`` style they multiply ``pi sqrt(lambda)`` and ``sqrt(lambda)/pi``, in the ``exact`` style their product
  multiplies ``lambda``. With the default ``(1, 1)`` the ``pi`` and ``exact`` styles are bit-for-bit the
  plain formulas above. A parameterization may also set a layer's ``damping_style`` (muP's ``mup_damping``);
* ``solve(V) = G_d^-1 V A_d^-1`` (eq. K.6), ``mv(V) = G V A`` (undamped), ``damped_mv(V) = G_d V A_d`` (the
  matrix ``solve`` inverts; FOP's ``fop_metric="damped"``), ``dense() = G (x) A``.

Bias is folded into ``A`` through the homogeneous coordinate (the choice for which the exactness cases of
ALGORITHMS.md 7.2 hold); ASDL's "bias with G only" is not implemented.
"""
from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from ..stats import LayerStats
from ..curvature import Curvature, Estimator
from ..hyper import Option, one_of
from ..linalg import add_diagonal, psd_eigh, spd_inverse
from ..registry import register_estimator


#: ``solve`` pads ``A_d^-1`` (and the gradient) to a multiple of PAD columns from PAD_MIN columns on
PAD, PAD_MIN = 8, 128


def trace_norm_pi(a: torch.Tensor, g: torch.Tensor) -> float:
    """``pi = sqrt((tr(A)/dim A) / (tr(G)/dim G))`` (eq. K.5); 1 when either trace vanishes."""
    ta = float(a.diagonal().sum()) / a.shape[0]
    tg = float(g.diagonal().sum()) / g.shape[0]
    if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


class KroneckerCurvature(Curvature):
    """``G (x) A`` for one Linear / Conv2d layer."""

    #: data parallel (:mod:`curvlab.distributed`): A and G are means over examples; refresh sets ``inverses``
    reductions = {"A": "mean_sym", "G": "mean_sym"}
    refreshed = ("inverses",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self._padded: dict[str, tuple[Any, int, torch.Tensor]] = {}   # key -> (weak ref, version, padded copy)
        self._owned: dict[str, Any] = {}           # weak references to the factors this object made (EMA in place)
        self.inverses: dict[str, torch.Tensor] = {}
        #: damping style of this layer (``config["damping_style"]`` unless a parameterization changes it)
        self.damping_style: str = self.config["damping_style"]
        #: per-side damping multipliers ``(m_A, m_G)``; see the module docstring
        self.damping_sides: tuple[float, float] = (1.0, 1.0)
        #: the damping of the last refresh: ``(rho_A, rho_G)`` (factored styles) or ``lambda`` ("exact")
        self.damped: tuple[float, float] | float | None = None

    @property
    def ready(self) -> bool:
        return bool(self.inverses)

    def statistics(self, stats: LayerStats) -> dict[str, torch.Tensor]:
        kind = "real" if self.config["fisher"] == "empirical" else "fisher"
        a, g = stats.kron_factors(kind, self.config["kfac_approx"])
        return {"A": a, "G": g}

    def accumulate(self, new: dict[str, torch.Tensor], ema_decay: float) -> None:
        """EMA (eq. K.4). Factors this curvature made itself (the result of an earlier EMA) are updated in place,
        with the arithmetic of :meth:`ema` and no new ``d x d`` tensor per factor and step; a factor that is the
        caller's statistics tensor is never modified (the first EMA from it is out of place)."""
        for key in ("A", "G"):
            old = getattr(self, key)
            mine = self._owned.get(key)
            if old is not None and ema_decay != 0.0 and mine is not None and mine() is old:
                value = old.mul_(ema_decay).add_(new[key], alpha=1.0 - ema_decay)
            else:
                value = self.ema(old, new[key], ema_decay)
            setattr(self, key, value)
            self._owned[key] = weakref.ref(value) if value is not new[key] else None

    def refresh(self, damping: float) -> None:
        if self.A is None or self.G is None:
            return
        style = self.damping_style
        side_a, side_g = self.damping_sides
        if style == "exact":
            ea, qa = psd_eigh(self.A, self.name, self.events)
            eg, qg = psd_eigh(self.G, self.name, self.events)
            self.inverses = {"QA": qa, "eA": ea, "QG": qg, "eG": eg,
                             "lam": torch.tensor(damping * side_a * side_g, dtype=self.dtype)}
            self.damped = damping * side_a * side_g
            return
        rho_a, rho_g = self.side_damping(damping)
        self.damped = (rho_a, rho_g)
        self.inverses = {
            "A_inv": spd_inverse(add_diagonal(self.A, rho_a), f"{self.name} (factor A)", self.events),
            "G_inv": spd_inverse(add_diagonal(self.G, rho_g), f"{self.name} (factor G)", self.events),
        }

    def side_damping(self, damping: float) -> tuple[float, float]:
        """``(rho_A, rho_G)`` added to ``A`` and ``G`` at refresh for the factored styles (pi/explicit/trace)."""
        if self.A is None or self.G is None:
            raise RuntimeError(f"layer {self.name!r} has no K-FAC statistics yet: run a forward/backward first")
        side_a, side_g = self.damping_sides
        style = self.damping_style
        if style == "pi":
            pi = trace_norm_pi(self.A, self.G)
            root = math.sqrt(damping)
            return pi * root * side_a, root / pi * side_g
        if style == "explicit":
            return damping * side_a, damping * side_g
        if style == "trace":
            return (damping * side_a * float(self.A.diagonal().sum()),
                    damping * side_g * float(self.G.diagonal().sum()))
        raise ValueError(f"layer {self.name!r}: damping_style {style!r} has no per-side damping "
                         "(one of 'pi', 'explicit', 'trace')")

    def solve(self, mat: torch.Tensor) -> torch.Tensor:
        inv = self.inverses
        if "A_inv" in inv:
            return self._kron_product(inv["G_inv"], mat, inv["A_inv"], "A_inv")
        qa, qg = inv["QA"], inv["QG"]
        denom = inv["eG"].unsqueeze(1) * inv["eA"].unsqueeze(0) + inv["lam"]
        tiny = torch.finfo(denom.dtype).tiny ** 0.5
        return qg @ ((qg.T @ mat @ qa) / denom.clamp_min(tiny)) @ qa.T

    def _kron_product(self, left: torch.Tensor, mat: torch.Tensor, right: torch.Tensor, key: str) -> torch.Tensor:
        """``left @ mat @ right`` with ``right`` (``d x d``) zero-padded to a multiple of ``PAD`` columns from
        ``PAD_MIN`` on: ``left (V pad(R)[:d])`` restricted to its first ``d`` columns is ``left V R``, since the padding
        columns are zero. The point is speed: BLAS runs markedly slower when the OUTPUT has an odd width such as the
        ``d_in + 1 = 785`` of a bias-carrying layer (one CPU thread: ``G V A`` 18.0 ms at 785 columns, 12.7 ms padded
        to 792), not when the inner dimension has it, so the right side goes first and ``V`` needs no padded copy.
        Returns a view (the first ``d`` columns of the padded product)."""
        padded = self._padded_factor(right, key)
        if padded is None:
            return left @ mat @ right
        d = mat.shape[1]
        return (left @ (mat @ padded[:d]))[:, :d]          # a view: the first d columns of the padded product

    def _padded_factor(self, factor: torch.Tensor, key: str) -> torch.Tensor | None:
        """``factor`` zero-padded to a multiple of ``PAD`` columns, or ``None`` when it needs none. Cached per
        ``key`` while the tensor is the same object at the same version (refreshes make new inverses; the EMA
        updates ``A`` in place, which bumps its version)."""
        d = factor.shape[0]
        if d < PAD_MIN or d % PAD == 0:
            return None
        cached = self._padded.get(key)
        if cached is not None and cached[0]() is factor and cached[1] == factor._version:
            return cached[2]
        size = -(-d // PAD) * PAD
        padded = factor.new_zeros(size, size)
        padded[:d, :d] = factor
        self._padded[key] = (weakref.ref(factor), factor._version, padded)
        return padded

    def mv(self, mat: torch.Tensor) -> torch.Tensor:
        if self.G is None or self.A is None:
            raise RuntimeError(f"layer {self.name!r} has no K-FAC statistics yet: run a forward/backward first")
        return self._kron_product(self.G, mat, self.A, "A")

    def damped_mv(self, mat: torch.Tensor) -> torch.Tensor:
        """The damped matrix ``solve`` inverts: ``G_d V A_d`` (factored styles) or ``G V A + lambda V`` (exact)."""
        if self.damped is None:
            raise RuntimeError(f"layer {self.name!r} has no damped K-FAC factors yet: refresh first")
        if isinstance(self.damped, tuple):
            rho_a, rho_g = self.damped
            return (self.G @ mat + rho_g * mat) @ self.A + rho_a * (self.G @ mat + rho_g * mat)
        return self.G @ mat @ self.A + self.damped * mat

    def dense(self) -> torch.Tensor:
        if self.A is None:
            raise RuntimeError(f"layer {self.name!r} has no K-FAC statistics yet: run a forward/backward first")
        return self._param_dense(torch.kron(self.G, self.A))

    def state_dict(self) -> dict[str, Any]:
        return {"A": self.A, "G": self.G, "inverses": dict(self.inverses), "damped": self.damped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.A, self.G = state["A"], state["G"]
        self._owned = {}                                      # loaded tensors belong to the caller
        self.inverses = dict(state["inverses"])
        self.damped = state.get("damped")


@register_estimator("kfac")
class KFAC(Estimator):
    """K-FAC / KFC: Kronecker factors A (x) G per layer (Martens & Grosse 2015; Grosse & Martens 2016)."""

    options = {
        "kfac_approx": Option("expand", one_of("expand", "reduce"),
                              "layers with a shared dimension (sequence positions, patches, several uses per forward): "
                              "'expand' treats each position like an example, 'reduce' sums over positions first "
                              "(Eschenhagen et al., NeurIPS 2023; ALGORITHMS.md 11)"),
        "damping_style": Option("pi", one_of("pi", "exact", "explicit", "trace"),
                                "'pi': factored pi-damping (eq. K.5); 'exact': (G (x) A + lambda I)^-1 via eigh "
                                "(K.8); 'explicit': A + lambda m_A I, G + lambda m_G I; 'trace': A + lambda tr(A) I, "
                                "G + lambda tr(G) I (m_A, m_G: per-side multipliers of a parameterization)"),
    }
    #: measured without a KL clip, which is therefore turned off here (``defaults`` has it on: README "Defaults")
    suggested = {"lr": 0.1, "damping": 0.1, "momentum": 0.5, "ema_decay": 0.95, "inv_interval": 5, "kl_clip": None}
    curvature_class = KroneckerCurvature

    def captures(self) -> set[str]:
        return {"inputs", "real_grads" if self.config["fisher"] == "empirical" else "fisher_grads"}
