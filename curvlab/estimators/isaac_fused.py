"""ISAAC with the preconditioning folded into the backward pass (``isaac_fused=True``; Petersen et al., ICLR
2023, section 6.2 of ALGORITHMS.md: what the official code does in a custom autograd Function).

Unfused ISAAC (the default, :mod:`curvlab.estimators.isaac`) leaves autograd alone: backward forms the weight
gradient ``Gout^T X`` and ``solve`` then needs two more products of that size (``V X^T``, then ``coef X``), so
a Linear layer costs the work of 5 weight-sized products per step instead of 3 (forward, input gradient,
weight gradient). The fused form computes the ISAAC direction INSTEAD of the weight gradient, by the
push-through identity of eq. I.6::

    zeta* = lambda Gout^T X (lambda I_n + X^T X / b)^-1 = lambda Gout^T [(lambda I_R + X X^T / b)^-1 X]

i.e. one ``R x R`` Cholesky (``R`` = rows of the batch, ``R < n``) and ``R^2 n`` extra work, then the SAME
weight-sized product the plain backward would have done: ISAAC at close to SGD's cost. When ``R >= n`` the
``n x n`` form ``lambda (Gout^T X)(lambda I + X^T X / b)^-1`` is used (as the unfused direct branch).

What changes for the user (documented, opt-in):

* after ``loss.backward()`` the weights' ``.grad`` of fused layers holds the ISAAC direction, not the
  gradient (biases keep their plain gradient, ``isaac_bias="plain"`` as the official code); gradients
  flowing to earlier layers and to the input are the ordinary ones. Only training backwards (into ``.grad``,
  the capture contract of :mod:`curvlab.capture`) get the direction: ``torch.autograd.grad`` returns the
  plain weight gradient;
* each backward uses the current batch (the official method): ``stat_interval`` / ``inv_interval`` have no
  effect, and gradient accumulation over several backward passes sums per-pass directions;
* it covers ``nn.Linear`` layers; only the rules that just precondition the gradient (``natural``, ``sngm``)
  without ``kl_clip`` can use it (FOP needs ``mv`` and the two half-batch gradients); other settings raise.

The module's ``forward`` is replaced by an instance attribute calling :class:`_FusedLinear`;
:func:`unfuse` restores the class forward. The optimizer calls :meth:`FusedIsaacCurvature.bind` so that
the damping ``lambda_a`` read in backward is always the unit's current one (schedules, muP multipliers).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import accumulates_into
from ..curvature import Curvature
from ..kernels import gram
from ..linalg import add_diagonal
from .isaac import _spd_factor, _spd_solve

FUSED_RULES = ("natural", "sngm")


class _FusedLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient is ISAAC's zeta* (module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                curv: "FusedIsaacCurvature") -> torch.Tensor:
        ctx.curv, ctx.has_bias = curv, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_out @ weight if need_x else None
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = None
        if need_w:       # the capture contract: only a training backward (into .grad) gets the ISAAC direction
            xs = x.reshape(-1, x.shape[-1])
            grad_w = (ctx.curv.direction(g, xs, x.shape[0]) if accumulates_into([weight])
                      else (g.T @ xs).to(weight.dtype))
        grad_b = g.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b, None


def unfuse(module: nn.Module) -> None:
    """Restore the class ``forward`` of a module fused by ``isaac_fused=True``."""
    if "forward" in vars(module):
        del module.forward


class FusedIsaacCurvature(Curvature):
    """ISAAC folded into backward for one ``nn.Linear``: ``solve`` is the identity on the fused direction."""

    passthrough = True
    data_parallel_refusal = ("isaac_fused=True preconditions each rank's local gradient inside backward, so data "
                             "parallel would average per-rank ISAAC directions, not the whole-batch step; use "
                             "isaac_fused=False")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if type(self.module) is not nn.Linear:
            raise ValueError(f"layer {self.name!r} ({type(self.module).__name__}): isaac_fused=True supports "
                             "nn.Linear layers only; pass isaac_fused=False, or layers=[...] naming the Linear layers")
        if self.config["isaac_bias"] != "plain":
            raise ValueError("isaac_fused=True keeps the bias gradient plain (isaac_bias='plain', the official "
                             f"code); got isaac_bias={self.config['isaac_bias']!r}")
        self._damping: Callable[[], float] = lambda: float(self.config["damping"])
        self.last_branch: str | None = None
        self._eyes: dict[int, torch.Tensor] = {}
        module = self.module
        module.forward = lambda x: _FusedLinear.apply(x, module.weight, module.bias, self)

    def bind(self, unit: Any) -> None:
        """Read ``lambda_a`` from the unit (per-group damping times the parameterization's multiplier)."""
        self._damping = lambda: float(unit.solve_damping())

    def direction(self, g: torch.Tensor, x: torch.Tensor, examples: int) -> torch.Tensor:
        """zeta* from output gradients ``g`` (R, d_out) and inputs ``x`` (R, n); ``b`` per ``isaac_average``."""
        lam = self._damping()
        if not lam > 0:
            raise ValueError(f"layer {self.name!r}: the isaac estimator needs damping (lambda_a) > 0, got {lam!r}")
        rows = x.shape[0]
        b = rows if self.config["isaac_average"] == "rows" else examples
        dtype = g.dtype
        xc, gs = x.to(self.dtype), g.to(self.dtype)          # no-ops in the curvature's dtype
        branch = self.config["isaac_branch"]
        if branch == "auto":
            branch = "woodbury" if rows < xc.shape[1] else "direct"
        self.last_branch = branch
        if branch == "woodbury":
            # K = lambda I + X X^T / b (R x R) in one product (no scaled copy of X: the 1/b goes on the R x R
            # side); Cholesky reads one triangle, so K is symmetrized only on the fallback path. An explicit
            # inverse from the factor is cheap (R^3) and turns the solve with n right-hand sides into one GEMM
            # (cholesky_solve on a row-major (R, n) copies and is ~20x slower). zeta* = lambda G^T K^-1 X is
            # associated as (G^T K^-1) X when d_out < n (d_out R^2 instead of n R^2 multiply-adds).
            # The factor is checked on its diagonal only: a NaN or Inf anywhere in L reaches a later diagonal
            # entry (L_ii = sqrt(K_ii - sum_k L_ik^2)), and LAPACK reports a NaN pivot in ``info``. ``lambda`` goes
            # on the R x R inverse, the smallest operand.
            k = torch.addmm(self._eye(rows, xc), xc, xc.T, beta=lam, alpha=1.0 / b)
            chol, info = torch.linalg.cholesky_ex(k)
            if bool(torch.isfinite(chol.diagonal()).all() & (info == 0)):        # one host sync
                inv = torch.cholesky_inverse(chol).mul_(lam)
            else:
                kind, mat = _spd_factor(k, f"{self.name} (isaac fused woodbury)", self.events)
                inv = (torch.cholesky_inverse(mat) if kind == "chol" else mat) * lam
            out = (gs.T @ inv) @ xc if gs.shape[1] < xc.shape[1] else gs.T @ (inv @ xc)
            return out if out.dtype == dtype else out.to(dtype)
        xs = xc / math.sqrt(b)
        factor = _spd_factor(add_diagonal(gram(xs), lam), f"{self.name} (isaac fused direct)", self.events)
        return (_spd_solve(factor, (gs.T @ xc).T).T * lam).to(dtype)

    def _eye(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The (rows, rows) identity in ``like``'s dtype and device, kept between steps (a constant)."""
        eye = self._eyes.get(rows)
        if eye is None or eye.dtype != like.dtype or eye.device != like.device:
            eye = self._eyes[rows] = torch.eye(rows, dtype=like.dtype, device=like.device)
        return eye

    def solve(self, mat: torch.Tensor) -> torch.Tensor:
        return mat                                   # the weight part already is the ISAAC direction

    def mv(self, mat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"layer {self.name!r}: isaac_fused=True has no mv (use isaac_fused=False)")

    def dense(self) -> torch.Tensor:
        raise NotImplementedError(f"layer {self.name!r}: isaac_fused=True keeps no curvature to densify; "
                                  "use isaac_fused=False for blocks()")
