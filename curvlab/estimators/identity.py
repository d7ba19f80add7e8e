"""The identity estimator: no curvature, for first-order baselines.

``solve(V) = mv(V) = V`` (damping is ignored), so ``rule="natural"`` with ``estimator="identity"`` is
exactly momentum SGD (``torch.optim.SGD`` with the same lr, momentum and weight decay).
"""
from __future__ import annotations

import torch

from ..curvature import Curvature, Estimator
from ..registry import register_estimator


class IdentityCurvature(Curvature):
    passthrough = True
    refreshed = ()    # data parallel (curvlab.distributed): no statistics, nothing to refresh or send

    def solve(self, mat: torch.Tensor) -> torch.Tensor:
        return mat

    def mv(self, mat: torch.Tensor) -> torch.Tensor:
        return mat

    def dense(self) -> torch.Tensor:
        n = self.shape[0] * self.shape[1]
        return torch.eye(n, dtype=self.dtype, device=self.device)


@register_estimator("identity")
class Identity(Estimator):
    """No curvature (C = I): first-order baselines; with rule='natural' it is momentum SGD."""

    fisher_types = ("empirical", "mc", "type2")
    #: damping is ignored by solve/mv; only a quadratic model (rule="qmodel", damping_adapt) uses it, where 1e-3
    #: lets minibatch-greedy steps blow up at batch 32 (digits MLP) and 0.1 trains stably
    suggested = {"lr": 0.3, "momentum": 0.9, "damping": 0.1}
    #: README "Defaults": momentum SGD as commonly run (lr 0.1, momentum 0.9; momentum 0 reaches 0.81-0.85 train
    #: accuracy in 3 epochs on the digits models), no KL clip (with C = I it would be gradient-norm clipping), and the
    #: damping the quadratic model needs (rule="qmodel", damping_adapt; damping is ignored otherwise)
    defaults = {"momentum": 0.9, "damping": 0.1, "kl_clip": None}
    damped_solve = False
    curvature_class = IdentityCurvature
