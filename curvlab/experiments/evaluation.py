"""The losses of a run: the training loss, the held-out evaluation and the closure of an adaptive damping's step.

* :func:`training_loss` is curvlab's ``loss`` option as the run loop computes it: the mean cross-entropy on
  logits (per position for sequence labels ``(N, T)``) or the mean squared error;
* :func:`evaluate` is the loss and accuracy of the epoch rows (eval mode, curvature capture paused, optionally
  all-reduced over the ranks of a data-parallel run);
* :class:`StepClosure` is the ``closure`` of ``opt.step(closure)`` that the Levenberg-Marquardt damping calls
  to re-evaluate the loss at ``theta + delta`` (the ``h(theta + delta)`` of the reduction ratio ``rho``,
  ALGORITHMS.md section 10, eq. Q.2; Martens & Grosse, ICML 2015, section 6.5; :mod:`curvlab.damping`); the loop
  hands it over only when :func:`needs_closure` says the optimizer asks for it, so a plain run's cost is unchanged.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .config import ConfigError
from .launch import DistContext, shard

__all__ = ["training_loss", "evaluate", "task_and_loss", "needs_closure", "StepClosure"]


def training_loss(task: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training loss (curvlab's ``loss`` option): cross-entropy on logits, or ``MSELoss`` (mean over
    examples AND output entries); ``reduction="sum"`` sums over examples only (for exact evaluation).

    Sequence outputs: logits ``(N, T, C)`` with labels ``(N, T)`` (a language model) take the cross-entropy
    over the last dimension and the mean (or sum) over all ``N * T`` positions."""
    if task == "classification":
        if out.dim() > 2 or y.dim() > 1:
            if out.shape[:-1] != y.shape:
                raise ValueError(f"logits of shape {tuple(out.shape)} do not match labels of shape {tuple(y.shape)}: "
                                 "per-position labels (N, T) need logits (N, T, C), one label per example (N,) "
                                 "needs logits (N, C) (e.g. model.pool = 'last' for transformer_lm)")
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)
        return F.cross_entropy(out, y, reduction=reduction)
    if reduction == "sum":
        return F.mse_loss(out, y, reduction="sum") / out[0].numel()
    return F.mse_loss(out, y)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str,
             batch_size: int = 4096, ctx: DistContext | None = None) -> tuple[float, float | None]:
    """Mean loss and accuracy (None unless classification) in eval mode, without curvature capture.

    Both are means over loss terms: examples, or every position for labels ``(N, T)`` (per-token loss
    and accuracy of a language model). With a distributed ``ctx`` each rank evaluates its contiguous
    share of ``x`` and the sums are all-reduced, so every rank returns the same numbers (all ranks must
    call it)."""
    if len(x) == 0:
        return math.nan, None
    terms = y[0].numel() if task == "classification" else 1  # loss terms (labels) per example
    if ctx is not None and ctx.distributed:
        part = shard(len(x), ctx.rank, ctx.world_size)
        total, correct = _eval_sums(model, x[part], y[part], task, batch_size)
        total, correct = ctx.all_sum([total, correct])
    else:
        total, correct = _eval_sums(model, x, y, task, batch_size)
    count = len(x) * terms
    return total / count, (correct / count if task == "classification" else None)


def _eval_sums(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str,
               batch_size: int) -> tuple[float, int]:
    """Summed loss and number of correct predictions (labels) over ``x`` (eval mode, capture paused)."""
    from curvlab import capture

    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    try:
        with capture.paused():
            for start in range(0, len(x), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                out = model(xb)
                total += float(training_loss(task, out, yb, reduction="sum"))
                if task == "classification":
                    correct += int((out.argmax(dim=-1) == yb).sum())
    finally:
        model.train(was_training)
    return total, correct


def task_and_loss(split: Any, task: str) -> tuple[str, str]:
    """The task (``train.task``, ``"auto"`` taken from the data set) and the loss name it trains on; a task the
    data set cannot serve is refused."""
    task = split.task if task == "auto" else task
    if task == "classification" and split.task != "classification":
        raise ConfigError(f"train.task='classification' but data set {split.name!r} has regression targets")
    if task == "regression" and split.task != "regression":
        raise ConfigError(f"train.task='regression' but data set {split.name!r} has class labels; use "
                          "task 'auto' or 'autoencoder'")
    return task, ("cross_entropy" if task == "classification" else "mse")


def needs_closure(opt: Any) -> bool:
    """Whether the optimizer re-evaluates the loss (``opt.needs_closure``: ``damping_adapt``, or
    ``gamma_score="next"``); only then does the loop hand ``step`` a closure (the plain loop's cost and results are
    unchanged)."""
    return bool(getattr(opt, "needs_closure", False))


class StepClosure:
    """The closure of ``opt.step(closure)`` for a loop that has already run the forward and backward: the first
    call returns that loss (nothing is recomputed), every later call (the LM damping's ``h(theta + delta)``, made
    inside :func:`curvlab.capture.paused`) runs ``zero_grad``, a forward and a backward on the same batch."""

    def __init__(self, opt: Any, model: torch.nn.Module, task: str, x: torch.Tensor, y: torch.Tensor,
                 loss: torch.Tensor) -> None:
        self.opt, self.model, self.task, self.x, self.y, self.loss = opt, model, task, x, y, loss

    def __call__(self) -> torch.Tensor:
        if self.loss is not None:
            loss, self.loss = self.loss, None
            return loss
        self.opt.zero_grad(set_to_none=True)
        loss = training_loss(self.task, self.model(self.x), self.y)
        loss.backward()
        return loss

