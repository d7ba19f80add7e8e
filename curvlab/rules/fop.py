"""FOP: Fisher-orthogonal projection (Lu & Armour, "Beyond the Mean: Fisher-Orthogonal Projection for
Natural Gradient Descent in Large Batch Training", AAAI-26; arXiv 2508.13898; ALGORITHMS.md section 2).

Per preconditioned unit (layer), from the mean gradients ``g1, g2`` of the two halves of the batch --
taken from ONE forward and ONE backward through the captured inputs and output gradients
(:meth:`curvlab.stats.LayerStats.sub_batch_grads`), never from two backward passes:

    (F.1) g_avg = (g1 + g2)/2,   g_diff = g1 - g2
    (F.2) s = <g_diff, F g_avg> / (<g_avg, F g_avg> + eps)          F: the UNDAMPED curvature (``mv``)
    (F.3) g_perp = g_diff - s g_avg                                  => <g_avg, g_perp>_F = 0
    (F.4) D = <g_avg, M^-1 g_perp>,  E = <g_perp, M^-1 g_perp>,  beta* = D / E    M^-1: the damped ``solve``
    (F.5) g_comb = g_avg + beta* g_perp
    (F.6) eta* = <g_tot, M^-1 g_comb> / <g_comb, M^-1 g_comb>
    (F.7) direction = eta* M^-1 g_comb     (then lr, momentum, weight decay as the natural rule)

Which F projects in (F.2) is ``fop_metric`` [U]: ``"undamped"`` (default) is the curvature ``mv`` (ALGORITHMS.md 2.1's
reading: the paper's KL section defines orthogonality with the undamped F), ``"damped"`` the matrix ``M`` whose
inverse (F.4)-(F.7) apply (``damped_mv``). Both are legitimate: 2.1's argument that "the same metric in both would
make D vanish" is about F vs F^-1 (D = <g_avg, M^-1 g_perp> vanishes only if (F.2) used M^-1), not about damped vs
undamped; with ``M`` in (F.2) and ``M^-1`` in (F.4) D is generically nonzero. Ablation (``analysis/fop_metric.py``; K-FAC,
digits MLP 64-64-64-10, batch 256, 10 epochs, seeds 0-2, lr {0.03, 0.1, 0.3} chosen on validation accuracy; mean
test accuracy): damping 1e-3: undamped 0.9719, damped 0.9719; damping 0.1: undamped 0.9681, damped 0.9689 (seed
spread 0.967-0.973). No measurable difference: the default stays ``"undamped"``. Guards (2.6): ``eps = 1e-12 |<g_avg, F g_avg>|``
(relative only: the floor ``max(1, .)`` suggested in 2.1 swamps small gradients and breaks (F.3)); ``beta* = 0`` when ``E <= fop_tau * <g_avg, M^-1 g_avg>`` (the halves agree);
``eta* = 1`` when ``<g_comb, M^-1 g_comb>`` is not positive. ``fop_gtot="avg"`` (default, ``eta*`` in
[1/3, 1]) or ``"sum"`` (``g_tot = g1 + g2``, twice that) [U]. Units without curvature (first-order
fallback) get the averaged gradient. Coupled weight decay is added to both halves.

Data parallel (ALGORITHMS.md 2.2, :mod:`curvlab.distributed`): ``g1`` is the mean gradient of the even ranks'
examples and ``g2`` of the odd ranks', from each rank's local (pre-all-reduce) rows, in one all-reduce over
``[is_even g, is_odd g]``; two ranks holding the first / second half equal the single-process split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..hyper import Option, non_negative, one_of
from ..registry import register_rule
from ..stats import LayerStats
from ..units import Unit
from .natural import NaturalGradient


@dataclass
class FOPTerms:
    """Every intermediate of (F.1)-(F.7) for one unit (parameter-shaped tensor lists and scalars)."""

    g_avg: list[torch.Tensor]
    g_perp: list[torch.Tensor]
    inv_avg: list[torch.Tensor]            # M^-1 g_avg
    inv_perp: list[torch.Tensor]           # M^-1 g_perp
    s: float
    beta: float
    eta: float
    direction: list[torch.Tensor]          # eta* M^-1 g_comb


Vec = list[torch.Tensor]


def _dot(xs: Vec, ys: Vec) -> torch.Tensor:
    """``<xs, ys>`` as a 0-d tensor accumulated in float32 or better (as :func:`curvlab.units.inner`), one BLAS
    dot per contiguous pair (no elementwise product written out)."""
    dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    total = None
    for x, y in zip(xs, ys):
        x, y = x.to(dtype), y.to(dtype)
        v = (torch.dot(x.reshape(-1), y.reshape(-1)) if x.is_contiguous() and y.is_contiguous()
             else (x * y).sum())
        total = v if total is None else total + v
    return total


def _fop(g1: Vec, g2: Vec, mv, solve, gtot: str, tau: float,
         reuse: bool = False) -> tuple[Vec, Vec, Vec, Vec, torch.Tensor, Vec]:
    """(F.1)-(F.7) on vectors held as tensor lists (a unit's parameter-shaped tensors, or its one matrix view);
    ``mv`` / ``solve`` map such a list to another. Returns ``(g_avg, g_perp, M^-1 g_avg, M^-1 g_perp, [s, beta*,
    eta*], direction)`` with the scalars as ONE 1-d tensor: nothing here waits for the device (no host sync),
    the guards of the module doc are ``torch.where`` selections.

    The scalars of (F.6) come from the inner products of (F.4) by bilinearity (no ``g_comb`` is formed):
    ``<g_avg, M^-1 g_comb> = A + beta* D``, ``<g_comb, M^-1 g_comb> = A + beta* D + beta* (<g_perp, M^-1 g_avg>
    + beta* E)`` with ``A = <g_avg, M^-1 g_avg>``; ``g_tot = g1 + g2 = 2 g_avg`` exactly in floating point.

    ``reuse=True`` (the caller owns ``g1`` and ``g2`` and reads them no more; no autograd): ``g_avg`` and ``g_perp``
    are written over ``g1`` and ``g2``, the direction over ``g_diff`` (dead once ``g_perp`` is formed). Same
    arithmetic, three fewer large temporaries per unit (on CPU each fresh one is page-faulted in again, step after
    step). ``M^-1 g_avg`` is never written: a ``solve`` may return its input or memory it keeps."""
    gd = [a - b for a, b in zip(g1, g2)]
    ga = [(a.add_(b) if reuse else torch.add(a, b)).mul_(0.5) for a, b in zip(g1, g2)]    # (F.1)
    fga = mv(ga)
    quad, cross = _dot(ga, fga), _dot(gd, fga)
    tiny = 1e-300 if quad.dtype == torch.float64 else torch.finfo(quad.dtype).tiny
    s = cross / (quad + (quad.abs() * 1e-12 + tiny))                                     # (F.2)
    gp = [torch.addcmul(d, a, s, value=-1.0, out=b) if reuse else torch.addcmul(d, a, s, value=-1.0)
          for d, a, b in zip(gd, ga, g2)]                                                   # (F.3)
    pa, pp = solve(ga), solve(gp)
    a_, d_, e_, f_ = torch.stack([_dot(ga, pa), _dot(ga, pp), _dot(gp, pp), _dot(gp, pa)]).unbind()    # (F.4)
    zero = torch.zeros_like(e_)
    beta = torch.where((e_ > tau * a_.abs()) & (e_ > 0), d_ / torch.where(e_ != 0, e_, 1.0), zero)
    num = a_ + beta * d_
    denom = num + beta * (f_ + beta * e_)                                                   # <g_comb, M^-1 g_comb>
    if gtot != "avg":
        num = 2.0 * num
    eta = torch.where(denom > 0, num / torch.where(denom > 0, denom, 1.0), zero + 1.0)    # (F.6)
    direction = [(torch.addcmul(x, y, beta, out=d) if reuse else torch.addcmul(x, y, beta)).mul_(eta)
                 for x, y, d in zip(pa, pp, gd)]                                           # (F.5), (F.7)
    return ga, gp, pa, pp, torch.stack([s, beta, eta]), direction


def fop_terms(unit: Unit, g1: list[torch.Tensor], g2: list[torch.Tensor], gtot: str = "avg",
              tau: float = 1e-10, metric: str = "undamped") -> FOPTerms:
    """FOP (F.1)-(F.7) for one unit from its two parameter-shaped half-batch gradients; ``metric``: F of (F.2)
    (module doc). The rule itself runs the same arithmetic on the matrix view (:func:`fop_matrix`)."""
    mv = unit.damped_mv if metric == "damped" else unit.mv
    ga, gp, pa, pp, scalars, direction = _fop(list(g1), list(g2), mv, unit.solve, gtot, tau)
    s, beta, eta = scalars.tolist()
    return FOPTerms(ga, gp, pa, pp, s, beta, eta, direction)


def fop_matrix(unit: Unit, m1: torch.Tensor, m2: torch.Tensor, gtot: str = "avg", tau: float = 1e-10,
               metric: str = "undamped", reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fop_terms` on the matrix view of a :attr:`~curvlab.units.Unit.matrix_native` unit: ``(g_avg,
    direction, [s, beta*, eta*])`` as matrices and one 1-d tensor, with the curvature's ``mv`` / ``solve`` called
    on the matrices directly (no conversion to and from parameter-shaped tensors around each product). ``reuse``:
    ``m1`` and ``m2`` are the caller's own temporaries and may be overwritten (:func:`_fop`)."""
    op = "damped_mv" if metric == "damped" else "mv"
    def apply(name: str):          # contiguous results: the inner products are then single BLAS dots
        return lambda v: [unit.matrix_op(name, v[0]).contiguous()]

    ga, _, _, _, scalars, direction = _fop([m1], [m2], apply(op), apply("solve"), gtot, tau, reuse)
    return ga[0], direction[0], scalars


@register_rule("fop")
class FisherOrthogonalProjection(NaturalGradient):
    """Fisher-orthogonal projection of the half-batch gradient difference (large-batch natural gradient)."""

    requires = frozenset({"solve", "mv"})
    every_step = frozenset({"inputs", "real_grads"})
    options = {
        **NaturalGradient.options,
        "fop_gtot": Option("avg", one_of("avg", "sum"), "g_tot in eta* (F.6): 'avg' = g_avg, 'sum' = g1 + g2"),
        "fop_tau": Option(1e-10, non_negative, "beta* = 0 when E <= tau * <g_avg, M^-1 g_avg>"),
        "fop_metric": Option("undamped", one_of("undamped", "damped"),
                             "F of the projection (F.2): the undamped curvature (mv) or the damped M that solve "
                             "inverts (damped_mv: K-FAC, ISAAC)"),
    }

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._diagnostics: dict[str, dict[str, float]] = {}
        self._pending: list[tuple[str, torch.Tensor]] = []

    @property
    def last_diagnostics(self) -> dict[str, dict[str, float]]:
        """``{unit: {"s", "beta", "eta"}}`` of the last step, as floats. Read on demand: the step itself never waits
        for the device; the first read after a step takes every unit's scalars in one transfer."""
        if self._pending:
            device = self._pending[0][1].device        # (units on several devices: gathered on the first one's)
            values = torch.stack([v.to(device, torch.float64) for _, v in self._pending]).tolist()
            self._diagnostics = {name: dict(zip(("s", "beta", "eta"), v))
                                 for (name, _), v in zip(self._pending, values)}
            self._pending = []
        return self._diagnostics

    def directions(self, units: list[Unit], stats: dict[str, LayerStats]):
        out = []
        coupled = self.config["weight_decay_style"] == "coupled"
        self._diagnostics, self._pending = {}, []
        dist = getattr(self, "dist", None)            # curvlab.distributed: even / odd ranks are the two halves
        halves = dist.fop_halves(units, stats) if dist is not None else None
        for unit in units:
            grads = unit.grads()
            if grads is None:
                continue
            wd = unit.hyper("weight_decay")
            if not unit.active:                        # fallback unit, or no captured forward this step
                if wd and coupled:
                    grads = [g.add(p, alpha=wd) for g, p in zip(grads, unit.params)]
                out.append((unit, grads, grads))
                continue
            m1, m2 = halves[unit.name] if halves is not None else stats[unit.name].sub_batch_grads()
            gtot, tau, metric = self.config["fop_gtot"], self.config["fop_tau"], self.config["fop_metric"]
            if unit.matrix_native:                     # the matrix view throughout (same arithmetic)
                m1, m2 = m1.to(unit.curvature.dtype), m2.to(unit.curvature.dtype)
                if wd and coupled:
                    w = unit.adapter.to_matrix(unit.module, unit.params)
                    m1, m2 = m1.add(w, alpha=wd), m2.add(w, alpha=wd)
                # the halves are this step's own temporaries (LayerStats / the all-reduce make new ones each step)
                ga, direction, scalars = fop_matrix(unit, m1, m2, gtot, tau, metric, reuse=True)
                g_avg = unit.adapter.from_matrix(unit.module, ga)
                direction = unit.adapter.from_matrix(unit.module, direction)
            else:
                g1 = [t.to(p.dtype) for t, p in zip(unit.adapter.from_matrix(unit.module, m1), unit.params)]
                g2 = [t.to(p.dtype) for t, p in zip(unit.adapter.from_matrix(unit.module, m2), unit.params)]
                if wd and coupled:
                    g1 = [g.add(p, alpha=wd) for g, p in zip(g1, unit.params)]
                    g2 = [g.add(p, alpha=wd) for g, p in zip(g2, unit.params)]
                mv = unit.damped_mv if metric == "damped" else unit.mv
                g_avg, _, _, _, scalars, direction = _fop(g1, g2, mv, unit.solve, gtot, tau)
            self._pending.append((unit.name, scalars))
            out.append((unit, g_avg, direction))
        return out
