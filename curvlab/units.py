"""Units: the groups of parameters an update rule steps together.

A unit is either a preconditioned layer (module + adapter + curvature) or a single parameter that no
adapter claims and that gets the documented first-order fallback (``curvature is None``: its direction
is its gradient). Rules see only units; that keeps them independent of layers and estimators.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import LayerAdapter
from .curvature import Curvature
from .profiling import active, section


@dataclass(eq=False)
class Unit:
    """One step group. Parameterizations (:mod:`curvlab.scalings`) set the multipliers:

    * ``lr_mult``, ``damping_mult``: applied to the group's ``lr`` / ``damping`` by :meth:`hyper`;
    * ``damping_sides``: ``(m_A, m_G)``, separate multipliers of the input-side and output-side damping for
      curvatures with two damped factors (K-FAC); set them with :meth:`set_damping_sides`, which pushes them
      to the curvature (the curvature applies them at refresh time, on top of ``damping_mult``);
    * ``norm_weight``: the weight of this unit's direction in a GLOBAL norm taken across units (SNGM):
      ``||d|| = sqrt(sum_u norm_weight_u^2 ||d_u||^2)``; 1 is the Euclidean norm. Only rules that declare
      ``norm_weights = True`` read it.
    """

    name: str
    params: list[nn.Parameter]
    how: str
    module: nn.Module | None = None
    adapter: LayerAdapter | None = None
    curvature: Curvature | None = None
    group: dict[str, Any] = field(default_factory=dict)
    lr_mult: float = 1.0
    damping_mult: float = 1.0
    damping_sides: tuple[float, float] = (1.0, 1.0)
    norm_weight: float = 1.0
    #: this step only: the layer has no usable curvature (its forward was not captured), so ``solve`` and
    #: ``mv`` are the identity, as for a first-order fallback unit (set by the optimizer each step)
    first_order_now: bool = False

    @property
    def preconditioned(self) -> bool:
        return self.curvature is not None

    @property
    def active(self) -> bool:
        """Preconditioned by its curvature on this step."""
        return self.curvature is not None and not self.first_order_now

    def hyper(self, key: str) -> Any:
        """A per-group hyper-parameter with this unit's parameterization multiplier applied."""
        value = self.group[key]
        if key == "lr":
            return value * self.lr_mult
        if key in ("damping", "gamma"):
            return value * self.damping_mult
        return value

    def solve_damping(self) -> float:
        """The damping the curvature's refresh / solve uses: the group's ``gamma`` when ``gamma_adapt`` gave it one
        (:mod:`curvlab.factor_damping`), else its ``damping`` (times the parameterization's multiplier)."""
        return self.hyper("gamma" if "gamma" in self.group else "damping")

    def set_damping_sides(self, mult_a: float, mult_g: float) -> None:
        """Per-side damping multipliers ``(m_A, m_G)``; ValueError if the curvature has no two damped sides."""
        curv = self.curvature
        if curv is None or not hasattr(curv, "damping_sides"):
            what = "no curvature (first-order fallback)" if curv is None else type(curv).__name__
            raise ValueError(f"unit {self.name!r}: per-side damping multipliers need a curvature with two damped "
                             f"factors (K-FAC), but this unit has {what}; use damping_mult instead")
        for label, value in (("mult_a", mult_a), ("mult_g", mult_g)):
            if not (isinstance(value, (int, float)) and value > 0 and value < float("inf")):
                raise ValueError(f"unit {self.name!r}: {label} must be a finite number > 0, got {value!r}")
        self.damping_sides = curv.damping_sides = (float(mult_a), float(mult_g))

    def grads(self) -> list[torch.Tensor] | None:
        """Gradients of the unit's parameters (zeros for a missing one); ``None`` if none has a gradient."""
        if all(p.grad is None for p in self.params):
            return None
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def _apply(self, op: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.active:
            return list(tensors)
        curv, adapter = self.curvature, self.adapter
        with section(active(), "precondition"):
            mat = adapter.to_matrix(self.module, tensors).to(curv.dtype)
            out = getattr(curv, op)(mat)
            return [t.to(p.dtype) for t, p in zip(adapter.from_matrix(self.module, out), self.params)]

    @property
    def matrix_native(self) -> bool:
        """Active, and every parameter is in the curvature's dtype: a rule may then work on the adapter's matrix
        view throughout (:meth:`matrix_op`; from the matrix to parameter-shaped views with no conversion)."""
        return self.active and all(p.dtype == self.curvature.dtype for p in self.params)

    def matrix_op(self, op: str, mat: torch.Tensor) -> torch.Tensor:
        """The curvature's ``op`` (``"solve"``, ``"mv"``, ``"damped_mv"``) on a matrix-view tensor in the curvature's
        dtype, timed as preconditioning: what :meth:`solve` / :meth:`mv` / :meth:`damped_mv` do without the
        conversions from and to parameter-shaped tensors. Active units only."""
        curv = self.curvature
        if not self.active:
            raise ValueError(f"unit {self.name!r} has no curvature on this step; use solve / mv on its tensors")
        if op == "damped_mv" and not hasattr(curv, "damped_mv"):
            raise ValueError(self._no_damped_mv())
        with section(active(), "precondition"):
            return getattr(curv, op)(mat)

    def solve(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Damped inverse curvature times ``tensors`` (parameter-shaped); identity for fallback units."""
        if self.curvature is not None and self.curvature.passthrough:
            return list(tensors)
        return self._apply("solve", tensors)

    def mv(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Undamped curvature times ``tensors``; identity for fallback units."""
        return self._apply("mv", tensors)

    def damped_mv(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The damped matrix that :meth:`solve` inverts, times ``tensors`` (curvatures with ``damped_mv``)."""
        if self.active and not hasattr(self.curvature, "damped_mv"):
            raise ValueError(self._no_damped_mv())
        return self._apply("damped_mv", tensors)

    def _no_damped_mv(self) -> str:
        return (f"unit {self.name!r}: {type(self.curvature).__name__} has no damped_mv (the damped matrix its solve "
                "inverts; K-FAC and ISAAC have one); use fop_metric='undamped'")


def inner(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """Sum of elementwise products over a unit's tensors, accumulated in float32 or better."""
    acc = torch.zeros((), dtype=torch.float64 if xs[0].dtype == torch.float64 else torch.float32,
                      device=xs[0].device)
    for x, y in zip(xs, ys):
        acc = acc + (x.to(acc.dtype) * y.to(acc.dtype)).sum()
    return acc


def global_norm(weighted: list[tuple[float, list[torch.Tensor]]]) -> torch.Tensor:
    """``sqrt(sum_u w_u^2 ||d_u||^2)`` over ``(w_u, d_u)`` pairs (SNGM's N.1 norm), as a 0-d tensor.

    One ``torch._foreach_norm`` over all tensors (one reduction each, no elementwise product written out) and
    one weighted sum; accumulated in float32 or better, as :func:`inner`.
    """
    tensors = [t for _, ts in weighted for t in ts]
    weights = [abs(float(w)) for w, ts in weighted for _ in ts]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch.stack([n.to(dtype) for n in torch._foreach_norm(tensors)])
    if any(w != 1.0 for w in weights):
        norms = norms * torch.tensor(weights, dtype=dtype, device=norms.device)
    return torch.linalg.vector_norm(norms)
