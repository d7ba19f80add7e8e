"""The quadratic model of the current batch (Martens & Grosse, ICML 2015, sections 6-7; ALGORITHMS.md section 10).

With ``h`` the user's mean loss on the step's batch, ``g = grad h`` (plus ``eta theta`` for a coupled L2 term),
``F`` the EXACT Fisher / GGN of the batch (equal for the mean-reduced cross-entropy and MSE), ``lambda`` the
damping and ``eta`` the weight decay when it is part of the objective::

    (Q.1) M(delta) - M(0) = g^T delta + 1/2 delta^T (F + (lambda + eta) I) delta
    (Q.2) rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0))
    (Q.4) delta = alpha Delta + mu delta0 minimizing M:  A [alpha, mu]^T = -[g^T Delta, g^T delta0]^T,
          A_ij = v_i^T F v_j + c v_i^T v_j  (v = (Delta, delta0), c = lambda + eta);  at the optimum
          M(delta) - M(0) = 1/2 [alpha, mu] . [g^T Delta, g^T delta0]
    (Q.5) u^T F v = (J u)^T H_L (J v)

(Q.5) needs no backward pass: ``J u`` is a forward-mode derivative (:func:`torch.func.jvp` through
:func:`torch.func.functional_call` of the model), batched over the directions with :func:`torch.func.vmap`
(one forward-mode pass for all of them), and ``H_L`` is the loss Hessian with respect to the model output ``f``
in closed form. The output has shape ``(N, C)`` or ``(N, *rows, C)``, classes / features LAST, and the user's
loss is the MEAN over all rows (cross-entropy, ``F.cross_entropy(f.reshape(-1, C), y.reshape(-1))``) or over all
entries (``F.mse_loss``), as everywhere in curvlab (:mod:`curvlab.losses`)::

    cross-entropy:  H_L = (1 / N_rows) blockdiag_rows( diag(p) - p p^T ),   p = softmax(f_row)
    MSE:            H_L = (2 / N_entries) I

computed as ``(J u)^T H_L (J v) = sum_rows <B a_u, B a_v> / N_rows`` with ``B a = sqrt(p) * (a - <p, a>)``
(``B^T B = diag(p) - p p^T``), so the Gram matrix of the directions is symmetric positive semi-definite by
construction. ``N_rows`` / ``N_entries`` count every training pass of the step: micro-batches are weighted as
the mean loss weights them (each micro-batch's mean loss times ``N_m / N_step``, the capture contract's
convention), so the products are those of the whole step's batch.

What is recorded (the capture contract of :mod:`curvlab.capture`): a forward hook on the model keeps detached
references to the inputs (positional and keyword) of every forward run with grad enabled, outside
:func:`curvlab.capture.paused`; a tensor hook on its output marks the pass as a TRAINING pass when the backward
running then accumulates into the ``.grad`` of the optimized parameters
(:func:`curvlab.capture.accumulates_into`). Only training passes enter the model; ``torch.autograd.grad``,
``backward(inputs=...)`` elsewhere and forwards never back-propagated are ignored. The optimizer drops the
records after every ``step()`` and its ``zero_grad()`` discards those of training passes (their gradients are
gone too).

How the forward-mode pass is run: inside :func:`curvlab.capture.paused` (curvlab's hooks record nothing), on a
hook-free structural copy of the model (:func:`curvlab.exact._hookless_copy`: forward pre-hooks kept, tensors
shared) with the live parameters and buffers passed to ``functional_call``, each module's ``training`` flag
mirrored from the model. Batch-norm layers in training mode use the batch statistics without updating the
running ones (the pass has no side effect on buffers); the random state of the training forward is replayed
(CPU, and CUDA for CUDA inputs), so dropout draws the same masks when the kernels draw identically; attention
runs the math kernel of ``scaled_dot_product_attention`` and torch's MHA fast path is off during the pass (the
fused kernels have no forward-mode derivative). Data parallel (:mod:`curvlab.distributed`): each rank's sums and
row counts are all-reduced, so the products are those of the concatenated batch.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .capture import accumulates_into, is_paused, paused
from .losses import check_output, check_output_gradients

__all__ = ["QuadraticModel", "loss_hessian_gram", "solve_step", "model_change", "reduction_ratio", "LOSSES"]

LOSSES = ("cross_entropy", "mse")


def loss_hessian_gram(loss: str, f: Tensor, jv: Tensor) -> tuple[Tensor, int]:
    """``(S, n)``: ``S_ij = sum_rows (J v_i)^T H_row (J v_j)`` unnormalized, and the normalizer ``n`` (rows for
    cross-entropy, entries for MSE) -- ``S / n`` is ``V^T F V`` of one pass (module doc, eq. Q.5).

    ``f``: the model output ``(N, ..., C)``; ``jv``: the directional derivatives ``(k, N, ..., C)``.
    """
    k = jv.shape[0]
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    if loss == "cross_entropy":
        check_output(loss, f)
        classes = f.shape[-1]
        p = torch.softmax(f.reshape(-1, classes).to(acc), dim=-1)
        a = jv.reshape(k, -1, classes).to(acc)
        b = p.sqrt() * (a - (a * p).sum(-1, keepdim=True))             # B a,  B^T B = diag(p) - p p^T
        flat = b.reshape(k, -1)
        return (flat @ flat.T).double(), p.shape[0]
    if loss == "mse":
        flat = jv.reshape(k, -1).to(acc)
        return (2.0 * (flat @ flat.T)).double(), f.numel()
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def solve_step(A: Sequence[Sequence[float]], b: Sequence[float], rtol: float = 1e-12
               ) -> tuple[list[float], str | None]:
    """Minimize ``b^T x + 1/2 x^T A x`` over ``x`` (eq. Q.4), ``A`` 1x1 or 2x2. Returns ``(x, fallback)``.

    ``fallback`` is ``None`` (the minimizer), ``"singular"`` (a 2x2 ``A`` whose determinant is not above
    ``rtol * A00 * A11``, i.e. the two directions are collinear in the ``A`` metric: the 1x1 solution along the
    first direction, ``mu = 0``) or ``"curvature"`` (``A00`` not positive or not finite: no curvature along the
    first direction; ``x = (1, 0)``, the plain proposal).
    """
    k = len(b)
    a00 = float(A[0][0])
    values = [float(v) for row in A for v in row] + [float(v) for v in b]
    if not (all(math.isfinite(v) for v in values) and a00 > 0):
        return [1.0] + [0.0] * (k - 1), "curvature"
    alpha_only = [-float(b[0]) / a00] + [0.0] * (k - 1)
    if k == 1:
        return alpha_only, None
    a11, a01 = float(A[1][1]), 0.5 * (float(A[0][1]) + float(A[1][0]))
    det = a00 * a11 - a01 * a01
    if not (a11 > 0 and det > rtol * a00 * a11):
        return alpha_only, "singular"
    b0, b1 = float(b[0]), float(b[1])
    return [(a01 * b1 - a11 * b0) / det, (a01 * b0 - a00 * b1) / det], None


def model_change(A: Sequence[Sequence[float]], b: Sequence[float], x: Sequence[float], scale: float = 1.0) -> float:
    """``M(s delta) - M(0) = s b^T x + s^2/2 x^T A x`` for ``delta = sum_i x_i v_i`` (eq. Q.1 in the basis v)."""
    lin = sum(float(bi) * xi for bi, xi in zip(b, x))
    quad = sum(x[i] * float(A[i][j]) * x[j] for i in range(len(x)) for j in range(len(x)))
    return scale * lin + 0.5 * scale * scale * quad


def reduction_ratio(h_before: float, h_after: float, predicted: float) -> float:
    """Eq. Q.2: ``rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0))``; NaN when the model predicts no
    decrease (``predicted >= 0`` or not finite), ``-inf`` when the new loss is not finite."""
    if not (math.isfinite(predicted) and predicted < 0):
        return math.nan
    if not math.isfinite(h_after):
        return -math.inf
    return (h_after - h_before) / predicted


@dataclass(eq=False)
class _Pass:
    """One forward of the model: its (detached) inputs and random state; training or not."""

    args: tuple
    kwargs: dict
    rng: tuple[Tensor, torch.device | None, Tensor | None]
    trained: bool = False
    batch_size: int = 0
    output_grad: Tensor | None = None       # dL/df of the training loss, for the loss check only


def _detach(obj: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, obj)


def _first_device(obj: Any) -> torch.device | None:
    found: list[torch.device] = []
    tree_map(lambda t: found.append(t.device) if isinstance(t, Tensor) and not found else None, obj)
    return found[0] if found else None


@contextlib.contextmanager
def _forward_mode_kernels():
    """Kernels with forward-mode derivatives: SDPA math backend, torch's MHA fast path off (restored after)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


class QuadraticModel:
    """Exact curvature-vector products ``u^T F v`` of the step's batch (module doc, eq. Q.5).

    Standalone use (the optimizer builds one for ``rule="qmodel"`` and ``damping_adapt="lm"``)::

        qm = QuadraticModel(model, loss="mse")
        F.mse_loss(model(x), y).backward()          # a training pass: recorded
        G = qm.gram([u, v])                         # 2x2 float64: G[i, j] = u_i^T F u_j
        qm.clear()                                  # forget the recorded passes (the optimizer does it each step)

    Directions are mappings ``{parameter: tensor shaped like it}`` (missing parameters count as zero).
    ``params``: the parameters whose ``.grad`` makes a backward a training pass and along which directions may
    point (default: every trainable parameter of ``model``). ``active()`` (default: always) says whether a
    forward should be recorded now. ``dist`` (:class:`curvlab.distributed.DataParallel`) all-reduces the sums.
    """

    def __init__(self, model: nn.Module, loss: str = "cross_entropy", params: Sequence[Tensor] | None = None, *,
                 active: Callable[[], bool] | None = None, dist: Any = None) -> None:
        if loss not in LOSSES:
            raise ValueError(f"QuadraticModel: loss must be one of {LOSSES}, got {loss!r}")
        self.model, self.loss, self.dist = model, loss, dist
        self.active = active or (lambda: True)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = list(params) if params is not None else [p for _, p in named]
        names = {id(p): n for n, p in named}
        missing = [i for i, p in enumerate(self.params) if id(p) not in names]
        if missing:
            raise ValueError(f"QuadraticModel: params {missing} are not trainable parameters of the model")
        self._names = [(names[id(p)], p) for p in self.params]
        #: check the training loss against ``loss`` once (curvlab.losses.check_output_gradients)
        self.check_loss = True
        self._passes: list[_Pass] = []
        self._depth = 0
        self._rng: tuple | None = None
        self._net: nn.Module | None = None
        self._handles = [model.register_forward_pre_hook(self._pre_hook),
                         model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)]

    # -- recording ---------------------------------------------------------------------------------------------
    def _wanted(self) -> bool:
        return torch.is_grad_enabled() and not is_paused() and self.active()

    def _pre_hook(self, module, args):
        if module is not self.model:                  # the hook-free copy keeps pre-hooks
            return
        if self._depth == 0:
            self._rng = None
            if self._wanted():
                dev = _first_device(args)
                cuda = dev is not None and dev.type == "cuda"
                self._rng = (torch.get_rng_state(), dev if cuda else None,
                             torch.cuda.get_rng_state(dev) if cuda else None)
        self._depth += 1

    def _post_hook(self, module, args, kwargs, out):
        if module is not self.model:
            return
        self._depth = max(self._depth - 1, 0)
        if self._depth or self._rng is None:
            return
        rng, self._rng = self._rng, None
        if not (isinstance(out, Tensor) and out.requires_grad and self._wanted()):
            return
        run = _Pass(_detach(args), _detach(kwargs), rng, batch_size=out.shape[0] if out.dim() else 1)
        self._passes.append(run)
        out.register_hook(self._grad_hook(run))

    def _grad_hook(self, run: _Pass):
        def hook(grad):
            if accumulates_into(self.params):
                run.trained = True
                if self.check_loss:
                    g = grad.detach()
                    run.output_grad = g if run.output_grad is None else run.output_grad + g
        return hook

    def passes(self) -> list[_Pass]:
        """The training passes recorded since the last :meth:`clear`."""
        return [run for run in self._passes if run.trained]

    def discard(self) -> None:
        """Forget the training passes (``optimizer.zero_grad()``); forwards not back-propagated yet are kept."""
        self._passes = [run for run in self._passes if not run.trained]

    def clear(self) -> None:
        """Forget every recorded pass (after each ``step()``)."""
        self._passes = []
        self._depth = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    # -- products ------------------------------------------------------------------------------------------------
    def _copy(self) -> nn.Module:
        from .exact import _hookless_copy

        if self._net is None:
            with paused():
                self._net = _hookless_copy(self.model)
        for mine, theirs in zip(self._net.modules(), self.model.modules()):
            mine.training = theirs.training
            if isinstance(mine, nn.modules.batchnorm._BatchNorm):
                # training mode: batch statistics, running ones neither read nor updated (no side effect)
                mine.track_running_stats = theirs.track_running_stats and not theirs.training
        return self._net

    def _jvp(self, run: _Pass, tangents: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        from torch.func import functional_call, jvp, vmap

        net = self._copy()
        primals = {n: p.detach() for n, p in self._names}
        consts = {n: p.detach() for n, p in self.model.named_parameters() if n not in primals}
        consts.update(dict(self.model.named_buffers()))

        def f(ps):
            return functional_call(net, {**consts, **ps}, run.args, run.kwargs)

        cpu, dev, cuda = run.rng
        with torch.random.fork_rng(devices=[dev] if dev is not None else []):
            torch.set_rng_state(cpu)
            if dev is not None:
                torch.cuda.set_rng_state(cuda, dev)
            with warnings.catch_warnings():     # torch loads its forward-AD decompositions through torch.jit once
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
                return vmap(lambda t: jvp(f, (primals,), (t,)), randomness="same", out_dims=(None, 0))(tangents)

    def gram(self, directions: Sequence[Mapping[Tensor, Tensor]]) -> Tensor:
        """``G[i, j] = d_i^T F d_j`` (float64, ``k x k``) over the step's training passes: eq. Q.5, one batched
        forward-mode pass per recorded forward for all ``k`` directions."""
        runs = self.passes()
        if not runs and not (self.dist is not None and self.dist.active):
            raise RuntimeError(
                "the quadratic model (rule='qmodel', damping_adapt) saw no training pass of the model since the last "
                "step: it replays the model's forward on the inputs of the forwards whose backward reached .grad. "
                "Call the model itself (its forward hooks record the inputs), with grad enabled and outside "
                "curvlab.capture.paused(), then loss.backward(), then opt.step()")
        k = len(directions)
        tangents = {}
        for name, p in self._names:
            rows = [d.get(p) for d in directions]
            tangents[name] = torch.stack([torch.zeros_like(p) if t is None else t.to(p.dtype) for t in rows])
        total = torch.zeros(k, k, dtype=torch.float64, device=self.params[0].device)
        count = 0.0
        n_step = sum(run.batch_size for run in runs)
        with paused(), torch.no_grad(), _forward_mode_kernels():
            for run in runs:
                try:
                    f, jv = self._jvp(run, tangents)
                except (RuntimeError, NotImplementedError) as exc:
                    raise RuntimeError(
                        f"the quadratic model (rule='qmodel', damping_adapt) needs forward-mode derivatives "
                        f"(torch.func.jvp) of the model, which failed: {type(exc).__name__}: {exc}. Use the "
                        "natural rule with fixed damping for this model, or replace the module without a forward-mode "
                        "derivative") from exc
                if self.check_loss and run.output_grad is not None:
                    check_output_gradients(self.loss, f, run.output_grad * n_step, loss_used=True)
                    self.check_loss = False
                s, n = loss_hessian_gram(self.loss, f, jv)
                total += s
                count += n
        if self.dist is not None and self.dist.active:
            buf = torch.cat([total.reshape(-1), total.new_tensor([count])]).to(self.dist.device)
            self.dist._all_reduce(buf, "qmodel")
            total, count = buf[:-1].reshape(k, k).to(total.device), float(buf[-1])
            if count == 0:
                raise RuntimeError("the quadratic model saw no training pass on any rank since the last step")
        return total / count
