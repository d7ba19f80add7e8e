"""Output-side vectors for the Fisher types (ALGORITHMS.md section 0, eq. 0.1-0.4; K-FAC eq. K.3; section 11).

The model output ``f`` has shape ``(N, C)`` or ``(N, *rows, C)``: the LAST dimension holds the classes (logits)
or the regression features, and every row (the middle dimensions, ``R_out`` of them, a position of a sequence)
carries one loss term of the user's MEAN loss (torch's reductions):

* ``cross_entropy``: ``l_row = -log softmax(f_row)[y_row]`` (``F.cross_entropy(f.reshape(-1, C), y.reshape(-1))``);
* ``mse``: ``l_row = (1/C) ||f_row - y_row||^2`` (``F.mse_loss(f, y)`` averages over every entry).

``loss_terms_per_example`` (``L``; default ``R_out``) groups each example's rows into ``L`` terms of
``m = R_out / L`` consecutive rows, ``l_term = (1/m) sum_rows l_row``: the user's loss is the mean over the
``N L`` terms whatever ``L`` (it changes only K-FAC's normalization and how type-2 columns are merged). The
vectors ``v`` are at the scale of ONE loss term (no 1/N, no 1/L) with ``E[v v^T] = H_term`` on each term:

* type2 (exact factorization of each term's Hessian, Martens & Grosse 2015 sec. 5 "KFLR"), columns merged across
  the terms of all examples (one backward each, as curvlinops' ``KFACLinearOperator``): for row ``j`` of a term
  and class ``c``, ``v[row] = sqrt(1/m) S_row[:, c]`` on the rows ``row = j mod m``, 0 elsewhere, with
  CE ``S[:, c] = sqrt(p_c) (e_c - p)``; MSE ``S = sqrt(2/C) I``. Exact for position-wise models; with positions
  mixed, merged columns add cross-term products (the K-FAC-expand approximation);
* mc (true Fisher by sampling, K-FAC's default): CE ``v_row = sqrt(1/m) (p - e_yhat)`` with ``yhat ~ Cat(p)``
  drawn per row; MSE: the Gaussian ``N(f, (C/2) I)`` whose NLL is ``l_row`` + const, ``v = sqrt(2/(m C)) eps``.

For ``(N, C)`` outputs (``R_out = L = m = 1``) these are the per-example vectors of the plain formulas.
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
    if loss == "cross_entropy" and out.dim() < 2:
        raise ValueError(
            f"loss='cross_entropy' expects model outputs of shape (N, C) or (N, ..., C) (logits, classes last), "
            f"got {tuple(out.shape)}"
        )


def loss_terms(out: torch.Tensor, per_example: int | None = None) -> tuple[int, int]:
    """``(L, m)``: loss terms per example and rows per term of an output ``(N, *rows, C)`` (module docstring)."""
    rows = out[0].numel() // out.shape[-1] if out.dim() >= 2 else 1
    terms = rows if per_example is None else per_example
    if terms < 1 or rows % terms:
        raise ValueError(f"loss_terms_per_example={per_example} must divide the {rows} rows of each example's "
                         f"output {tuple(out.shape[1:])} (the dimensions between the batch and the last)")
    return terms, rows // terms


def output_vectors(loss: str, fisher: str, out: torch.Tensor, mc_samples: int = 1,
                   generator: torch.Generator | None = None,
                   terms_per_example: int | None = None) -> list[tuple[torch.Tensor, float]]:
    """Per-loss-term vectors whose back-propagation gives the output-side curvature statistics.

    ``out`` is the (detached) model output. See the module docstring for the formulas.
    """
    check_output(loss, out)
    shape = out.shape
    out = out.detach()
    if out.dim() == 1:
        out = out.unsqueeze(1)
    _, m = loss_terms(out, terms_per_example)
    classes = out.shape[-1]
    f = out.reshape(out.shape[0], -1, classes)                      # (N, R_out, C)
    row_in_term = torch.arange(f.shape[1], device=f.device) % m
    if fisher == "type2":
        if loss == "cross_entropy":
            p = torch.softmax(f, dim=-1)
            eye = torch.eye(classes, dtype=p.dtype, device=p.device)
            cols = [p[..., c:c + 1].sqrt() * (eye[c] - p) for c in range(classes)]
        elif loss == "mse":
            eye = torch.eye(classes, dtype=f.dtype, device=f.device) * math.sqrt(2.0 / classes)
            cols = [eye[c].expand_as(f) for c in range(classes)]
        else:
            raise ValueError(f"no output vectors for loss={loss!r}")
        vecs = []
        for j in range(m):
            mask = (row_in_term == j).to(f.dtype).reshape(1, -1, 1) / math.sqrt(m)
            vecs += [((col * mask) if m > 1 else col).reshape(shape) for col in cols]
        return [(v, 1.0) for v in vecs]
    if fisher == "mc":
        scale = 1.0 / math.sqrt(m)
        if loss == "cross_entropy":
            # A non-finite output row must not crash the sampler inside backward(): sample that row
            # uniformly; its vector stays non-finite, so the optimizer's statistics check skips the step.
            p = torch.softmax(f, dim=-1).reshape(-1, classes)
            finite = torch.isfinite(p).all(dim=1, keepdim=True)
            sample_from = torch.where(finite, p, torch.ones_like(p)).float()
            vecs = []
            for _ in range(mc_samples):
                yhat = torch.multinomial(sample_from, 1, generator=generator).squeeze(1)
                v = p - torch.nn.functional.one_hot(yhat, classes).to(p.dtype)
                vecs.append(((v * scale if m > 1 else v).reshape(shape), 1.0 / mc_samples))
            return vecs
        if loss == "mse":
            std = math.sqrt(2.0 / classes) * scale
            return [(std * torch.randn(shape, dtype=out.dtype, device=out.device, generator=generator),
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
            "with a mean squared error pass loss='mse', and make the model return the tensor the loss takes"
            + (f". For outputs {tuple(out.shape)} curvlab reads the classes in the LAST dimension (one loss term per "
               "row): torch's F.cross_entropy on (N, C, ...) logits uses dim 1, so return out.movedim(1, -1) and "
               "compute F.cross_entropy(out.reshape(-1, C), y.reshape(-1))" if out.dim() > 2 else ""))
    scale = float(hard.median()) if hard is not None else float(l1.max()) / 2.0
    if (hard is not None and scale > 1.0 + tol and bool(((hard - scale).abs() <= tol * scale).all())) or \
            (hard is None and scale > 1.0 + tol):
        raise LossMismatch(
            f"the training loss is {scale:.4g} times a mean-reduced cross-entropy over the {rows.shape[0]} examples "
            "of the step: reduction='sum' (or a loss multiplied by a constant)? curvlab reads per-example gradients "
            "as N * dL/df (pitfall P0). Use reduction='mean' (the default); when accumulating gradients over k "
            "micro-batches, divide each micro-batch's mean loss by k (by N_step / N_m for unequal sizes)")
