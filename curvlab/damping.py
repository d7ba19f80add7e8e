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
  next refresh (``inv_interval``; with ``damping_refresh=True`` at the next step whenever the damping moved, one
  extra refresh per move), the quadratic model at once. With ``gamma_adapt=True`` (:mod:`curvlab.factor_damping`)
  the curvature uses its own damping gamma and lambda is the quadratic model's only. ``opt.damping_history`` gets
  one entry per adaptation step (``step``, ``rho``, ``damping``, ``damping_before``, ``h_before``, ``h_after``,
  ``predicted``) and is saved in the checkpoint.
* Guards (each an ``opt.events`` entry): a model that predicts no decrease (``M(delta) - M(0) >= 0``, e.g. a
  zero gradient) gives ``rho = nan`` and leaves lambda unchanged; a non-finite ``h(theta + delta)`` gives
  ``rho = -inf`` (lambda increases).
* ``step()`` without a closure on an adaptation step raises ``ValueError`` naming ``damping_adapt``. Data
  parallel: both losses are averaged over the ranks (DDP's gradient convention).

``damping_rho`` says which batch measures the actual change in (Q.2). ``"same"`` (default): the step's own batch
``B``, as above. Its exact quadratic model predicts that batch's change well, so rho stays near 1 even when the
step overfits ``B``. ``"next"``: a held-out ratio::

    rho = (h_B'(theta + delta) - h_B'(theta)) / (M_B(delta) - M_B(0))

with ``M_B`` still that of the adaptation step t's batch ``B`` and ``B'`` the batch of step t + 1. Step t keeps its
pending record (the predicted change, the weight-decay term and the parameters ``theta`` before its update; saved
in the checkpoint). Step t + 1's ordinary first closure call gives ``h_B'(theta + delta)``; one extra closure call
with the updated parameters temporarily set back to ``theta`` (paused; ``.grad`` saved and restored, the captured
statistics and quadratic-model records of the first call kept) gives ``h_B'(theta)``. Then the LM rule (Q.3)
updates lambda before step t + 1 refreshes or plans, so step t + 1 uses it (as with ``"same"``, where the
value from step t reaches step t + 1). Same cost: one extra closure call per adaptation. Step t + 1 then returns
the loss, ``.grad`` and parameters it would return without the extra call, for the damping it now has (the
extra call draws random numbers, e.g. dropout, like the ``"same"`` call does). The closure is needed on the step
after each adaptation step (``ValueError`` naming ``damping_rho`` otherwise), not on the adaptation step itself;
the history entry's ``measured_at`` is that step.
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
    theta: dict[int, torch.Tensor] | None = None    # damping_rho="next": parameters before the update (by index)


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
        self.held_out = cfg["damping_rho"] == "next"
        self.pending: Pending | None = None          # damping_rho="next": awaiting the next step's batch

    def due(self, t: int) -> bool:
        return t % self.interval == 0

    def check_closure(self, closure: Callable | None, t: int) -> None:
        if closure is None and self.pending is not None:
            raise ValueError(
                f"damping_adapt={self.opt.config['damping_adapt']!r} with damping_rho='next' measures rho on the batch "
                f"of the step after each adaptation step (this is step {t}, after adaptation step "
                f"{self.pending.step}): call opt.step(closure) with a closure that re-evaluates the loss, the "
                f"standard PyTorch loop:\n{CLOSURE_LOOP}\nor pass damping_rho='same' (rho on the step's own batch)")
        if closure is None and self.due(t) and not self.held_out:
            raise ValueError(
                f"damping_adapt={self.opt.config['damping_adapt']!r} needs h(theta + delta) on adaptation steps (every "
                f"damping_interval={self.interval} steps, this is step {t}): call opt.step(closure) with a closure "
                f"that re-evaluates the loss, the standard PyTorch loop:\n{CLOSURE_LOOP}\n"
                "or pass damping_adapt=None for fixed damping")

    def _coupled(self) -> bool:
        return self.opt.rule.config.get("weight_decay_style", "coupled") == "coupled"

    def predict(self, plan) -> Pending:
        """Before the update: ``M(delta) - M(0)`` of the plan's updates (Q.1) and the weight-decay term of h."""
        given = getattr(self.opt.rule, "predicted_change", None)       # qmodel's own value: no extra pass
        (change, l2), = predicted_changes(self.opt, [plan], curvature=given is None)
        theta = None
        if self.held_out:                                # the point the next batch is compared at
            index = {p: i for i, p in enumerate(self.opt.flat_params())}
            theta = {index[p]: p.detach().clone() for p in plan.params()}
        return Pending(self.opt.step_count, given if given is not None else change, l2, theta)

    def after_update(self, pending: Pending, closure: Callable, h_before: Any) -> None:
        """End of an adaptation step: ``"same"`` adapts now (:meth:`adapt`), ``"next"`` keeps the record."""
        if self.held_out:
            self.pending = pending
        else:
            self.adapt(pending, closure, h_before)

    def adapt(self, pending: Pending, closure: Callable, h_before: Any) -> None:
        """After the update: one closure call (paused), rho (Q.2) and the damping update (Q.3)."""
        if h_before is None:
            raise ValueError("damping_adapt: the closure passed to step() must return the loss")
        with paused(), torch.enable_grad():
            h_after = closure()
        self._update(pending, h_before, h_after)

    def resolve(self, closure: Callable, h_after: Any) -> None:
        """``damping_rho="next"``, at the start of the step after an adaptation step, once its closure returned
        ``h_after = h_B'(theta + delta)``: ``h_B'(theta)`` from one closure call at the saved ``theta`` (paused,
        parameters and ``.grad`` restored bit for bit, the step's records kept), rho and the damping update."""
        if self.pending is None:
            return
        if h_after is None:
            raise ValueError("damping_adapt: the closure passed to step() must return the loss")
        pending, self.pending = self.pending, None
        opt = self.opt
        params = opt.flat_params()
        h_before, = losses_at(opt, closure, [{params[i]: theta for i, theta in pending.theta.items()}])
        self._update(pending, h_before, h_after, measured_at=opt.step_count)

    def _update(self, pending: Pending, h_before: Any, h_after: Any, measured_at: int | None = None) -> None:
        """rho (Q.2) from the two losses (averaged over the ranks) and the damping update (Q.3)."""
        opt = self.opt
        h0, h1 = rank_mean(opt, [h_before, h_after])
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
        if factor != 1.0 and opt.config["damping_refresh"] and opt.gamma is None:
            opt.refresh_next = True                   # the curvature sees the new damping at the next step
        before = [g["damping"] for g in opt.param_groups]
        for group in opt.param_groups:
            value = group["damping"] * factor if factor != 1.0 else group["damping"]
            group["damping"] = min(max(value, self.low), self.high)
        self.history.append({"step": pending.step, "rho": rho, "damping": opt.param_groups[0]["damping"],
                             "damping_before": before[0], "h_before": h0, "h_after": h1, "predicted": pending.predicted,
                             **({"measured_at": measured_at} if measured_at is not None else {}),
                             **({"damping_groups": [g["damping"] for g in opt.param_groups]}
                                if len(opt.param_groups) > 1 else {})})

    def state_dict(self) -> dict[str, Any] | None:
        """The pending record of ``damping_rho="next"`` (None when there is none)."""
        p = self.pending
        return None if p is None else {"step": p.step, "predicted": p.predicted, "l2": p.l2,
                                       "theta": {i: t.clone() for i, t in p.theta.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.pending = None if state is None or not self.held_out else Pending(      # "same" has no use for it
            state["step"], state["predicted"], state["l2"],
            {int(i): t.detach().clone().to(self.opt.flat_params()[int(i)]) for i, t in state["theta"].items()})


def rank_mean(opt, values: list[Any]) -> list[float]:
    """``values`` (losses) as floats, averaged over the data-parallel ranks (DDP's gradient convention)."""
    losses = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if opt.dist.active:
        buf = losses.to(opt.dist.device)
        opt.dist._all_reduce(buf, "damping")
        losses = buf.cpu() / opt.dist.world
    return losses.tolist()


def losses_at(opt, closure: Callable, points: list[dict[torch.Tensor, torch.Tensor]]) -> list[Any]:
    """The closure's loss at each of ``points`` (``{param: value}``; parameters not named keep their value), one
    closure call per point inside :func:`curvlab.capture.paused`; the parameters and every ``.grad`` are restored bit
    for bit afterwards and the records the step's own closure call made (captured statistics, quadratic-model
    records) are kept (the closure's ``zero_grad`` discards nothing while paused). Used for the held-out evaluations
    on the step after an adaptation step (``damping_rho="next"``, ``gamma_score="next"``)."""
    params = opt.flat_params()
    moved = list({p for point in points for p in point})
    here = [p.detach().clone() for p in moved]
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]
    losses = []
    try:
        for point in points:
            with torch.no_grad():
                for p, value in zip(moved, here):
                    p.copy_(point.get(p, value))
            with paused(), torch.enable_grad():
                losses.append(closure())
    finally:
        with torch.no_grad():
            for p, value in zip(moved, here):
                p.copy_(value)
            for p, g in grads:
                p.grad = g
    return losses


def predicted_changes(opt, plans, curvature: bool = True) -> list[tuple[float, float]]:
    """``[(M(delta) - M(0), l2)]`` per plan (eq. Q.1 for the plan's updates ``delta``, ``c_u = lambda_u + eta_u``)
    and the coupled weight decay's share of ``h(theta + delta) - h(theta)``, ``eta (theta^T delta + |delta|^2/2)``.
    The curvature terms ``delta^T F delta`` of all plans come from ONE batched forward-mode pass
    (:meth:`curvlab.quadratic.QuadraticModel.gram`); ``curvature=False`` skips it (the changes are then NaN)."""
    coupled = opt.rule.config.get("weight_decay_style", "coupled") == "coupled"
    maps = [dict(plan.deltas()) for plan in plans]
    partial = []
    for updates in maps:
        l2 = lin = quad = 0.0
        for unit in opt.units:
            ds = [updates.get(p) for p in unit.params]
            if all(d is None for d in ds):
                continue
            ds = [torch.zeros_like(p) if d is None else d for p, d in zip(unit.params, ds)]
            eta = unit.hyper("weight_decay") if coupled else 0.0
            if eta:
                l2 += eta * float(inner(list(unit.params), ds) + 0.5 * inner(ds, ds))
            grads = unit.grads() or [torch.zeros_like(p) for p in unit.params]
            lin += float(inner(grads, ds)) + (eta * float(inner(list(unit.params), ds)) if eta else 0.0)
            quad += (unit.hyper("damping") + eta) * float(inner(ds, ds))
        partial.append((lin, quad, l2))
    if not curvature:
        return [(math.nan, l2) for _, _, l2 in partial]
    moving = [i for i, updates in enumerate(maps) if updates]
    fdf = opt.quadratic.gram([maps[i] for i in moving]).diagonal().tolist() if moving else []
    curv = dict(zip(moving, fdf))
    return [(lin + 0.5 * (curv.get(i, 0.0) + quad), l2) for i, (lin, quad, l2) in enumerate(partial)]


def attach_adaptive(optimizer) -> None:
    """Give ``optimizer`` its ``lm`` (:class:`LevenbergMarquardt` or None), ``gamma``
    (:class:`curvlab.factor_damping.FactorDamping` or None), ``damping_history``, ``gamma_history`` and ``quadratic``
    (a :class:`curvlab.quadratic.QuadraticModel` when the rule declares ``quadratic_model = True`` or a damping
    adapts; recording on every step for the rule, on adaptation steps only for the dampings; cleared after every
    ``step()`` by a step post-hook)."""
    from .factor_damping import FactorDamping

    optimizer.damping_history, optimizer.gamma_history = [], []
    optimizer.lm = lm = LevenbergMarquardt(optimizer) if optimizer.config["damping_adapt"] else None
    optimizer.gamma = gamma = FactorDamping(optimizer) if optimizer.config["gamma_adapt"] else None
    wants = bool(getattr(optimizer.rule, "quadratic_model", False))
    gamma_model = gamma is not None and gamma.needs_model
    optimizer.quadratic = None
    if wants or lm is not None or gamma_model:
        t = lambda: optimizer.step_count  # noqa: E731
        optimizer.quadratic = QuadraticModel(
            optimizer.model, optimizer.config["loss"], [p for u in optimizer.units for p in u.params],
            dist=optimizer.dist,
            active=lambda: wants or (lm is not None and lm.due(t())) or (gamma_model and gamma.due(t())))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: opt.quadratic.clear())
