"""The natural-gradient rule: ``theta <- theta - lr * m``, ``m <- mu m + nu * C^-1 g`` per unit.

* ``C^-1 g`` is the unit's damped ``solve`` (K-FAC eq. K.6; the plain gradient for fallback units);
* momentum as ``torch.optim.SGD`` (first step ``m = d``), so ``estimator="identity"`` IS momentum SGD;
* weight decay ``weight_decay_style="coupled"`` (default, as torch SGD: ``g <- g + wd theta`` before
  preconditioning) or ``"decoupled"`` (``theta <- theta - lr wd theta``, AdamW-style, not preconditioned);
* KL clip (Ba, Grosse & Martens 2017; ALGORITHMS eq. K.9), one global factor over all units:
  ``nu = min(1, sqrt(kappa / sum_u lr_u^2 <C^-1 g_u, g_u>))``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..hyper import Option, one_of
from ..registry import register_rule
from ..stats import LayerStats
from ..units import Unit, inner
from . import Plan, UpdateRule


@register_rule("natural")
class NaturalGradient(UpdateRule):
    """Preconditioned step C^-1 g with momentum, weight decay and optional KL clipping."""

    #: applies ``kl_clip`` (on by default for curvature estimators: :attr:`curvlab.Estimator.defaults`)
    trust_region = True

    options = {
        "weight_decay_style": Option("coupled", one_of("coupled", "decoupled"),
                                     "'coupled': g += wd*theta before preconditioning; 'decoupled': AdamW-style"),
    }

    def directions(self, units: list[Unit], stats: dict[str, LayerStats]
                   ) -> list[tuple[Unit, list[torch.Tensor], list[torch.Tensor]]]:
        """``(unit, gradient, preconditioned direction)`` for every unit that has a gradient."""
        out = []
        coupled = self.config["weight_decay_style"] == "coupled"
        for unit in units:
            grads = unit.grads()
            if grads is None:
                continue
            wd = unit.hyper("weight_decay")
            if wd and coupled:
                grads = [g.add(p, alpha=wd) for g, p in zip(grads, unit.params)]
            out.append((unit, grads, unit.solve(grads)))
        return out

    def kl_factor(self, dirs) -> float:
        kappa = self.config["kl_clip"]
        if kappa is None:
            return 1.0
        if not dirs:
            return 1.0
        vg = float(sum(inner(d, g) * unit.hyper("lr") ** 2 for unit, g, d in dirs))   # one host sync per step
        return min(1.0, math.sqrt(kappa / vg)) if vg > 0 else 1.0

    def plan(self, units: list[Unit], state: dict[torch.nn.Parameter, dict[str, Any]],
             stats: dict[str, LayerStats]) -> Plan:
        dirs = self.directions(units, stats)
        return self.momentum_plan(dirs, state, self.kl_factor(dirs), "momentum_buffer", keep_buffer=False)

    def momentum_plan(self, dirs, state: dict[torch.nn.Parameter, dict[str, Any]], scale: float, key: str,
                      keep_buffer: bool) -> Plan:
        """``m <- mu m + scale d`` (first step ``m = scale d``), ``theta <- theta - lr m`` (+ decoupled decay).

        The buffer lives in ``state[p][key]``; with ``mu = 0`` it is kept only if ``keep_buffer``. The new
        buffers are computed out of place (the plan is checked before anything is written) with one
        ``torch._foreach_*`` call per group of tensors sharing ``mu`` (not one small kernel per tensor), and the
        step is handed over as ``(p, m, -lr)`` (:attr:`Plan.scaled`) instead of a materialized ``-lr m``.
        Same arithmetic as the per-tensor reference ``d * scale + mu m`` then ``p += -lr m``.
        """
        plan = Plan()
        decoupled = self.config["weight_decay_style"] == "decoupled"
        fresh: list[tuple[torch.nn.Parameter, torch.Tensor, float, bool]] = []    # (p, d, -lr, store m = scale d?)
        carried: dict[float, list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, float]]] = {}
        for unit, _, direction in dirs:
            lr, mu, wd = unit.hyper("lr"), unit.hyper("momentum"), unit.hyper("weight_decay")
            keep = bool(mu or keep_buffer)
            for p, d in zip(unit.params, direction):
                buf = state.get(p, {}).get(key) if keep else None
                if decoupled and wd:                   # rare: the per-tensor form, decay on the old theta
                    m = d * scale if scale != 1.0 else d
                    if keep:
                        if buf is not None:
                            m = m.add(buf, alpha=mu)
                        elif m is d:                   # never store (or later mutate) the gradient itself
                            m = d.clone()
                        plan.state.append((p, key, m))
                    plan.updates.append((p, (m * (-lr)).add_(p, alpha=-lr * wd)))
                elif buf is None:
                    fresh.append((p, d, -lr, keep))
                else:
                    carried.setdefault(mu, []).append((p, d, buf, -lr))
        if fresh:
            ps, ds, alphas, keeps = zip(*fresh)
            news = torch._foreach_mul(list(ds), scale) if scale != 1.0 else list(ds)
            for p, d, m, alpha, keep in zip(ps, ds, news, alphas, keeps):
                if keep:
                    m = d.clone() if m is d else m             # never store (or later mutate) the gradient itself
                    plan.state.append((p, key, m))
                plan.scaled.append((p, m, alpha))
        for mu, entries in carried.items():
            ps, ds, bufs, alphas = zip(*entries)
            if scale != 1.0:
                news = torch._foreach_mul(list(ds), scale)
                torch._foreach_add_(news, list(bufs), alpha=mu)
            else:
                news = torch._foreach_add(list(ds), list(bufs), alpha=mu)
            for p, m, alpha in zip(ps, news, alphas):
                plan.state.append((p, key, m))
                plan.scaled.append((p, m, alpha))
        return plan
