"""Levenberg-Marquardt adaptation of the damping (Martens & Grosse, ICML 2015, section 6.5; ALGORITHMS.md
section 10, eqs. Q.2-Q.3), for every estimator with ``solve`` and every rule.

``damping_adapt="lm"`` turns it on (default ``None``: fixed damping). Every ``damping_interval`` steps ``T1``
(steps ``t % T1 == 0``, the first step included), after the update ``delta`` is applied::

    (Q.2) rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0))
    (Q.3) rho > 3/4: lambda <- omega lambda;   rho < 1/4: lambda <- lambda / omega;   then clamp to
          [damping_min, damping_max]          (omega = damping_omega, default (19/20)^T1)

* ``h`` is the user's mean loss on the step's batch, plus ``eta/2 |theta|^2`` for a coupled weight decay (so
  ``h(theta + delta) - h(theta)`` gains ``eta (theta^T delta + |delta|^2 / 2)``); ``h(theta)`` is the value the
  closure returned at the start of ``step(closure)``, ``h(theta + delta)`` the value of ONE more call of the
  closure after the update, inside :func:`curvlab.capture.paused` (nothing is captured or recorded). That call
  runs the user's closure as written: usually ``zero_grad``, a forward and a backward, so on adaptation steps
  ``.grad`` holds the gradient of the batch at the NEW parameters when ``step`` returns (a closure that does not
  zero the gradients leaves the sum of both backward passes), and ``step`` still returns ``h(theta)``.
* ``M(delta) - M(0)`` (Q.1) uses the exact curvature of the batch (:class:`curvlab.quadratic.QuadraticModel`)
  and ``c_u = lambda_u + eta_u`` (``eta_u`` only with coupled weight decay); ``rule="qmodel"`` hands over its own
  value (no extra pass), other rules cost one forward-mode pass along the final update.
* ``lambda`` is the ``damping`` of every param group, updated in place (all groups by the same factor, each
  clamped), so ``param_groups``, ``state_dict()`` and schedulers see it. The curvature uses the new value from its
  next refresh (``inv_interval``), the quadratic model at once. ``opt.damping_history`` gets one entry per
  adaptation step (``step``, ``rho``, ``damping``, ``damping_before``, ``h_before``, ``h_after``, ``predicted``)
  and is saved in the checkpoint.
* Guards (each an ``opt.events`` entry): a model that predicts no decrease (``M(delta) - M(0) >= 0``, e.g. a
  zero gradient) gives ``rho = nan`` and leaves lambda unchanged; a non-finite ``h(theta + delta)`` gives
  ``rho = -inf`` (lambda increases).
* ``step()`` without a closure on an adaptation step raises ``ValueError`` naming ``damping_adapt``. Data
  parallel: both losses are averaged over the ranks (DDP's gradient convention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .capture import paused
from .hyper import HyperParameterError
from .linalg import NumericsEvent
from .quadratic import QuadraticModel
from .units import inner

CLOSURE_LOOP = """    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)"""


@dataclass
class Pending:
    """What an adaptation step knows before the update is applied."""

    step: int
    predicted: float            # M(delta) - M(0), eq. Q.1
    l2: float                   # eta (theta^T delta + |delta|^2 / 2): the coupled weight decay's share of h


class LevenbergMarquardt:
    """The LM rule (Q.2-Q.3) of one :class:`curvlab.optim.CurvlabOptimizer` (see the module doc)."""

    def __init__(self, optimizer) -> None:
        cfg = optimizer.config
        self.opt = optimizer
        self.interval = cfg["damping_interval"]
        self.omega = cfg["damping_omega"] if cfg["damping_omega"] is not None else (19 / 20) ** self.interval
        self.low, self.high = cfg["damping_min"], cfg["damping_max"]
        self.rho_low, self.rho_high = cfg["damping_thresholds"]
        if self.low > self.high:
            raise HyperParameterError(f"damping_min ({self.low}) must not exceed damping_max ({self.high})")
        if "solve" not in optimizer.estimator.provides:
            raise ValueError(f"damping_adapt needs an estimator with `solve`; {optimizer.names['estimator']!r} "
                             "has none")
        self.history: list[dict[str, Any]] = optimizer.damping_history

    def due(self, t: int) -> bool:
        return t % self.interval == 0

    def check_closure(self, closure: Callable | None, t: int) -> None:
        if closure is None and self.due(t):
            raise ValueError(
                f"damping_adapt={self.opt.config['damping_adapt']!r} needs h(theta + delta) on adaptation steps (every "
                f"damping_interval={self.interval} steps, this is step {t}): call opt.step(closure) with a closure "
                f"that re-evaluates the loss, the standard PyTorch loop:\n{CLOSURE_LOOP}\n"
                "or pass damping_adapt=None for fixed damping")

    def _coupled(self) -> bool:
        return self.opt.rule.config.get("weight_decay_style", "coupled") == "coupled"

    def predict(self, plan) -> Pending:
        """Before the update: ``M(delta) - M(0)`` of the plan's updates (Q.1) and the weight-decay term of h."""
        opt = self.opt
        coupled = self._coupled()
        updates = dict(plan.deltas())
        l2 = 0.0
        lin = quad = 0.0
        given = getattr(opt.rule, "predicted_change", None)
        for unit in opt.units:
            ds = [updates.get(p) for p in unit.params]
            if all(d is None for d in ds):
                continue
            ds = [torch.zeros_like(p) if d is None else d for p, d in zip(unit.params, ds)]
            eta = unit.hyper("weight_decay") if coupled else 0.0
            if eta:
                l2 += eta * float(inner(list(unit.params), ds) + 0.5 * inner(ds, ds))
            if given is None:
                grads = unit.grads() or [torch.zeros_like(p) for p in unit.params]
                lin += float(inner(grads, ds)) + (eta * float(inner(list(unit.params), ds)) if eta else 0.0)
                quad += (unit.hyper("damping") + eta) * float(inner(ds, ds))
        if given is None:
            fdf = float(opt.quadratic.gram([updates])[0, 0]) if updates else 0.0
            given = lin + 0.5 * (fdf + quad)
        return Pending(opt.step_count, given, l2)

    def adapt(self, pending: Pending, closure: Callable, h_before: Any) -> None:
        """After the update: one closure call (paused), rho (Q.2) and the damping update (Q.3)."""
        opt = self.opt
        if h_before is None:
            raise ValueError("damping_adapt: the closure passed to step() must return the loss")
        with paused(), torch.enable_grad():
            h_after = closure()
        losses = torch.tensor([float(h_before), float(h_after)], dtype=torch.float64)
        if opt.dist.active:
            buf = losses.to(opt.dist.device)
            opt.dist._all_reduce(buf, "damping")
            losses = buf.cpu() / opt.dist.world
        h0, h1 = losses.tolist()
        h1_total = h1 + pending.l2
        if not (math.isfinite(pending.predicted) and pending.predicted < 0):
            rho = math.nan
            opt.events.append(NumericsEvent("damping", f"step {pending.step}: the quadratic model predicts no decrease "
                                                       f"(M(delta) - M(0) = {pending.predicted:.3g}); damping unchanged"))
        elif not math.isfinite(h1_total):
            rho = -math.inf
            opt.events.append(NumericsEvent("damping", f"step {pending.step}: non-finite loss after the update; "
                                                       "damping increased"))
        else:
            rho = (h1_total - h0) / pending.predicted
        factor = self.omega if rho > self.rho_high else 1.0 / self.omega if rho < self.rho_low else 1.0
        before = [g["damping"] for g in opt.param_groups]
        for group in opt.param_groups:
            value = group["damping"] * factor if factor != 1.0 else group["damping"]
            group["damping"] = min(max(value, self.low), self.high)
        self.history.append({"step": pending.step, "rho": rho, "damping": opt.param_groups[0]["damping"],
                             "damping_before": before[0], "h_before": h0, "h_after": h1, "predicted": pending.predicted,
                             **({"damping_groups": [g["damping"] for g in opt.param_groups]}
                                if len(opt.param_groups) > 1 else {})})


def attach_adaptive(optimizer) -> None:
    """Give ``optimizer`` its ``lm`` (:class:`LevenbergMarquardt` or None), ``damping_history`` and ``quadratic``
    (a :class:`curvlab.quadratic.QuadraticModel` when the rule declares ``quadratic_model = True`` or the damping
    adapts; recording on every step for the rule, on adaptation steps only for the damping; cleared after every
    ``step()`` by a step post-hook)."""
    optimizer.damping_history = []
    optimizer.lm = lm = LevenbergMarquardt(optimizer) if optimizer.config["damping_adapt"] else None
    wants = bool(getattr(optimizer.rule, "quadratic_model", False))
    optimizer.quadratic = None
    if wants or lm is not None:
        optimizer.quadratic = QuadraticModel(
            optimizer.model, optimizer.config["loss"], [p for u in optimizer.units for p in u.params],
            dist=optimizer.dist, active=lambda: wants or lm.due(optimizer.step_count))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: opt.quadratic.clear())
