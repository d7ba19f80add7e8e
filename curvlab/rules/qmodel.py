"""``rule="qmodel"``: step size and momentum from the exact quadratic model of the batch (Martens & Grosse,
ICML 2015, section 7; ALGORITHMS.md section 10, eqs. Q.1 and Q.4), over ANY estimator's direction.

Per step, with ``g`` the gradient of the objective (coupled weight decay ``eta`` included: ``g + eta theta``):

* proposal ``Delta_u = -lr_mult_u C_u^-1 g_u`` from each unit's damped ``solve`` (the gradient for first-order
  fallback units; ``lr_mult`` is a parameterization's per-unit multiplier, 1 by default);
* previous update ``delta0`` (the update this rule applied last step, kept in ``state[p]["qmodel_delta"]``;
  zero for a unit that did not move);
* ``(alpha, mu)`` minimize the model (Q.4) with EXACT curvature-vector products
  (:meth:`curvlab.quadratic.QuadraticModel.gram`, both directions in one batched forward-mode pass) and
  ``c_u = lambda_u + eta_u`` (the group's damping and weight decay)::

      [ Delta^T F Delta + c |Delta|^2      Delta^T F delta0 + c Delta^T delta0 ] [alpha]     [ g^T Delta  ]
      [ delta0^T F Delta + c delta0^T Delta   delta0^T F delta0 + c |delta0|^2 ] [ mu  ] = - [ g^T delta0 ]

  without a previous update (first step, or ``qmodel_momentum=False``)
  ``alpha = -g^T Delta / (Delta^T F Delta + c |Delta|^2)``, ``mu = 0``;
* the update is ``lr * nu * (alpha Delta + mu delta0)`` per unit (``lr`` the group's; default 1.0, the model's
  own step), with ``nu = min(1, sqrt(kl_clip / (delta^T F delta)))`` when ``kl_clip`` is set: the trust region
  of eq. K.9 on the final update ``delta`` in the exact Fisher metric (for ``delta = -lr C^-1 g`` K.9's
  ``lr^2 g^T C^-1 g`` is ``delta^T C delta``).

Guards, each recorded in the optimizer's ``events``: a 2x2 system that is singular (the directions are collinear
in the model's metric) falls back to the alpha-only solution; no positive curvature along ``Delta`` (or a
non-finite product) falls back to the plain ``lr * Delta``. ``rule.last`` holds the step's ``alpha``, ``mu``,
``fallback``, the system ``A`` (k x k) and ``b`` (``[g^T Delta, g^T delta0]``), ``model_change`` (``M(delta) - M(0)`` of the applied update, eq. Q.1) and ``scale`` (``lr * nu``).

Notes. The pinned ``momentum`` is not used (the model chooses ``mu``; a non-zero value warns once at
construction). Weight decay is always coupled (it is part of the objective the model describes). The model's
products cost one forward-mode pass over the step's training forwards (about 1-1.5 forward+backward passes);
``damping_adapt="lm"`` (:mod:`curvlab.damping`) adapts ``lambda`` with the same model. ``scaling="mup"``
refuses the rule (its global ``alpha`` has no muP width rule).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..hyper import Option, boolean, non_negative
from ..linalg import NumericsEvent
from ..quadratic import model_change, solve_step
from ..registry import register_rule
from ..stats import LayerStats
from ..units import Unit
from . import Plan
from .natural import NaturalGradient

KEY = "qmodel_delta"


def _dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(xs, ys))


@register_rule("qmodel")
class QuadraticModelRule(NaturalGradient):
    """Step size and momentum minimizing the exact quadratic model (Martens & Grosse 2015, sec. 7)."""

    options = {
        "lr": Option(1.0, non_negative, "multiplier of the model-chosen step (1 = the model's minimizer)",
                     per_group=True),
        "qmodel_momentum": Option(True, boolean, "use the previous update as the second direction of Q.4 "
                                                 "(False: alpha only, mu = 0)"),
    }
    suggested = {"lr": 1.0, "momentum": 0.0}
    #: README "Defaults": the model's own step (lr 1) bounded by a trust region on the final update in the exact
    #: Fisher metric (Ba, Grosse & Martens 2017's clip, on ``delta^T F delta``). Without it (damping 1e-3) the greedy
    #: minibatch minimizer diverges on 2-3 of 6 digits models with each of K-FAC, Shampoo, MBF and EKFAC; natural's
    #: kappa 1e-3 slows it to 0.88-0.99 train accuracy in 3 epochs; 1e-2 leaves first-order directions (identity,
    #: ISAAC) and Shampoo at 0.72-0.89 at batch 256 (18 steps); 3e-2 two of them at 0.88-0.89; 1e-1 trains all 16
    #: digits models (cross-entropy and MSE, batch 32-256) with every estimator but ISAAC on the MSE CNN (0.874)
    defaults = {"momentum": 0.0, "kl_clip": 1e-1}     # lr: its option above (1.0)
    #: the optimizer attaches a :class:`curvlab.quadratic.QuadraticModel` (``self.quadratic``) for this rule
    quadratic_model = True

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__({**config, "weight_decay_style": "coupled"})
        if config.get("momentum"):
            warnings.warn(f"rule 'qmodel' chooses its momentum mu from the quadratic model; momentum="
                          f"{config['momentum']} is not used (pass momentum=0, or qmodel_momentum=False to disable mu)",
                          UserWarning, stacklevel=4)
        self.quadratic = None
        self.events: list[NumericsEvent] = []
        self.last: dict[str, Any] = {}
        #: ``M(delta) - M(0)`` of the update planned last (eq. Q.1), read by the LM damping (curvlab.damping)
        self.predicted_change: float | None = None
        self._step = lambda: 0

    def bind(self, optimizer) -> None:
        self.quadratic, self.events = optimizer.quadratic, optimizer.events
        self._step = lambda: optimizer.step_count

    def plan(self, units: list[Unit], state: dict[torch.nn.Parameter, dict[str, Any]],
             stats: dict[str, LayerStats]) -> Plan:
        self.predicted_change, self.last = None, {}
        dirs = self.directions(units, stats)
        plan = Plan()
        moving = {id(u) for u, _, _ in dirs}
        for unit in units:                     # a unit without gradient does not move: its previous update is 0
            if id(unit) not in moving:
                plan.state += [(p, KEY, torch.zeros_like(p)) for p in unit.params if KEY in state.get(p, {})]
        if not dirs:
            return plan
        grads = [g for _, g, _ in dirs]
        vecs = [[[d.mul(-unit.lr_mult) for d in dd] for unit, _, dd in dirs]]
        prev = [[state.get(p, {}).get(KEY) for p in unit.params] for unit, _, _ in dirs]
        if self.config["qmodel_momentum"] and any(t is not None for row in prev for t in row):
            vecs.append([[torch.zeros_like(p) if t is None else t for p, t in zip(unit.params, row)]
                         for (unit, _, _), row in zip(dirs, prev)])
        k = len(vecs)
        as_map = [{p: t for (unit, _, _), ts in zip(dirs, v) for p, t in zip(unit.params, ts)} for v in vecs]
        K = self.quadratic.gram(as_map)
        c = [unit.hyper("damping") + unit.hyper("weight_decay") for unit, _, _ in dirs]
        D = [[sum(cu * _dot(vi[u], vj[u]) for u, cu in enumerate(c)) for vj in vecs] for vi in vecs]
        b = [sum(_dot(g, vi[u]) for u, g in enumerate(grads)) for vi in vecs]
        numbers = torch.stack([torch.as_tensor(t, dtype=torch.float64).to(K.device) for row in D for t in row]
                              + [torch.as_tensor(t, dtype=torch.float64).to(K.device) for t in b]).tolist()
        Kl = K.tolist()
        A = [[Kl[i][j] + numbers[i * k + j] for j in range(k)] for i in range(k)]
        bl = numbers[k * k:]
        eps = torch.finfo(grads[0][0].dtype).eps
        x, fallback = solve_step(A, bl, rtol=100 * eps)
        if fallback is not None:
            what = ("the 2x2 system of Q.4 is singular (proposal and previous update collinear in the model's "
                    "metric): alpha-only step" if fallback == "singular" else
                    "no positive curvature along the proposal (or a non-finite product): plain lr * Delta step")
            self.events.append(NumericsEvent("qmodel", f"step {self._step()}: {what}"))
        lrs = [unit.group["lr"] for unit, _, _ in dirs]
        uniform = all(lr == lrs[0] for lr in lrs)
        steps = []
        for u, (unit, _, _) in enumerate(dirs):
            row = []
            for j, p in enumerate(unit.params):
                s = torch.zeros_like(p)
                for i in range(k):
                    if x[i] != 0.0:
                        s = s.add(vecs[i][u][j], alpha=x[i])
                row.append(s)
            steps.append(row)
        nu = 1.0
        kappa = self.config["kl_clip"]
        if kappa is not None:
            if uniform:
                fdf = lrs[0] ** 2 * sum(x[i] * Kl[i][j] * x[j] for i in range(k) for j in range(k))
            else:
                scaled = {p: t * lr for (unit, _, _), row, lr in zip(dirs, steps, lrs) for p, t in zip(unit.params, row)}
                fdf = float(self.quadratic.gram([scaled])[0, 0])
            nu = min(1.0, math.sqrt(kappa / fdf)) if fdf > 0 else 1.0
        self.last = {"alpha": x[0], "mu": x[1] if k > 1 else 0.0, "fallback": fallback, "nu": nu, "A": A, "b": bl,
                     "model_change": model_change(A, bl, x, lrs[0] * nu) if uniform else None,
                     "scale": lrs[0] * nu if uniform else None}
        self.predicted_change = self.last["model_change"]
        for (unit, _, _), row, lr in zip(dirs, steps, lrs):
            for p, s in zip(unit.params, row):
                delta = s * (lr * nu)
                plan.updates.append((p, delta))
                plan.state.append((p, KEY, delta))
        return plan
