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
