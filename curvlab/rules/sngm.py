"""SNGM: stochastic normalized gradient descent with momentum (Zhao, Xie & Li, arXiv 2007.13985;
Sci. China Inf. Sci. 2024; ALGORITHMS.md section 4, eqs. N.1-N.3).

    u <- beta u + d / ||d||,    theta <- theta - lr u

with ONE global norm ``||d|| = sqrt(sum_u w_u^2 ||d_u||^2)`` over all parameters (``w_u = Unit.norm_weight``,
1 unless a parameterization sets it: plain Euclidean norm by default) (the authors report that a per-layer variant is not
better; per-layer trust ratios are LARS, a different method). ``beta`` is the pinned ``momentum``.
``d`` is the direction the estimator produces: the plain gradient for ``estimator="identity"`` (the
paper's SNGM) and the preconditioned direction ``C^-1 g`` otherwise (a new variant this framework makes
one line). Consequences: ``||u|| <= 1/(1 - beta)``, so a step moves the weights by at most
``lr/(1 - beta)``; any constant factor on the loss cancels (exactly for ``identity``; for curvature
estimators the damping breaks exact invariance).

Weight decay (the paper's placement is unconfirmed [U]): ``sngm_weight_decay="coupled"`` (default: added
to the gradient before preconditioning and normalization, as momentum SGD's L2 term, the usual reading
of N.1) or ``"decoupled"`` (``theta <- theta - lr wd theta`` after the normalized step).
Per-unit learning-rate multipliers (parameterizations) scale each unit's share of the step.
Data parallel (ALGORITHMS.md 4.6): the norm is that of the global direction, after the gradient all-reduce
(DDP averages during backward; :mod:`curvlab.distributed` all-reduces a raw model's gradients at the start of
``step``), never a per-worker norm.
"""
from __future__ import annotations

from typing import Any

import torch

from ..hyper import Option, one_of
from ..registry import register_rule
from ..stats import LayerStats
from ..units import Unit, global_norm
from . import Plan
from .natural import NaturalGradient

EPS = 1e-12


@register_rule("sngm")
class SNGM(NaturalGradient):
    """Normalized momentum u <- beta u + d/||d|| with one global norm (large-batch training)."""

    #: The global norm weights each unit by ``Unit.norm_weight`` (1 = Euclidean; a parameterization such as
    #: ``mup`` sets it so the norm of a width-consistent update does not grow with width).
    norm_weights = True
    #: lr is the length of a step (||u|| <= 1/(1-beta)), not a gradient multiplier
    suggested = {"lr": 0.03, "momentum": 0.9}
    #: the normalized step is its own trust region: no kl_clip by default (and refused if given)
    trust_region = False
    #: README "Defaults": lr 0.15, beta 0.9 (a step of at most 1.5). At batch 256 on digits (18 steps in 3 epochs) the
    #: suggested lr 0.03 reaches 0.76-0.89 with Shampoo and with muP, lr 0.1 0.82-0.90 on a 3-hidden-layer MLP
    defaults = {"lr": 0.15, "momentum": 0.9}
    options = {
        "sngm_weight_decay": Option("coupled", one_of("coupled", "decoupled"),
                                    "'coupled': wd*theta enters d before normalization; 'decoupled': after"),
    }

    def __init__(self, config: dict[str, Any]) -> None:
        if config.get("kl_clip") is not None:
            raise ValueError("kl_clip has no effect with rule='sngm' (its step is normalized already); "
                             "leave kl_clip=None")
        super().__init__({**config, "weight_decay_style": config["sngm_weight_decay"]})

    def plan(self, units: list[Unit], state: dict[torch.nn.Parameter, dict[str, Any]],
             stats: dict[str, LayerStats]) -> Plan:
        dirs = self.directions(units, stats)
        if not dirs:
            return Plan()
        norm = global_norm([(unit.norm_weight, d) for unit, _, d in dirs])
        return self.momentum_plan(dirs, state, 1.0 / float(norm.clamp_min(EPS)), "sngm_momentum", keep_buffer=True)
