"""Greedy adaptation of the curvature's own damping gamma (Martens & Grosse, ICML 2015, section 6.6; ALGORITHMS.md
section 10), for every estimator whose damping enters ``solve``.

Martens & Grosse keep two dampings: ``lambda`` in the quadratic model ``M`` (eq. Q.1, adapted by the LM rule of
sec. 6.5, :mod:`curvlab.damping`) and the factor damping ``gamma`` of the approximate curvature ``C_gamma`` that
gives the proposal ``Delta = -C_gamma^-1 g``. ``gamma_adapt=True`` separates them in curvlab: every param group
gets a ``"gamma"`` entry (initially its ``damping``), the curvature's ``refresh`` / ``solve`` use ``gamma`` (times
the parameterization's damping multiplier, like ``damping``), and ``damping`` stays ``lambda``: the quadratic model's
(the ``qmodel`` rule's ``c = lambda + eta``, the LM rule's ``M``). Every ``gamma_interval`` steps ``T2`` (steps
``t % T2 == 0``, the first included), before the update::

    for gamma' in (omega2 gamma, gamma / omega2, gamma):  refresh the curvature with gamma', plan the rule's update
                                                          delta(gamma') and evaluate M(delta(gamma')) - M(0)  (Q.1)
    gamma <- the gamma' with the lowest M (ties keep gamma), clamped to [damping_min, damping_max];
    the step applies delta(gamma)                          (omega2 = gamma_omega, default sqrt(19/20)^T2)

``M`` is that of :mod:`curvlab.damping` (the exact curvature of the step's batch, ``lambda`` the group's
``damping``, a coupled weight decay included); with ``rule="qmodel"`` it is the rule's own value for its
model-optimized ``(alpha, mu)`` step (the paper's setting, sec. 7), for the other rules that of the rule's update as
planned (e.g. ``-lr C_gamma^-1 g`` plus momentum). All groups move by the same factor.

Cost, on a gamma step: three curvature refreshes (a fourth when a new gamma wins: the curvature must end refreshed
with it) instead of at most one, all on the step's statistics, three rule plans, and the model's products -- for
``qmodel`` its own forward-mode pass per plan, else ONE batched forward-mode pass for the three updates
(:meth:`curvlab.quadratic.QuadraticModel.gram`). Amortized over ``T2`` steps that is ``~3 / T2`` of a refresh-step's
factorization cost plus ``~1.5 / T2`` forward+backward passes per step (measured: README, ``curvlab bench --variant
gamma``). A refresh re-factorizes: K-FAC's default ``damping_style="pi"`` inverts the damped factors (no cached
eigendecomposition to reuse), Shampoo recomputes its roots, MBF its block inverses.

``gamma_score`` says what scores the candidates. ``"model"`` (default) is the paper's ``M(delta(gamma')) - M(0)``
above, on the step's own batch. ``"next"`` scores them by the loss of the NEXT step's batch ``B'`` at the three
candidate points, a held-out, paired comparison::

    gamma <- argmin over gamma' of h_B'(theta + delta(gamma'))       (ties keep gamma)

On the gamma step the three plans are made as above, but the step applies the current gamma's ``delta(gamma)`` (the
winner is not known yet) and keeps ``delta(gamma') - delta(gamma)`` of the other two (two parameter-sized
tensors each; saved in the checkpoint). The next step's ordinary closure call gives ``h_B'(theta + delta(gamma))``;
two more closure calls (:func:`curvlab.damping.losses_at`: paused, parameters and ``.grad`` restored bit for bit,
that step's records kept) give the other two; the winner becomes every group's ``gamma`` and the curvature is
refreshed with it before that step plans. ``M`` is not needed (no forward-mode pass; with ``rule="qmodel"`` the rule
still uses its own). Why: on the step's own batch the exact model prefers whichever gamma gives the longer step that
it predicts well, which is not the damping that suits the approximate curvature on other data (analysis/README.md,
"Adaptive damping"); a paired comparison on a held-out batch measures that directly, at two extra forward+backward
passes per gamma step. Measured (analysis/README.md): it does not make the adaptive runs reach the best fixed
damping's loss either -- the choice is a noisy random walk and one step's held-out loss is biased (more damping
for Shampoo, less for MBF: a short-horizon bias); it helps K-FAC from a too-large start. It needs
``step(closure)`` on the step after each gamma step (``ValueError`` naming ``gamma_score`` otherwise). History entries add ``losses`` (the three held-out losses, ``ORDER``) and ``measured_at``.

Not supported (``ValueError`` at construction): estimators whose ``solve`` ignores the damping (``identity``) or
uses it inside the backward pass (``isaac_fused=True``), and estimators without ``solve``. ``opt.gamma_history``
gets one entry per gamma step (``step``, ``gamma``, ``gamma_before``, ``candidates``, ``changes``: the three
``M - M(0)``) and is saved in the checkpoint; the group's ``gamma`` is part of ``param_groups`` (and
``state_dict()``). A candidate whose update or model value is not finite scores ``+inf``.
"""
from __future__ import annotations

import math
from typing import Any

from .damping import CLOSURE_LOOP, losses_at, predicted_changes, rank_mean
from .hyper import HyperParameterError
from .kernels import all_finite

#: the order the candidates are evaluated in (the current gamma last: when it wins, no extra refresh)
ORDER = ("down", "up", "keep")


class FactorDamping:
    """The greedy gamma rule (module doc) of one :class:`curvlab.optim.CurvlabOptimizer`."""

    def __init__(self, optimizer) -> None:
        cfg = optimizer.config
        self.opt = optimizer
        self.interval = cfg["gamma_interval"]
        self.omega = cfg["gamma_omega"] if cfg["gamma_omega"] is not None else math.sqrt(19 / 20) ** self.interval
        self.low, self.high = cfg["damping_min"], cfg["damping_max"]
        name = optimizer.names["estimator"]
        if "solve" not in optimizer.estimator.provides:
            raise ValueError(f"gamma_adapt needs an estimator with `solve`; {name!r} has none")
        if not getattr(optimizer.estimator, "damped_solve", True):
            raise ValueError(f"gamma_adapt: the {name!r} estimator's solve ignores the damping, so there is no "
                             "curvature damping to adapt; pass gamma_adapt=False")
        if cfg.get("isaac_fused"):
            raise ValueError("gamma_adapt: isaac_fused=True applies the damping inside the backward pass, so the step "
                             "cannot be re-solved with other dampings; pass isaac_fused=False or gamma_adapt=False")
        if self.low > self.high:
            raise HyperParameterError(f"damping_min ({self.low}) must not exceed damping_max ({self.high})")
        for group in optimizer.param_groups:
            group.setdefault("gamma", group["damping"])
        self.history: list[dict[str, Any]] = optimizer.gamma_history
        self.held_out = cfg["gamma_score"] == "next"
        self.proposed: dict[str, Any] | None = None    # gamma_score="next": made by choose(), kept once applied
        self.pending: dict[str, Any] | None = None     # ... awaiting the next step's batch

    @property
    def needs_model(self) -> bool:
        """Whether gamma steps evaluate the quadratic model ``M`` (``gamma_score="model"``)."""
        return not self.held_out

    def check_closure(self, closure, t: int) -> None:
        if closure is None and self.pending is not None:
            raise ValueError(
                f"gamma_score='next' scores the gamma candidates of step {self.pending['step']} on the batch of the "
                f"next step (this is step {t}): call opt.step(closure) with a closure that re-evaluates the loss, the "
                f"standard PyTorch loop:\n{CLOSURE_LOOP}\nor pass gamma_score='model'")

    def due(self, t: int) -> bool:
        return t % self.interval == 0

    def _clamp(self, value: float) -> float:
        return min(max(value, self.low), self.high)

    def choose(self, stats) -> Any:
        """Evaluate the three candidates (module doc), leave the curvature refreshed with the winner, set every
        group's ``gamma`` and return the winner's plan."""
        opt, rule = self.opt, self.opt.rule
        groups = opt.param_groups
        for group in groups:                          # a group added after construction
            group.setdefault("gamma", group["damping"])
        base = [g["gamma"] for g in groups]
        factors = {"down": self.omega, "up": 1.0 / self.omega, "keep": 1.0}
        plans, kept = [], []
        for key in ORDER:
            for group, b in zip(groups, base):
                group["gamma"] = self._clamp(b * factors[key])
            opt.refresh(force=True)
            plans.append(rule.plan(opt.units, opt.state, stats))
            kept.append({a: getattr(rule, a) for a in ("last", "predicted_change") if hasattr(rule, a)})
        if self.held_out:
            return self._propose(plans, base, factors)
        changes = [k.get("predicted_change") for k in kept]       # qmodel's own M of its (alpha, mu) step
        if any(c is None for c in changes):
            changes = [c for c, _ in predicted_changes(opt, plans)]
        scores = [c if c is not None and math.isfinite(c) and all_finite(p.tensors()) else math.inf
                  for c, p in zip(changes, plans)]
        best = len(ORDER) - 1                         # ties keep the current gamma
        for i in range(len(ORDER) - 1):
            if scores[i] < scores[best]:
                best = i
        for group, b in zip(groups, base):
            group["gamma"] = self._clamp(b * factors[ORDER[best]])
        if best != len(ORDER) - 1:
            opt.refresh(force=True)
            for attr, value in kept[best].items():
                setattr(rule, attr, value)
        self.history.append({"step": opt.step_count, "gamma": groups[0]["gamma"], "gamma_before": base[0],
                             "candidates": [self._clamp(base[0] * factors[k]) for k in ORDER],
                             "changes": [c if c is not None else math.nan for c in changes], "choice": ORDER[best]})
        return plans[best]

    # -- gamma_score="next" ------------------------------------------------------------------------------------
    def _propose(self, plans, base: list[float], factors: dict[str, float]):
        """Keep the other candidates' offsets ``delta(gamma') - delta(gamma)``; the current gamma's plan is applied
        (the curvature is already refreshed with it: "keep" was evaluated last)."""
        keep = dict(plans[-1].deltas())
        offsets = []
        for plan in plans[:-1]:
            mine = dict(plan.deltas())
            finite = all_finite(plan.tensors())
            offsets.append({p: mine.get(p, 0.0) - keep.get(p, 0.0) for p in mine.keys() | keep.keys()}
                           if finite else None)       # a parameter only one plan moves: 0 on the other side
        self.proposed = {"step": self.opt.step_count, "base": base,
                         "candidates": [[self._clamp(b * factors[k]) for b in base] for k in ORDER],
                         "offsets": offsets}
        return plans[-1]

    def commit(self) -> None:
        """After the step applied the current gamma's plan: its proposal waits for the next batch."""
        self.pending, self.proposed = self.proposed, None

    def resolve(self, closure, h_keep) -> None:
        """``gamma_score="next"``, at the start of the step after a gamma step, once its closure returned
        ``h_keep = h_B'(theta + delta(gamma))``: the other candidates' losses (two closure calls), the choice, and a
        refresh with the winner."""
        if self.pending is None:
            return
        if h_keep is None:
            raise ValueError("gamma_score='next': the closure passed to step() must return the loss")
        pending, self.pending = self.pending, None
        opt = self.opt
        scored = [i for i, off in enumerate(pending["offsets"]) if off is not None]
        points = [{p: p.detach() + d for p, d in pending["offsets"][i].items()} for i in scored]
        found = dict(zip(scored, losses_at(opt, closure, points)))
        values = rank_mean(opt, [found.get(i, math.inf) for i in range(len(ORDER) - 1)] + [h_keep])
        losses = [v if math.isfinite(v) else math.inf for v in values]
        best = len(ORDER) - 1                         # ties keep the current gamma
        for i in range(len(ORDER) - 1):
            if losses[i] < losses[best]:
                best = i
        chosen = pending["candidates"][best]
        for group, value in zip(opt.param_groups, chosen):
            group["gamma"] = value
        if best != len(ORDER) - 1:
            opt.refresh_next = True                   # this step refreshes with the winner before it plans
        self.history.append({"step": pending["step"], "gamma": chosen[0], "gamma_before": pending["base"][0],
                             "candidates": [c[0] for c in pending["candidates"]], "losses": losses,
                             "choice": ORDER[best], "measured_at": opt.step_count})

    def state_dict(self) -> dict[str, Any] | None:
        """The pending proposal of ``gamma_score="next"`` (offsets by parameter index; None when there is none)."""
        if self.pending is None:
            return None
        index = {p: i for i, p in enumerate(self.opt.flat_params())}
        return {**{k: v for k, v in self.pending.items() if k != "offsets"},
                "offsets": [None if off is None else {index[p]: d.clone() for p, d in off.items()}
                            for off in self.pending["offsets"]]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.proposed = None
        if state is None or not self.held_out:
            self.pending = None
            return
        params = self.opt.flat_params()
        self.pending = {**{k: v for k, v in state.items() if k != "offsets"},
                        "offsets": [None if off is None else {params[int(i)]: d.detach().clone().to(params[int(i)])
                                                              for i, d in off.items()} for off in state["offsets"]]}
