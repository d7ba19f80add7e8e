"""Divergence stops: :class:`Diverged`, raised by ``opt.step()`` once training has blown up.

A run whose learning rate is too large for its curvature typically does not produce NaN at once: parameters
grow huge but stay finite, then every later gradient (or curvature statistic, or update) overflows, so every
later step is skipped by ``nonfinite="skip"`` (:mod:`curvlab.optim`) and the run burns its budget without
moving. :class:`SkipStreak` counts skipped steps IN A ROW (a successful step resets it) and raises
:class:`Diverged` when the streak reaches the option ``max_skipped_steps`` (default 10; ``None`` = never).
Its message names the layers the skip reasons named (non-finite gradients, statistics or updates), the number
of skipped steps and the remedies. The skip warning is logged once per streak (its first skip); every skip is
still counted in ``opt.skipped_steps`` and recorded in ``opt.events``.

``opt.step(closure)`` also raises :class:`Diverged` at once when the loss the closure returns is NaN/Inf
(unless ``max_skipped_steps=None``). The plain loop (``loss.backward(); opt.step()``) hands the optimizer no
loss: a non-finite loss there gives non-finite gradients, so the skip counter stops it after
``max_skipped_steps`` steps (check the loss yourself to stop at the first one).

``nonfinite="raise"`` is unchanged: the first non-finite gradient, statistic or update raises a plain
``FloatingPointError``. :class:`Diverged` subclasses ``FloatingPointError``, so ``except FloatingPointError``
catches both.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch

log = logging.getLogger("curvlab")

__all__ = ["Diverged", "SkipStreak", "nonfinite_units", "check_closure_loss"]


class Diverged(FloatingPointError):
    """Training diverged: ``max_skipped_steps`` steps in a row were skipped as non-finite, or the closure's loss is
    NaN/Inf. ``layers``: the layers the skip reasons named; ``skipped``: the skipped steps in the streak;
    ``step``: the optimizer's step counter; ``loss``: the closure's loss (``None`` for a streak)."""

    def __init__(self, message: str, *, layers: Iterable[str] = (), skipped: int = 0, step: int = 0,
                 loss: float | None = None) -> None:
        super().__init__(message)
        self.layers, self.skipped, self.step, self.loss = list(layers), skipped, step, loss


def _remedies(opt: Any) -> str:
    """The remedies, with the current values of the settings they name."""
    lr = ", ".join(f"{g['lr']:g}" for g in opt.param_groups)
    damping = ", ".join(f"{g['damping']:g}" for g in opt.param_groups)
    text = f"Remedies: restart (from a checkpoint taken before the blow-up) with a lower lr (now {lr}), more damping " \
           f"(now {damping})"
    try:                                             # does this rule honour kl_clip? (sngm and lars refuse it)
        type(opt.rule)({**opt.config, "kl_clip": 1e-3})
        text += f", or kl_clip to bound each step's size (now {opt.config['kl_clip']}; e.g. kl_clip=1e-3)"
    except ValueError:
        pass
    return text + ". max_skipped_steps=None turns this check off"


class SkipStreak:
    """Skipped steps in a row of one optimizer: logs the first skip of a streak, raises :class:`Diverged` when the
    streak reaches ``max_skipped_steps``, and is reset by :meth:`reset` after every step that updated the
    parameters. ``opt``: the :class:`curvlab.optim.CurvlabOptimizer` (its config, param groups, rule, step)."""

    def __init__(self, opt: Any) -> None:
        self.opt = opt
        self.count = 0
        self.reasons: list[str] = []
        self.layers: list[str] = []              # in order of first mention

    def skip(self, reason: str, layers: Iterable[str] = ()) -> None:
        """Record one skipped step; raise :class:`Diverged` if it is the ``max_skipped_steps``-th in a row."""
        limit, step = self.opt.config["max_skipped_steps"], self.opt.step_count
        self.count += 1
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.layers += [name for name in layers if name not in self.layers]
        if self.count == 1:
            more = f"; curvlab.Diverged after {limit} in a row" if limit is not None else ""
            log.warning("curvlab: skipped step %d: %s; parameters and curvature left unchanged (further skips in a "
                        "row are counted in opt.skipped_steps, not logged%s)", step, reason, more)
        if limit is not None and self.count >= limit:
            why = "; ".join(self.reasons[:4]) + (f"; and {len(self.reasons) - 4} more" if len(self.reasons) > 4 else "")
            raise Diverged(
                f"curvlab: training diverged: {self.count} steps in a row were skipped at step {step} "
                f"(max_skipped_steps={limit}): {why}. Layers involved: {self.layers or 'none named'}. Parameters "
                f"and curvature are left as the last successful step made them. {_remedies(self.opt)}",
                layers=self.layers, skipped=self.count, step=step)

    def reset(self) -> None:
        """A step updated the parameters: the streak is over."""
        if self.count > 1:
            log.info("curvlab: a step succeeded after %d skipped steps in a row", self.count)
        self.count, self.reasons, self.layers = 0, [], []


def nonfinite_units(units: list[Any], plan: Any) -> list[str]:
    """Names of the units owning a parameter whose planned update or rule state (a :class:`curvlab.rules.Plan`) is
    not finite, in unit order."""
    entries = [*plan.deltas(), *((p, v) for p, _, v in plan.state)]
    bad = {id(p) for p, value in entries if not bool(torch.isfinite(value).all())}
    return [u.name for u in units if any(id(p) in bad for p in u.params)]


def check_closure_loss(opt: Any, loss: Any) -> None:
    """Raise :class:`Diverged` if the closure's ``loss`` is NaN/Inf (no check when ``max_skipped_steps`` is None)."""
    if loss is None or opt.config["max_skipped_steps"] is None:
        return
    value = float(loss.detach().float().sum()) if isinstance(loss, torch.Tensor) else float(loss)
    if math.isfinite(value):
        return
    if opt.capture is not None:
        opt.capture.clear()                          # the closure's training passes are not used
    layers = [u.name for u in opt.units
              if (g := u.grads()) is not None and not all(bool(torch.isfinite(t).all()) for t in g)]
    where = f"; non-finite gradients in {layers}" if layers else ""
    raise Diverged(f"curvlab: training diverged: the loss returned by the closure is {value} at step "
                   f"{opt.step_count}{where}. {_remedies(opt)}", layers=layers, step=opt.step_count, loss=value)
