"""Checks the optimizer runs at every step, before anything is written (:meth:`curvlab.CurvlabOptimizer.step`).

* :func:`check_groups`: per-group hyper-parameters are validated where they can change (``param_groups``
  edited between steps, LR schedulers), with the construction-time messages prefixed ``param_groups[i]``;
* :func:`check_loss`: on the first statistics step, the training loss's output gradients against the
  configured ``loss`` and its mean reduction (:func:`curvlab.losses.check_output_gradients`);
* :func:`first_order_where_uncaptured`: a preconditioned layer that got gradients but whose forward curvlab never
  saw in a training pass (the capture contract, :mod:`curvlab.capture`) takes first-order steps while it has no
  curvature -- one :class:`CaptureWarning` naming it and the likely cause, or ``RuntimeError`` under
  ``strict=True``.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch

from .losses import check_output_gradients
from .stats import LayerStats


class CaptureWarning(UserWarning):
    """A preconditioned layer got gradients without a captured forward; it falls back to first order."""


def _user_stacklevel() -> int:
    """``stacklevel`` of the first caller outside curvlab and torch (``step()`` is wrapped by torch's hooks)."""
    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def check_groups(opt: Any) -> None:
    """Validate the per-group hyper-parameters now (they may have been edited since construction)."""
    for i, group in enumerate(opt.param_groups):
        for key, option in opt._group_options.items():
            if key in group:
                try:
                    option.check(key, group[key])
                except ValueError as exc:
                    raise type(exc)(f"param_groups[{i}]: {exc}") from None


def check_loss(opt: Any) -> None:
    """The loss check of :func:`curvlab.losses.check_output_gradients` on this step's training passes (once)."""
    passes = [run for run in opt.capture.training_passes() if run.output_grad is not None]
    if not passes:
        return
    n_step = sum(run.batch_size for run in opt.capture.training_passes())
    uses_loss = "fisher_grads" in opt._needs            # the configured loss shapes the Fisher vectors
    for run in passes:
        check_output_gradients(opt.config["loss"], run.output, run.output_grad * n_step, loss_used=uses_loss)
    opt.capture.check_loss = False


def first_order_where_uncaptured(opt: Any, grads: dict, stats: dict[str, LayerStats], stat_step: bool) -> None:
    """Set ``unit.first_order_now`` for this step: units with gradients but no captured forward go first order
    while they have no curvature (or, for a rule that needs this step's rows, FOP, whenever rows are missing)."""
    expected = opt.capture is not None and (stat_step or bool(opt.rule.every_step))
    for unit in opt.units:
        unit.first_order_now = False
        if not unit.preconditioned or unit.name not in grads:
            continue
        missing = expected and unit.name not in stats
        first_order = ((missing and bool(opt.rule.every_step))
                       or (not unit.curvature.passthrough and not unit.curvature.ready))
        if (missing or first_order) and unit.name not in opt._warned_uncaptured:
            why = (f"layer {unit.name!r} ({type(unit.module).__name__}) got gradients, but curvlab saw no forward "
                   "of it in a training pass (a forward of the model whose backward reached .grad). It is probably "
                   "used through its parameters instead of being called (nn.MultiheadAttention's out_proj: convert "
                   "the model with curvlab.nn.convert), or called outside the model's forward, or its forward ran "
                   "under torch.no_grad()/curvlab.capture.paused()")
            if opt.strict:
                raise RuntimeError(why + " (strict=True)")
            opt._warned_uncaptured.add(unit.name)
            warnings.warn(why + "; it takes first-order steps while it has no curvature", CaptureWarning,
                          stacklevel=_user_stacklevel())
        unit.first_order_now = first_order
