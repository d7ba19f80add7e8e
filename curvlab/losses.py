"""Output-side vectors for the Fisher types (ALGORITHMS.md section 0, eq. 0.1-0.4; K-FAC eq. K.3).

The user's loss is a torch loss with mean reduction, ``L = (1/N) sum_n l_n``:

* ``cross_entropy``: ``l_n = -log softmax(f_n)[y_n]``, logits ``f_n`` of shape ``(C,)``;
* ``mse``: ``l_n = (1/D) ||f_n - y_n||^2`` (``torch.nn.MSELoss()`` averages over the D output entries too).

For ``fisher="mc"`` and ``fisher="type2"`` the curvature's output factor is built by back-propagating
per-example vectors ``v_n`` (one backward pass each) such that ``E[v_n v_n^T] = H_n``, the Hessian of
``l_n`` with respect to ``f_n``:

* type2 (exact factorization ``H_n = sum_c v_{n,c} v_{n,c}^T``, Martens & Grosse 2015 sec. 5 "KFLR"):
  CE: ``v_{n,c} = sqrt(p_c) (e_c - p)`` for every class c; MSE: ``v_{n,d} = sqrt(2/D) e_d``.
* mc (true Fisher by sampling, K-FAC's default): CE: ``v_n = p - e_yhat`` with ``yhat ~ Cat(p)``;
  MSE: the Gaussian ``N(f_n, (D/2) I)`` whose NLL is ``l_n`` + const, ``v_n = (2/D)(f_n - yhat)``.

Each entry returned is ``(V, weight)``: ``V`` shaped like the model output, ``weight`` the factor of its
outer product in the estimate.
"""
from __future__ import annotations

import math

import torch


def check_output(loss: str, out: torch.Tensor) -> None:
    """Raise a clear error when the model output cannot be the input of ``loss``."""
    if out.dim() < 1 or out.shape[0] == 0:
        raise ValueError(f"the model output has shape {tuple(out.shape)}: expected a non-empty batch")
    if loss == "cross_entropy" and out.dim() != 2:
        raise ValueError(
            f"loss='cross_entropy' expects model outputs of shape (N, C) (logits), got {tuple(out.shape)}; "
            "flatten extra dimensions in the model or use loss='mse'"
        )


def output_vectors(loss: str, fisher: str, out: torch.Tensor, mc_samples: int = 1,
                   generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, float]]:
    """Per-example vectors whose back-propagation gives the output-side curvature statistics.

    ``out`` is the (detached) model output. See the module docstring for the formulas.
    """
    check_output(loss, out)
    out = out.detach()
    n = out.shape[0]
    if loss == "cross_entropy":
        p = torch.softmax(out, dim=1)
        if fisher == "type2":
            eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
            return [(p[:, c:c + 1].sqrt() * (eye[c] - p), 1.0) for c in range(p.shape[1])]
        if fisher == "mc":
            # A non-finite output row must not crash the sampler inside backward(): sample that row
            # uniformly; its vector stays non-finite, so the optimizer's statistics check skips the step.
            finite = torch.isfinite(p).all(dim=1, keepdim=True)
            sample_from = torch.where(finite, p, torch.ones_like(p)).float()
            vecs = []
            for _ in range(mc_samples):
                yhat = torch.multinomial(sample_from, 1, generator=generator).squeeze(1)
                vecs.append((p - torch.nn.functional.one_hot(yhat, p.shape[1]).to(p.dtype), 1.0 / mc_samples))
            return vecs
    elif loss == "mse":
        d = out[0].numel()
        if fisher == "type2":
            scale = math.sqrt(2.0 / d)
            vecs = []
            for j in range(d):
                v = torch.zeros_like(out).reshape(n, d)
                v[:, j] = scale
                vecs.append((v.reshape(out.shape), 1.0))
            return vecs
        if fisher == "mc":
            scale = math.sqrt(2.0 / d)
            return [(scale * torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=generator),
                     1.0 / mc_samples) for _ in range(mc_samples)]
    raise ValueError(f"no output vectors for loss={loss!r}, fisher={fisher!r}")


class LossMismatch(ValueError):
    """The gradients of the training loss contradict the configured ``loss`` (or its mean reduction)."""


def _hard_label_scale(rows: torch.Tensor, p: torch.Tensor, tol: float) -> torch.Tensor | None:
    """Per-row ``c`` with ``rows = c (p - e_y)`` (hard labels), or ``None`` if the rows do not have that form."""
    y = rows.argmin(dim=1, keepdim=True)
    py = p.gather(1, y)
    c = -rows.gather(1, y) / (1.0 - py).clamp_min(1e-6)
    onehot = torch.zeros_like(p).scatter_(1, y, 1.0)
    resid = (rows - c * (p - onehot)).abs().amax(dim=1)
    return c.squeeze(1) if bool((resid <= tol * (1.0 + c.abs().squeeze(1))).all()) else None


def check_output_gradients(loss: str, out: torch.Tensor, rows: torch.Tensor, tol: float = 1e-3,
                           loss_used: bool = True) -> None:
    """Check the per-example output gradients ``rows = N_step dL/df`` of the training loss against ``loss``.

    For a mean-reduced cross-entropy each example's row is ``p - q`` (``p = softmax(f)``, ``q`` the label
    distribution: one-hot, smoothed or soft): it sums to 0 and ``|p - q|_1 <= 2``; with log-probabilities as
    outputs and ``nll_loss`` it is ``-e_y``. A row ``c (p - e_y)`` with the same ``c > 1`` for every example is a
    loss ``c`` times too large (``reduction="sum"``: ``c = N``; micro-batch means summed, not averaged). Raises
    :class:`LossMismatch` naming the argument and the remedy; MSE gradients ``(2/D)(f - y)`` cannot be checked
    without the targets, but a configured ``loss="mse"`` whose rows have exactly the cross-entropy form is caught.
    ``loss_used=False`` (the statistics read only real gradients, never the configured loss): only a
    cross-entropy with a wrong scale is reported.
    """
    if out.dim() < 2 or out.shape[-1] < 2:
        return
    classes = out.shape[-1]
    terms = out[0].numel() // classes                       # loss terms per example (positions), mean over them
    f = out.detach().reshape(-1, classes).double()
    g = rows.detach().reshape(-1, classes).double() * terms
    if not (torch.isfinite(f).all() and torch.isfinite(g).all()):
        return                                              # the non-finite guards of the step handle these
    p = torch.softmax(f, dim=1)
    l1 = g.abs().sum(dim=1)
    sums_zero = bool((g.sum(dim=1).abs() <= tol * (1.0 + l1)).all())
    hard = _hard_label_scale(g, p, tol) if sums_zero else None
    if not loss_used:
        loss = "cross_entropy" if hard is not None else ""
    if loss == "mse":
        if hard is not None and bool(((hard - 1.0).abs() <= tol).all()) and bool((l1 > 0).any()):
            raise LossMismatch("loss='mse' is configured, but the training loss's gradients with respect to the "
                               "model output are exactly those of a mean-reduced cross-entropy on these logits "
                               "(softmax(f) - onehot(y)); pass loss='cross_entropy'")
        return
    if loss != "cross_entropy":
        return
    nll = -g
    if bool((nll >= -tol).all()) and bool(((nll.sum(dim=1) - nll.amax(dim=1)).abs() <= tol * (1 + l1)).all()):
        c = nll.sum(dim=1)                                   # rows -c e_y: nll_loss on log-probabilities
        hard, sums_zero = c, True
        if bool(((c - 1.0).abs() <= tol).all()):
            return
    if not sums_zero:
        raise LossMismatch(
            "loss='cross_entropy' is configured, but the training loss's gradients with respect to the model output "
            "are not those of a cross-entropy on these logits (the rows of dL/df do not sum to zero); if you train "
            "with a mean squared error pass loss='mse', and make the model return the tensor the loss takes")
    scale = float(hard.median()) if hard is not None else float(l1.max()) / 2.0
    if (hard is not None and scale > 1.0 + tol and bool(((hard - scale).abs() <= tol * scale).all())) or \
            (hard is None and scale > 1.0 + tol):
        raise LossMismatch(
            f"the training loss is {scale:.4g} times a mean-reduced cross-entropy over the {rows.shape[0]} examples "
            "of the step: reduction='sum' (or a loss multiplied by a constant)? curvlab reads per-example gradients "
            "as N * dL/df (pitfall P0). Use reduction='mean' (the default); when accumulating gradients over k "
            "micro-batches, divide each micro-batch's mean loss by k (by N_step / N_m for unequal sizes)")
