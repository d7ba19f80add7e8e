"""Damping diagnostic: per layer, the damping against the eigenvalues of the curvature it is added to.

A Tikhonov term ``lambda I`` added to a curvature factor with eigenvalues ``e_1..e_n`` leaves the preconditioner
close to ``(1/lambda) I`` (a scaled gradient step) when ``lambda`` exceeds most ``e_i``: the curvature is then
swamped. :func:`damping_report` lists, for every damped factor of every preconditioned unit, the damping actually
added (``Unit.hyper("damping")`` with the parameterization's multipliers, per side for K-FAC, relative epsilon
resolved for Shampoo), the eigenvalue mean (``trace / dim``), largest and smallest eigenvalue, and the ratios
``damping / mean`` and ``damping / max``. A ratio ``damping / mean > 1`` means the damping dominates the average
direction (flagged by :func:`format_damping`); ``damping / max > 1`` means it dominates every direction.

Per estimator (what "the curvature" is): K-FAC ``A`` and ``G`` with ``rho_A``, ``rho_G`` (``damping_style="exact"``:
``G (x) A`` with ``lambda``); Shampoo each block's ``L`` and ``R`` with ``eps`` and the bias statistics ``d``;
ISAAC ``A = X^T X / b`` with ``lambda_a`` (and ``G`` with ``lambda_g`` for the two-parameter zeta); MBF the
mini-blocks ``F_b`` with their ``lambda`` (mean / max / min taken over the blocks' ``trace / dim``, no
eigendecomposition: ``eig_max`` is then the largest block mean). Curvatures without a reader here (identity,
plugins) are skipped. Cost: one ``eigvalsh`` per factor up to :data:`EIG_MAX_DIM` (the mean only above), cheap
enough to record every few hundred steps (``train.damping_every`` in run metrics).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch

EIG_MAX_DIM = 2048


@dataclass(frozen=True)
class DampingRow:
    """One damped factor of one layer (module doc)."""

    layer: str
    factor: str
    dim: int
    damping: float
    eig_mean: float
    eig_max: float
    eig_min: float

    @property
    def ratio_mean(self) -> float:
        return self.damping / self.eig_mean if self.eig_mean > 0 else math.inf

    @property
    def ratio_max(self) -> float:
        return self.damping / self.eig_max if self.eig_max > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio_mean": self.ratio_mean, "ratio_max": self.ratio_max}


def _spectrum(mat: torch.Tensor) -> tuple[float, float, float]:
    """(mean, max, min) eigenvalue of a symmetric PSD matrix (mean from the trace; nan extremes above the cap)."""
    mat = mat.detach().double()
    mean = float(mat.diagonal().sum()) / mat.shape[0]
    if mat.shape[0] > EIG_MAX_DIM:
        return mean, math.nan, math.nan
    evals = torch.linalg.eigvalsh(0.5 * (mat + mat.T)).clamp_min(0.0)
    return mean, float(evals[-1]), float(evals[0])


def _diag_spectrum(d: torch.Tensor) -> tuple[float, float, float]:
    d = d.detach().double().clamp_min(0.0)
    return float(d.mean()), float(d.max()), float(d.min())


def _rows(name: str, curv: Any, damping: float) -> Iterator[tuple[str, int, float, tuple[float, float, float]]]:
    """``(factor, dim, damping, (mean, max, min))`` for one curvature (module doc)."""
    from .estimators.isaac import IsaacCurvature
    from .estimators.kfac import KroneckerCurvature
    from .estimators.miniblock import MiniBlockCurvature
    from .estimators.shampoo import ShampooCurvature

    if isinstance(curv, KroneckerCurvature):
        if curv.A is None or curv.damped is None:
            return
        if isinstance(curv.damped, tuple):
            yield "A", curv.A.shape[0], curv.damped[0], _spectrum(curv.A)
            yield "G", curv.G.shape[0], curv.damped[1], _spectrum(curv.G)
        else:
            (ma, xa, na), (mg, xg, ng) = _spectrum(curv.A), _spectrum(curv.G)
            yield "G(x)A", curv.A.shape[0] * curv.G.shape[0], curv.damped, (ma * mg, xa * xg, na * ng)
    elif isinstance(curv, ShampooCurvature):
        relative = curv.config["shampoo_epsilon"] == "relative"
        for key, value in curv.stats.items():
            if key[0] not in "LR" and key != "bias":
                continue
            spec = _diag_spectrum(value) if key == "bias" else _spectrum(value)
            eps = damping * (curv.bias_scale[1] if key == "bias" else 1.0)
            yield key, value.shape[0], eps * spec[1] if relative else eps, spec
    elif isinstance(curv, IsaacCurvature):
        if curv.cache:
            gram = curv.A if curv.A is not None else curv.X.T @ curv.X
            yield "A", gram.shape[0], curv.cache["lam"], _spectrum(gram)
            if "lam_g" in curv.cache:
                yield "G", curv.G.shape[0], curv.cache["lam_g"], _spectrum(curv.G)
    elif isinstance(curv, MiniBlockCurvature):
        means, dims = _miniblock_means(curv)
        if means is not None:
            relative = curv.config["miniblock_damping"] == "relative"
            lam = damping * float(means.mean()) if relative else damping
            yield f"blocks (x{len(means)})", dims, lam, _diag_spectrum(means)


def _miniblock_means(curv: Any) -> tuple[torch.Tensor | None, int]:
    """Every mini-block's ``trace / dim`` and the largest block dimension."""
    if curv.mode == "woodbury":
        if not curv.history:
            return None, 0
        a, g = curv._stacked()
        return (g.T.square() @ a.square().sum(1)) / a.shape[1], a.shape[1]
    if curv.blocks is None:
        return None, 0
    means = torch.cat([b.diagonal(dim1=-2, dim2=-1).mean(-1) for b in curv.blocks])
    return means, max(b.shape[-1] for b in curv.blocks)


def damping_report(opt: Any) -> list[DampingRow]:
    """Per preconditioned unit of a curvlab optimizer, one :class:`DampingRow` per damped factor (module doc)."""
    rows = []
    for unit in opt.units:
        if unit.curvature is None:
            continue
        for factor, dim, lam, (mean, top, low) in _rows(unit.name, unit.curvature, float(unit.hyper("damping"))):
            rows.append(DampingRow(unit.name, factor, int(dim), float(lam), mean, top, low))
    return rows


def format_damping(rows: list[DampingRow], threshold: float = 1.0) -> str:
    """A table; rows whose ``damping / mean eigenvalue`` exceeds ``threshold`` are flagged ``SWAMPED``."""
    head = (f"  {'layer':<12} {'factor':<14} {'dim':>6} {'damping':>10} {'eig mean':>10} {'eig max':>10} "
            f"{'eig min':>10} {'damp/mean':>10} {'damp/max':>10}")
    lines = [head]
    for r in rows:
        flag = "  SWAMPED" if r.ratio_mean > threshold else ""
        lines.append(f"  {r.layer:<12} {r.factor:<14} {r.dim:>6} {r.damping:>10.3g} {r.eig_mean:>10.3g} "
                     f"{r.eig_max:>10.3g} {r.eig_min:>10.3g} {r.ratio_mean:>10.3g} {r.ratio_max:>10.3g}{flag}")
    if not rows:
        lines.append("  (no damped curvature)")
    return "\n".join(lines)


def damping_metrics(opt: Any) -> dict[str, dict[str, float]]:
    """Compact, JSON-ready form for run metrics: ``{"layer/factor": {damping, eig_mean, eig_max, ratio_mean}}``."""
    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None
    return {f"{r.layer}/{r.factor}": {"damping": r.damping, "eig_mean": num(r.eig_mean), "eig_max": num(r.eig_max),
                                      "ratio_mean": num(r.ratio_mean)} for r in damping_report(opt)}
