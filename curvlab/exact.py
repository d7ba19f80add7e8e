"""Dense exact curvature matrices with :mod:`torch.func` -- the test oracle of curvlab.

Conventions (pinned for the whole library):

* Objective: the MEAN loss over the batch, ``L = (1/N) sum_n l_n``, as a user writes it.
  ``loss="cross_entropy"``: ``F.cross_entropy(f, y)`` on logits ``f`` of shape (N, C) and integer labels
  ``y`` of shape (N,), so ``l_n = -log softmax(f_n)[y_n]``.  ``loss="mse"``: ``F.mse_loss(f, y)`` (mean over
  the batch AND the output entries), so ``l_n = (1/D) ||f_n - y_n||^2`` with D entries per example.
* Flat parameter vector: ``cat([p.reshape(-1) for name, p in model.named_parameters() if p.requires_grad])``,
  or over the names in ``params`` (in that order) if given.  Matrices are P x P in that order.
* With ``f_n`` the per-example output and ``J_n = d f_n / d theta``:

  - GGN        ``G = (1/N) sum_n J_n^T H_n J_n``, ``H_n = d^2 l_n / d f_n^2``
    (CE: ``diag(p) - p p^T``, ``p = softmax(f_n)``; MSE: ``(2/D) I``).
  - Fisher     ``F = (1/N) sum_n E_{yhat ~ p(.|x_n)} [g g^T]``, ``g = grad_theta l(f_n, yhat)``, exact.
  - Empirical  ``E = (1/N) sum_n grad l_n grad l_n^T`` with the real targets.
  - Hessian    ``d^2 L / d theta^2``.

Assumptions and mechanics: the examples must be independent (eval mode, or no batch-coupling layers
such as BatchNorm in train mode) and the forward deterministic (no dropout in train mode); GGN and both
Fishers evaluate the model one example at a time (``vmap``).  Every forward runs inside
:func:`curvlab.capture.paused` on a *hook-free structural copy* of the model (see :func:`_hookless_copy`):
forward and backward hooks (curvlab's, BackPACK's -- which break torch.func) are dropped, forward
pre-hooks are kept, and parameter/buffer tensors are shared, not duplicated.  The model is never modified.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from curvlab.capture import paused

__all__ = ["ggn", "fisher", "empirical_fisher", "hessian", "exact_matrix", "module_blocks",
           "exact_blocks", "parameter_layout", "KINDS", "LOSSES"]

KINDS = ("ggn", "fisher", "empirical", "hessian")
LOSSES = ("cross_entropy", "mse")
_BUDGET = 2 ** 24  # max. elements of one chunk of per-example Jacobians (128 MiB in float64)
_DROPPED_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_backward_hooks", "_backward_pre_hooks")


def _hookless_copy(model: nn.Module) -> nn.Module:
    """Deep copy of the module tree without forward/backward hooks, sharing every tensor attribute."""
    memo: dict = {}
    for m in model.modules():
        for name, value in vars(m).items():
            if isinstance(value, Tensor):
                memo[id(value)] = value
            elif name in _DROPPED_HOOKS and isinstance(value, dict):
                memo[id(value)] = type(value)()
            elif name == "_forward_pre_hooks" and isinstance(value, dict):
                memo[id(value)] = type(value)(value)  # keep pre-hooks (legacy weight_norm), not copied
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None:
                memo[id(t)] = t
    return copy.deepcopy(model, memo)


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


class _Problem:
    """The model as a function of the flat parameter vector, plus the validated data."""

    def __init__(self, model: nn.Module, params: list[str] | None):
        with paused():
            self.net = _hookless_copy(model)
        named = dict(self.net.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            names = list(params)
            bad = [n for n in names if n not in named]
            if bad or len(set(names)) != len(names):
                raise ValueError(f"invalid or repeated parameter names {bad or names}; valid: {list(named)}")
        if not names:
            raise ValueError("the model has no parameters to differentiate")
        self.names = names
        self.shapes = [named[n].shape for n in names]
        self.fixed = {n: p.detach() for n, p in named.items() if n not in names}
        self.fixed.update({n: b.detach().clone() for n, b in self.net.named_buffers()})
        self.theta = torch.cat([named[n].detach().reshape(-1) for n in names])
        self.dtype, self.P = self.theta.dtype, self.theta.numel()

    def batch_out(self, flat: Tensor, x: Tensor) -> Tensor:
        chunks = flat.split([s.numel() for s in self.shapes])
        tensors = {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}
        return functional_call(self.net, {**self.fixed, **tensors}, (x,))

    def example_out(self, flat: Tensor, x: Tensor) -> Tensor:
        return self.batch_out(flat, x.unsqueeze(0)).squeeze(0)

    def data(self, inputs: Tensor, targets: Tensor | None, loss: str, need_targets: bool = True):
        """Cast and validate; returns (inputs, targets, per-example output shape)."""
        _check_loss(loss)
        x = inputs.to(self.theta.device)
        x = x.to(self.dtype) if x.is_floating_point() else x
        with paused(), torch.no_grad():
            out_shape = self.batch_out(self.theta, x[:1]).shape[1:]
        if loss == "cross_entropy" and len(out_shape) != 1:
            raise ValueError(f"loss 'cross_entropy' needs logits of shape (N, C), got (N, *{tuple(out_shape)})")
        if not need_targets:
            return x, None, out_shape
        if targets is None:
            raise ValueError("targets are required for this matrix")
        if targets.shape[:1] != x.shape[:1]:
            raise ValueError(f"batch sizes differ: inputs {tuple(x.shape)}, targets {tuple(targets.shape)}")
        y = targets.to(self.theta.device)
        if loss == "cross_entropy":
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
                raise ValueError("loss 'cross_entropy' needs integer class labels of shape (N,), "
                                 f"got dtype {y.dtype}, shape {tuple(y.shape)}")
            if y.numel() and (y.min() < 0 or y.max() >= out_shape[0]):
                raise ValueError(f"class labels must lie in [0, {out_shape[0]}), got [{y.min()}, {y.max()}]")
        else:
            if y.shape[1:] != out_shape:
                raise ValueError(f"loss 'mse' needs targets of the output shape (N, *{tuple(out_shape)}), "
                                 f"got {tuple(y.shape)}")
            y = y.to(self.dtype)
        return x, y, out_shape

    def chunks(self, n: int, per_example: int):
        size = max(1, _BUDGET // max(1, per_example * self.P))
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _example_loss(loss: str, f: Tensor, y: Tensor) -> Tensor:
    """l_n for one example, computed by the same torch function a user calls."""
    if loss == "cross_entropy":
        return F.cross_entropy(f.unsqueeze(0), y.unsqueeze(0))
    return F.mse_loss(f, y)


def _with_aux(fn):
    def wrapped(*args):
        out = fn(*args)
        return out, out
    return wrapped


def ggn(model: nn.Module, inputs: Tensor, targets: Tensor, loss: str = "cross_entropy",
        params: list[str] | None = None) -> Tensor:
    """Generalized Gauss-Newton ``G = (1/N) sum_n J_n^T H_n J_n`` of the mean loss (P x P).

    ``J_n`` is the per-example Jacobian of the flattened output (vmap over jacrev); ``H_n`` is the Hessian
    of ``l_n`` w.r.t. ``f_n``, computed by autodiff (CE: ``diag(p) - p p^T``; MSE: ``(2/D) I``).
    """
    prob = _Problem(model, params)
    x, y, out_shape = prob.data(inputs, targets, loss)
    n, d, P = x.shape[0], out_shape.numel(), prob.P
    jac = vmap(jacrev(_with_aux(prob.example_out), has_aux=True), in_dims=(None, 0))
    out_hess = vmap(jacrev(jacrev(lambda f, t: _example_loss(loss, f, t))))  # no forward AD (see hessian)
    G = prob.theta.new_zeros(P, P)
    with paused():
        for sl in prob.chunks(n, d):
            J, f = jac(prob.theta, x[sl])
            J = J.reshape(-1, d, P)
            H = out_hess(f, y[sl]).reshape(-1, d, d)
            G += J.reshape(-1, P).T @ (H @ J).reshape(-1, P)
    return G / n


def fisher(model: nn.Module, inputs: Tensor, loss: str = "cross_entropy",
           params: list[str] | None = None) -> Tensor:
    """True Fisher ``F = (1/N) sum_n E_{yhat ~ p(.|x_n)} [grad l(f_n, yhat) grad l(f_n, yhat)^T]``, exact.

    CE: the expectation is enumerated over all C classes, weighted by ``p_c = softmax(f_n)_c``, with the
    per-example, per-class gradients ``grad_theta log softmax(f_n)_c`` (no sampling, no use of the GGN code).
    MSE: the likelihood is the Gaussian ``yhat ~ N(f_n, sigma^2 I)`` with ``sigma^2 = D/2`` (its negative
    log-likelihood is ``l_n`` up to a constant), whose Fisher is analytically ``(1/N) sum_n J_n^T (2/D) J_n``
    -- equal to the GGN.
    """
    prob = _Problem(model, params)
    x, _, out_shape = prob.data(inputs, None, loss, need_targets=False)
    n, d, P = x.shape[0], out_shape.numel(), prob.P
    if loss == "cross_entropy":
        fn = _with_aux(lambda flat, xn: torch.log_softmax(prob.example_out(flat, xn), dim=-1))
    else:
        fn = _with_aux(lambda flat, xn: prob.example_out(flat, xn).reshape(-1))
    jac = vmap(jacrev(fn, has_aux=True), in_dims=(None, 0))
    Fm = prob.theta.new_zeros(P, P)
    with paused():
        for sl in prob.chunks(n, d):
            J, out = jac(prob.theta, x[sl])  # (B, d, P)
            if loss == "cross_entropy":
                A = out.exp().sqrt().unsqueeze(-1) * J  # sqrt(p_c) * grad log p_c
            else:
                A = (2.0 / d) ** 0.5 * J
            A = A.reshape(-1, P)
            Fm += A.T @ A
    return Fm / n


def empirical_fisher(model: nn.Module, inputs: Tensor, targets: Tensor, loss: str = "cross_entropy",
                     params: list[str] | None = None) -> Tensor:
    """Empirical Fisher ``E = (1/N) sum_n grad l_n grad l_n^T`` with the real targets (vmap over grad)."""
    prob = _Problem(model, params)
    x, y, _ = prob.data(inputs, targets, loss)
    n, P = x.shape[0], prob.P
    per_grad = vmap(grad(lambda flat, xn, yn: _example_loss(loss, prob.example_out(flat, xn), yn)),
                    in_dims=(None, 0, 0))
    E = prob.theta.new_zeros(P, P)
    with paused():
        for sl in prob.chunks(n, 1):
            g = per_grad(prob.theta, x[sl], y[sl])
            E += g.T @ g
    return E / n


def hessian(model: nn.Module, inputs: Tensor, targets: Tensor, loss: str = "cross_entropy",
            params: list[str] | None = None) -> Tensor:
    """Hessian ``d^2 L / d theta^2`` of the mean loss on the full batch (reverse-over-reverse, 128 rows at a time)."""
    prob = _Problem(model, params)
    x, y, _ = prob.data(inputs, targets, loss)
    lossfn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    # reverse-over-reverse: forward-over-reverse (jvp of grad) of F.mse_loss fails in torch 2.13
    # ("ZeroTensors are immutable") and emits torch.jit deprecation warnings.
    g = grad(lambda flat: lossfn(prob.batch_out(flat, x), y))
    with paused():
        return jacrev(g, chunk_size=128)(prob.theta)


def exact_matrix(kind: str, model: nn.Module, inputs: Tensor, targets: Tensor | None,
                 loss: str = "cross_entropy", params: list[str] | None = None) -> Tensor:
    """Dispatch on ``kind`` in ``KINDS`` ("ggn", "fisher", "empirical", "hessian"); "fisher" ignores targets."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    _check_loss(loss)
    if kind == "fisher":
        return fisher(model, inputs, loss, params)
    fn = {"ggn": ggn, "empirical": empirical_fisher, "hessian": hessian}[kind]
    return fn(model, inputs, targets, loss, params)


def parameter_layout(model: nn.Module) -> list[tuple[str, str, slice]]:
    """``(module_name, param_name, slice)`` for every trainable parameter, in flat-vector order.

    ``module_name`` is the owner's name in ``model.named_modules()`` ("" for the root), ``param_name`` the
    attribute name (e.g. "weight"); tied parameters appear once, under their first name.
    """
    layout, start = [], 0
    for full, p in model.named_parameters():
        if p.requires_grad:
            owner, _, local = full.rpartition(".")
            layout.append((owner, local, slice(start, start + p.numel())))
            start += p.numel()
    return layout


def _block_indices(model: nn.Module, modules: list[str] | None) -> dict[str, Tensor]:
    where, start = {}, 0
    for _, p in model.named_parameters():
        if p.requires_grad:
            where[id(p)] = torch.arange(start, start + p.numel())
            start += p.numel()
    index = {}
    for name, m in model.named_modules():
        own = [where[id(p)] for p in m.parameters(recurse=False) if id(p) in where]
        if own:
            index[name] = torch.cat(own)
    if modules is not None:
        unknown = [name for name in modules if name not in index]
        if unknown:
            raise ValueError(f"unknown module names {unknown}; valid: {list(index)}")
        index = {name: index[name] for name in modules}
    return index


def module_blocks(matrix: Tensor, model: nn.Module, modules: list[str] | None = None) -> dict[str, Tensor]:
    """Diagonal blocks of a P x P matrix (full flat layout of ``model``) per module owning parameters.

    Keyed by name in ``model.named_modules()``; each block is indexed in the order of
    ``cat([p.reshape(-1) for p in module.parameters(recurse=False)])`` (e.g. weight, then bias).
    """
    index = _block_indices(model, modules)
    P = sum(sl.stop - sl.start for _, _, sl in parameter_layout(model))
    if matrix.shape != (P, P):
        raise ValueError(f"matrix has shape {tuple(matrix.shape)}, expected ({P}, {P}) for this model")
    return {name: matrix[idx.to(matrix.device)[:, None], idx.to(matrix.device)] for name, idx in index.items()}


def exact_blocks(kind: str, model: nn.Module, inputs: Tensor, targets: Tensor | None,
                 loss: str = "cross_entropy", modules: list[str] | None = None) -> dict[str, Tensor]:
    """``module_blocks(exact_matrix(kind, model, inputs, targets, loss), model, modules)``."""
    _block_indices(model, modules)  # fail on unknown names before the expensive part
    return module_blocks(exact_matrix(kind, model, inputs, targets, loss), model, modules)
