"""``curvlab.optimizer``: any (estimator, rule, scaling) triple as a real ``torch.optim.Optimizer``.

One step (``opt.step()`` after the user's ``loss.backward()``), at step counter ``t``:

1. gradients are checked for NaN/Inf (``nonfinite="skip"``: the step is skipped and logged; ``"raise"``);
2. on statistics steps (``t % stat_interval == 0``) every layer's captured records become statistics,
   which are checked for NaN/Inf for ALL layers before any curvature state changes, then EMA-folded;
3. on refresh steps (``t % inv_interval == 0``, or when a layer's curvature is not ready yet) inverses
   are recomputed with the current per-group ``damping`` (times the parameterization's multiplier);
4. the rule returns a plan of updates, which is checked for NaN/Inf before anything is written;
5. with ``damping_adapt="lm"``, every ``damping_interval`` steps the closure of ``step(closure)`` is called once more
   after the update (paused) and every group's damping is adapted from the reduction ratio (:mod:`curvlab.damping`;
   with ``damping_rho="next"`` that call comes at the start of the next step, at the old parameters, on its batch);
   with ``gamma_adapt=True`` the curvature uses its own damping gamma, chosen every ``gamma_interval`` steps in
   step 4 among three candidates by the quadratic model (:mod:`curvlab.factor_damping`).

Skipped steps do not advance ``t``, and neither does a ``step()`` without any gradient; ``max_skipped_steps``
skips in a row, or a NaN/Inf loss from ``step(closure)``, raise :class:`curvlab.Diverged` (:mod:`curvlab.divergence`).
Parameters that no layer adapter claims get the first-order fallback (their direction is their gradient, with the
same lr, momentum and weight decay); ``strict=True`` raises instead. ``coverage()`` says which parameter got what.
Statistics follow the capture contract of :mod:`curvlab.capture` (training passes only). A preconditioned
layer that gets gradients but whose forward curvlab never saw in a training pass (used through its weight,
called outside the model's forward) takes a first-order step while it has no curvature, with one
:class:`CaptureWarning` (``strict=True`` raises). Per-group hyper-parameters are validated at every step, so
values set later through ``param_groups`` or a scheduler get the construction-time messages.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import estimators as _estimators  # noqa: F401  (register built-ins)
from . import rules as _rules  # noqa: F401
from . import scalings as _scalings  # noqa: F401
from .adapters import UnsupportedLayer, find_adapter
from .capture import HookCapture, is_paused
from .checkpoint import check_entry, curvlab_entry, restore_entry
from .damping import attach_adaptive
from .distributed import DataParallel
from .divergence import SkipStreak, check_closure_loss, nonfinite_units
from .hyper import COMMON, declared_defaults, merge_options, resolve
from .kernels import all_finite as _finite
from .linalg import NumericsEvent
from .profiling import Sections, activated, section
from .registry import ESTIMATORS, RULES, SCALINGS
from .stats import LayerStats
from .step_guards import CaptureWarning, check_groups, check_loss, first_order_where_uncaptured
from .units import Unit


class CurvlabOptimizer(torch.optim.Optimizer):
    """A composed second-order optimizer. Build it with :func:`curvlab.optimizer`."""

    def __init__(self, model: nn.Module, estimator: str = "kfac", rule: str = "natural",
                 scaling: str = "standard", *, strict: bool = False, seed: int = 0, **hyper: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        est_cls, rule_cls, scaling_cls = ESTIMATORS.get(estimator), RULES.get(rule), SCALINGS.get(scaling)
        options = merge_options(COMMON, est_cls.options, rule_cls.options, scaling_cls.options)
        declared = declared_defaults(est_cls, rule_cls, scaling_cls, resolve(hyper, options))
        unknown = sorted(set(declared) - set(options))
        if unknown:
            raise TypeError(f"the defaults declared by estimator {estimator!r}, rule {rule!r} or scaling {scaling!r} "
                            f"name unknown options {unknown}; fix the component's defaults table")
        #: what the components set for options you did not pass (README "Defaults"; :mod:`curvlab.hyper`)
        self.component_defaults = {k: v for k, v in declared.items() if k not in hyper}
        self.config = resolve({**self.component_defaults, **hyper}, options)
        if self.config["fisher"] not in est_cls.fisher_types:
            raise ValueError(f"estimator {estimator!r} supports fisher in {est_cls.fisher_types}, "
                             f"got fisher={self.config['fisher']!r}")
        self.names = {"estimator": est_cls.registry_name, "rule": rule_cls.registry_name,
                      "scaling": scaling_cls.registry_name}
        self.dist = DataParallel(model, self.config)      # DDP / process group / none (curvlab.distributed)
        self.model = model = self.dist.module
        self.estimator = est_cls(self.config)
        self.rule = rule_cls(self.config)
        self.rule.check(self.estimator)
        self.events: list[NumericsEvent] = []
        self.strict = strict
        self._group_options = {k: opt for k, opt in options.items() if opt.per_group}
        self._warned_uncaptured: set[str] = set()
        self.skipped_steps = 0
        self._streak = SkipStreak(self)                   # skips in a row -> curvlab.Diverged (curvlab.divergence)
        self._t = 0
        #: refresh every layer at the next step (set by the LM damping with ``damping_refresh``)
        self.refresh_next = False
        #: per-section step timing (:mod:`curvlab.profiling`); ``None`` = off
        self.sections: Sections | None = None
        self.units = self._build_units(model, strict)
        self.dist.bind(self.units)
        self.rule.dist = self.dist
        if not self.units:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        self._layout = self._param_layout()
        self._param_ids = tuple(id(p) for p in model.parameters())
        self._modules_seen = self._structure()
        defaults = {k: self.config[k] for k, opt in options.items() if opt.per_group}
        super().__init__([p for u in self.units for p in u.params], defaults)
        self._bind_groups()
        scaling_cls(self.config).configure(model, self.units, self.names["estimator"], self.names["rule"])
        for unit in self.units:
            if unit.curvature is not None:
                unit.curvature.bind(unit)
        needs = self._needs = self.estimator.captures() | self.rule.captures()
        layers = {u.name: u.module for u in self.units if u.preconditioned}
        backend = HookCapture
        if self.config["capture"] == "backpack":
            from .backpack_capture import BackpackCapture as backend
            if self.config["loss_terms_per_example"] is not None:
                raise ValueError("loss_terms_per_example needs capture='hooks' (the BackPACK backend reads (N, C) "
                                 "outputs, one loss term per example)")
        self.capture = backend(
            model, layers, loss=self.config["loss"], fisher=self.config["fisher"],
            mc_samples=self.config["mc_samples"], want_inputs="inputs" in needs,
            want_fisher_grads="fisher_grads" in needs, want_real_grads="real_grads" in needs,
            is_stat_step=self._is_stat_step, seed=self.dist.seed(seed), every_step=self.rule.every_step,
            **({"loss_terms_per_example": self.config["loss_terms_per_example"]} if backend is HookCapture else {}),
        ) if needs & {"inputs", "fisher_grads", "real_grads"} else None
        if self.capture is not None and needs & {"fisher_grads", "real_grads"}:
            self.capture.check_loss = True            # the loss check of the first statistics step
        attach_adaptive(self)      # .quadratic (curvlab.quadratic), .lm, .gamma, .damping_history, .gamma_history
        self.rule.bind(self)

    # -- construction ----------------------------------------------------------------------------------
    def _build_units(self, model: nn.Module, strict: bool) -> list[Unit]:
        units: list[Unit] = []
        owner: dict[int, str] = {}
        selected = self.config["layers"]
        if selected is not None:
            names = {m or type(model).__name__ for m, _ in model.named_modules()}
            unknown = sorted(set(selected) - names)
            if unknown:
                raise ValueError(f"layers: no module named {unknown} in the model; module names are "
                                 f"{sorted(n for n in names if n)}")
        for mname, module in model.named_modules():
            own = [(pn, p) for pn, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            for pn, p in own:
                if id(p) in owner:
                    raise ValueError(f"parameter {mname}.{pn} is shared with {owner[id(p)]} (weight tying); "
                                     "curvlab cannot precondition shared parameters: untie them")
                owner[id(p)] = f"{mname}.{pn}"
            adapter, reason = find_adapter(module)
            if adapter is not None and (reason := self.estimator.unsupported_reason(adapter)):
                adapter = None
            label = mname or type(module).__name__
            if adapter is not None and selected is not None and label not in selected:
                adapter, reason = None, "not selected by the `layers` option"
            if adapter is not None:
                params = [p for _, p in own]
                note = adapter.select(module, params)
                how = self.estimator.describe(adapter) + (f" [{note}]" if note else "")
                units.append(Unit(label, params, how, module=module, adapter=adapter,
                                  curvature=self.estimator.create(label, module, adapter, self.events)))
                continue
            if strict and selected is None:
                raise UnsupportedLayer(
                    f"layer {label!r} ({type(module).__name__}) cannot be preconditioned: {reason}. Register an "
                    "adapter with @curvlab.register_adapter, or pass strict=False to give its parameters the "
                    "first-order fallback"
                )
            for pn, p in own:
                units.append(Unit(f"{mname}.{pn}" if mname else pn, [p], f"first-order fallback ({reason})"))
        return units

    def _param_layout(self) -> dict[str, int]:
        """``{qualified name: id(parameter)}`` of the model's parameters (to detect a model changed later)."""
        return {n: id(p) for n, p in self.model.named_parameters()}

    def _structure(self) -> list[tuple[Any, tuple[int, ...], tuple[int, ...]]]:
        """Every module with the ids of its direct children and parameters (what a swap or re-creation changes)."""
        return [(m, tuple(map(id, m._modules.values())), tuple(map(id, m._parameters.values())))
                for m in self.model.modules()]

    def _structure_unchanged(self) -> bool:
        """The per-step test, without re-walking the module tree: no module of the cached list changed its
        direct children or parameters (so no parameter anywhere was replaced, added or removed)."""
        return all(tuple(map(id, m._modules.values())) == kids and tuple(map(id, m._parameters.values())) == params
                   for m, kids, params in self._modules_seen)

    def _check_model_unchanged(self) -> None:
        """Raise if a parameter was replaced, added or removed since construction (layer swapped, re-created)."""
        if self._structure_unchanged():                                        # the cheap per-step test
            return
        if tuple(id(p) for p in self.model.parameters()) == self._param_ids:   # e.g. a parameter-free module added
            self._modules_seen = self._structure()
            return
        now = self._param_layout()
        if now == self._layout:
            return
        changed = sorted(n for n in set(now) | set(self._layout) if now.get(n) != self._layout.get(n))
        raise RuntimeError(
            f"the model's parameters changed after the optimizer was built: {changed[:8]}"
            f"{' ...' if len(changed) > 8 else ''} (a layer replaced, or a parameter re-created or added). "
            "The optimizer still holds the old tensors and would not train the new ones: build a new optimizer "
            "with curvlab.optimizer(model, ...) after changing the model"
        )

    def _bind_groups(self) -> None:
        by_param = {id(p): g for g in self.param_groups for p in g["params"]}
        for unit in self.units:
            unit.group = by_param[id(unit.params[0])]

    def _is_stat_step(self) -> bool:
        return self._t % self.config["stat_interval"] == 0

    # -- the step --------------------------------------------------------------------------------------
    def _skip(self, reason: str, layers: Iterable[str] = ()) -> None:
        if self.capture:
            self.capture.clear()
        if self.config["nonfinite"] == "raise":
            raise FloatingPointError(f"curvlab: {reason} (pass nonfinite='skip' to skip such steps)")
        self.skipped_steps += 1
        self.events.append(NumericsEvent("step", f"skipped step {self._t}: {reason}"))
        self._streak.skip(reason, layers)                  # logs the first skip in a row; raises curvlab.Diverged

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; also forgets what the discarded training passes recorded, except
        inside :func:`curvlab.capture.paused` (an evaluation closure, e.g. the adaptive dampings' extra calls:
        there curvlab neither records nor discards)."""
        super().zero_grad(set_to_none=set_to_none)
        if is_paused():
            return
        if getattr(self, "capture", None) is not None:
            self.capture.discard()
        if getattr(self, "quadratic", None) is not None:
            self.quadratic.discard()

    def _collect_stats(self) -> dict[str, LayerStats]:
        """This step's :class:`LayerStats` of every preconditioned layer that has any (and clears capture)."""
        if self.capture is not None and self.capture.check_loss:
            check_loss(self)
        out = {}
        for unit in self.units:
            if not unit.preconditioned:
                continue
            grad = None
            if "grad" in self._needs and (grads := unit.grads()) is not None:
                grad = unit.adapter.to_matrix(unit.module, grads).to(unit.curvature.dtype)
            if self.capture is not None:
                stats = self.capture.layer_stats(unit, unit.curvature.dtype, grad)
            else:
                stats = LayerStats(unit.name, unit.module, unit.adapter, unit.curvature.dtype, [], grad)
            if stats is not None and (stats.records or stats.grad is not None):
                out[unit.name] = stats
        return out

    def _accumulate(self, stats: dict[str, LayerStats]) -> bool:
        by_name = {u.name: u for u in self.units}
        new = {name: by_name[name].curvature.statistics(s) for name, s in stats.items()}
        new = self.dist.reduce_statistics(new, stats, {n: by_name[n].curvature for n in new})  # one collective
        bad = [name for name, s in new.items() if not _finite(s.values())]
        if bad:
            self._skip(f"non-finite curvature statistics in layers {bad}", bad)
            return False
        for name, s in new.items():
            by_name[name].curvature.accumulate(s, self.config["ema_decay"])
        return True

    def update_curvature(self) -> bool:
        """Fold the statistics captured since the last step into every layer's curvature.

        Called by :meth:`step` on statistics steps; call it directly to inspect :meth:`blocks` without
        stepping. Returns False (and changes nothing) if any layer's statistics are not finite.
        """
        ok = self._accumulate(self._collect_stats())
        if self.capture:
            self.capture.clear()                   # these training passes are consumed
        return ok

    def refresh(self, force: bool = True) -> None:
        """Recompute inverses / roots (all layers, or only those not ready when ``force=False``)."""
        todo = [u for u in self.units if u.preconditioned and (force or not u.curvature.ready)]
        for unit in self.dist.owned(todo):                 # all of them unless data_parallel_refresh="distributed"
            unit.curvature.refresh(unit.solve_damping())
        self.dist.share(todo)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        if self.lm is not None:                             # adaptive damping needs the closure (curvlab.damping)
            self.lm.check_closure(closure, self._t)
        if self.gamma is not None:                          # gamma_score="next" (curvlab.factor_damping)
            self.gamma.check_closure(closure, self._t)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            check_closure_loss(self, loss)                  # NaN/Inf loss: curvlab.Diverged
            if self.lm is not None and self.lm.pending is not None:
                self.lm.resolve(closure, loss)              # damping_rho="next": rho of the last adaptation step
            if self.gamma is not None and self.gamma.pending is not None:
                self.gamma.resolve(closure, loss)           # gamma_score="next": the last gamma step's choice
        self._check_model_unchanged()
        check_groups(self)
        self.dist.reduce_gradients(self.units)              # raw model + process group only
        grads = {u.name: g for u in self.units if (g := u.grads()) is not None}
        if not grads:                                       # nothing to step on: not a step
            if self.capture:
                self.capture.clear()
            return loss
        if not _finite([t for g in grads.values() for t in g]):          # one host sync for all gradients
            bad = [name for name, g in grads.items() if not _finite(g)]
            self._skip(f"non-finite gradients in {bad}", bad)
            return loss
        stat_step = self._is_stat_step()
        with section(self.sections, "statistics"):
            stats = self._collect_stats() if stat_step or self.rule.every_step else {}
            if stat_step and not self._accumulate(stats):
                return loss
        with section(self.sections, "refresh"):
            due, self.refresh_next = self.refresh_next, False      # damping_refresh (curvlab.damping)
            self.refresh(force=due or self._t % self.config["inv_interval"] == 0)
        first_order_where_uncaptured(self, grads, stats, stat_step)
        with section(self.sections, "rule"), activated(self.sections):   # solves inside: "precondition"
            gamma_step = self.gamma is not None and self.gamma.due(self._t)
            if gamma_step:                                               # curvlab.factor_damping
                plan = self.gamma.choose(stats)
            else:
                plan = self.rule.plan(self.units, self.state, stats)
            if not _finite(plan.tensors()):
                bad = nonfinite_units(self.units, plan)
                self._skip(f"the update rule produced non-finite updates in {bad}", bad)
                return loss
            pending = self.lm.predict(plan) if self.lm is not None and self.lm.due(self._t) else None
            plan.apply(self.state)
            if gamma_step:
                self.gamma.commit()
        if self.capture:
            self.capture.clear()
        self._t += 1
        self._streak.reset()
        if pending is not None:
            self.lm.after_update(pending, closure, loss)
        return loss

    @property
    def needs_closure(self) -> bool:
        """Whether ``step`` must be given a closure that re-evaluates the loss (``damping_adapt``, or
        ``gamma_adapt`` with ``gamma_score="next"``: :mod:`curvlab.damping`, :mod:`curvlab.factor_damping`)."""
        return self.lm is not None or (self.gamma is not None and self.gamma.held_out)

    # -- inspection ------------------------------------------------------------------------------------
    def flat_params(self) -> list[torch.Tensor]:
        """Every optimized parameter, unit by unit (the index the checkpoint's per-parameter records use)."""
        return [p for u in self.units for p in u.params]

    @property
    def step_count(self) -> int:
        return self._t

    def blocks(self) -> dict[str, torch.Tensor]:
        """``{module_name: dense undamped curvature block}`` of every preconditioned module, indexed in the
        order of ``torch.cat([p.reshape(-1) for p in module.parameters(recurse=False)])``."""
        return {u.name: u.curvature.dense() for u in self.units if u.preconditioned}

    def coverage(self) -> list[dict[str, Any]]:
        """One entry per unit: its name, parameter count, and how it is updated."""
        return [{"name": u.name, "numel": sum(p.numel() for p in u.params), "how": u.how,
                 "preconditioned": u.preconditioned} for u in self.units]

    def coverage_report(self) -> str:
        rows = self.coverage()
        width = max(len(r["name"]) for r in rows)
        lines = [f"{'unit':<{width}}  {'params':>9}  how"]
        lines += [f"{r['name']:<{width}}  {r['numel']:>9}  {r['how']}" for r in rows]
        covered = sum(r["numel"] for r in rows if r["preconditioned"])
        total = sum(r["numel"] for r in rows)
        lines.append(f"preconditioned: {covered}/{total} parameters ({100.0 * covered / total:.1f}%)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        n = self.names
        return f"CurvlabOptimizer(estimator={n['estimator']!r}, rule={n['rule']!r}, scaling={n['scaling']!r})"

    # -- checkpoints (curvlab.checkpoint) ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["curvlab"] = curvlab_entry(self)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvlab", None)
        check_entry(self, extra)
        super().load_state_dict(state_dict)
        self._bind_groups()
        restore_entry(self, extra)


def optimizer(model: nn.Module, estimator: str = "kfac", rule: str = "natural", scaling: str = "standard",
              **hyper: Any) -> CurvlabOptimizer:
    """Compose an optimizer from an estimator, an update rule and a parameterization (by registry name).

    Hyper-parameters use the pinned names of :mod:`curvlab.hyper` plus the options each component
    declares; unknown names or invalid values raise ``TypeError`` / ``ValueError`` naming the argument.
    What you do not pass comes from the components' defaults, which train without tuning (README "Defaults":
    e.g. ``kl_clip=1e-3`` for curvature estimators under ``natural``/``fop``); ``opt.component_defaults`` lists
    them. ``curvlab.ESTIMATORS.get(name).suggested`` holds the best-known settings instead.
    """
    return CurvlabOptimizer(model, estimator, rule, scaling, **hyper)
