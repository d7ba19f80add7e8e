"""Update rules: turn per-unit gradients and curvatures into parameter updates.

A rule returns a :class:`Plan` (the updates and the rule state it wants written); the optimizer checks the
plan for NaN/Inf before committing anything, so a bad step never reaches the parameters or the state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..curvature import Estimator
from ..hyper import Option
from ..stats import LayerStats
from ..units import Unit


@dataclass
class Plan:
    """``state[p][key] = value`` for every state entry, then ``p += delta`` for every update and
    ``p += alpha * t`` for every scaled update.

    ``scaled`` (``(p, t, alpha)``) lets a rule hand over a tensor it keeps anyway (the new momentum buffer)
    with the step length as a number, instead of materializing ``alpha * t``: the optimizer applies those in
    one ``torch._foreach_add_`` per distinct ``alpha`` (the pass and the allocation ``delta = -lr * buf`` cost are
    saved). ``alpha`` must be finite; :meth:`deltas` gives every update as a tensor for code that needs them.
    """

    updates: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    state: list[tuple[torch.nn.Parameter, str, torch.Tensor]] = field(default_factory=list)
    scaled: list[tuple[torch.nn.Parameter, torch.Tensor, float]] = field(default_factory=list)

    def tensors(self):
        """Every tensor the plan would write (the NaN/Inf check of the step), each distinct one once."""
        seen: set[int] = set()
        for t in (*(d for _, d in self.updates), *(v for _, _, v in self.state), *(t for _, t, _ in self.scaled)):
            if id(t) not in seen:
                seen.add(id(t))
                yield t

    def params(self):
        """The parameters this plan moves (plain and scaled updates)."""
        yield from (p for p, _ in self.updates)
        yield from (p for p, _, _ in self.scaled)

    def deltas(self):
        """``(p, delta)`` for every update, scaled ones materialized (``alpha * t``)."""
        yield from self.updates
        yield from ((p, t * alpha) for p, t, alpha in self.scaled)

    def apply(self, state: dict[torch.nn.Parameter, dict[str, Any]]) -> None:
        """Commit: write the state entries, then add the updates to the parameters."""
        for p, key, value in self.state:
            state[p][key] = value
        for p, delta in self.updates:
            p.add_(delta)
        by_alpha: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for p, t, alpha in self.scaled:
            ps, ts = by_alpha.setdefault(alpha, ([], []))
            ps.append(p)
            ts.append(t)
        for alpha, (ps, ts) in by_alpha.items():
            torch._foreach_add_(ps, ts, alpha=alpha)


class UpdateRule:
    """Base class. ``requires``: curvature operations the rule calls (checked against the estimator)."""

    options: dict[str, Option] = {}
    requires: frozenset[str] = frozenset({"solve"})
    #: Overrides of the estimator's ``suggested`` hyper-parameters this rule needs (e.g. SNGM's lr is a distance).
    suggested: dict[str, Any] = {}
    #: What the rule sets for options the user does not pass, over the estimator's ``defaults`` (README "Defaults";
    #: :func:`curvlab.hyper.declared_defaults`); e.g. SNGM's lr is a step length, not a gradient multiplier.
    defaults: dict[str, Any] = {}
    #: True if the rule applies ``kl_clip`` (the estimator's default ``kl_clip`` reaches only such rules; a rule
    #: that refuses or ignores it keeps ``False``)
    trust_region: bool = False
    #: Captures the rule needs on EVERY step (not only statistics steps), e.g. FOP's {"inputs", "real_grads"}.
    every_step: frozenset[str] = frozenset()

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def check(self, estimator: Estimator) -> None:
        missing = self.requires - estimator.provides
        if missing:
            raise ValueError(
                f"rule {self.registry_name!r} needs the curvature operations {sorted(missing)}, which estimator "  # type: ignore
                f"{estimator.registry_name!r} does not provide; pick another estimator or rule"  # type: ignore
            )

    def bind(self, optimizer: Any) -> None:
        """Called once by the optimizer at the end of its construction (a rule that needs the optimizer's
        quadratic model, events or step counter keeps them; ``rule="qmodel"``)."""

    def captures(self) -> set[str]:
        """Extra statistics the rule needs from the capture backend (see Estimator.captures)."""
        return set(self.every_step)

    def plan(self, units: list[Unit], state: dict[torch.nn.Parameter, dict[str, Any]],
             stats: dict[str, LayerStats]) -> Plan:
        """The step: ``stats`` holds this step's :class:`LayerStats` by unit name (statistics steps, or every
        step for a rule with ``every_step``)."""
        raise NotImplementedError


from . import fop, natural, qmodel, sngm  # noqa: E402,F401  (registers the built-in rules)
