"""Numerics policy for factor inversions (ALGORITHMS.md 1.1 pitfalls, 7.1 precision).

Every inversion goes through the same ladder, and what fired is reported, never hidden:

1. symmetrize ``(M + M^T)/2`` and Cholesky-factorize in the statistics dtype (``cholesky_ex``);
2. on failure retry in float64;
3. then add jitter ``eps * mean(diag) * 10^k`` (k = 0..4) in float64;
4. then an eigendecomposition with eigenvalues clamped to ``>= floor``;
5. if the result is still not finite: :class:`FactorizationError` naming the layer.

Steps 2-4 are recorded as :class:`NumericsEvent` (logged as a warning and kept by the optimizer).
:func:`batched_cholesky` applies the same ladder to a batch of small blocks (only the failing ones are retried).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("curvlab")


class FactorizationError(RuntimeError):
    """No inverse could be formed even after every fallback; the message names the layer."""


@dataclass(frozen=True)
class NumericsEvent:
    layer: str
    what: str

    def __str__(self) -> str:
        return f"{self.layer}: {self.what}"


def symmetrize(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.transpose(-1, -2))


def add_diagonal(m: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
    """``m + value * I`` without touching ``m`` (damping is never stored into statistics)."""
    out = m.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(value)
    return out


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def spd_inverse(m: torch.Tensor, layer: str, events: list[NumericsEvent] | None = None,
                jitter: float = 1e-10) -> torch.Tensor:
    """Inverse of the symmetric positive (semi-)definite ``m`` following the ladder above.

    Returns a tensor in ``m``'s dtype. ``events`` collects what fell back.
    """
    if not _finite(m):
        raise FactorizationError(f"layer {layer!r}: matrix to invert contains NaN/Inf")
    dtype = m.dtype
    s = symmetrize(m)
    chol, info = torch.linalg.cholesky_ex(s)
    if int(info.max()) == 0:
        inv = torch.cholesky_inverse(chol)
        if _finite(inv):
            return inv

    def note(what: str) -> None:
        ev = NumericsEvent(layer, what)
        log.warning("curvlab numerics: %s", ev)
        if events is not None:
            events.append(ev)

    s64 = s.double()
    chol, info = torch.linalg.cholesky_ex(s64)
    if int(info.max()) == 0:
        note(f"Cholesky failed in {dtype}, succeeded in float64")
        return torch.cholesky_inverse(chol).to(dtype)
    scale = float(s64.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(1e-30))
    for k in range(5):
        eps = jitter * scale * 10.0 ** k
        chol, info = torch.linalg.cholesky_ex(add_diagonal(s64, eps))
        if int(info.max()) == 0:
            note(f"Cholesky failed; succeeded in float64 with jitter {eps:.3g}")
            return torch.cholesky_inverse(chol).to(dtype)
    evals, evecs = torch.linalg.eigh(s64)
    floor = max(jitter * scale, 1e-30)
    inv = (evecs * (1.0 / evals.clamp_min(floor)).unsqueeze(-2)) @ evecs.transpose(-1, -2)
    if not _finite(inv):
        raise FactorizationError(
            f"layer {layer!r}: could not invert its curvature factor (Cholesky, float64, jitter and "
            "eigendecomposition all failed); increase `damping`"
        )
    note(f"Cholesky failed even with jitter; used eigendecomposition with eigenvalues clamped at {floor:.3g}")
    return inv.to(dtype)


def psd_eigh(m: torch.Tensor, layer: str, events: list[NumericsEvent] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD matrix, eigenvalues clamped at 0; float64 retry on failure."""
    if not _finite(m):
        raise FactorizationError(f"layer {layer!r}: matrix to decompose contains NaN/Inf")
    s = symmetrize(m)
    try:
        evals, evecs = torch.linalg.eigh(s)
    except RuntimeError:
        evals, evecs = torch.linalg.eigh(s.double())
        evals, evecs = evals.to(m.dtype), evecs.to(m.dtype)
        ev = NumericsEvent(layer, f"eigh failed in {m.dtype}, succeeded in float64")
        log.warning("curvlab numerics: %s", ev)
        if events is not None:
            events.append(ev)
    return evals.clamp_min(0.0), evecs


def batched_cholesky(m: torch.Tensor, layer: str, events: list[NumericsEvent] | None = None,
                     jitter: float = 1e-10) -> torch.Tensor:
    """Lower factors ``L`` with ``L L^T = m_b`` for the SPD blocks ``m`` ``(B, k, k)``, by one batched Cholesky.

    Blocks that fail go through the ladder of :func:`curvlab.linalg.spd_inverse` (float64; jitter
    ``jitter * mean diag * 10^j``, the mean over all blocks as the layer's scale; eigendecomposition with
    eigenvalues clamped at ``jitter * mean diag``, refactored as ``L = R^T`` from ``QR(diag(sqrt e) Q^T)``),
    reported as one :class:`NumericsEvent`."""
    chol, info = torch.linalg.cholesky_ex(m)            # reads the lower triangle only: no symmetrization needed
    bad = (info != 0) | ~torch.isfinite(chol.diagonal(dim1=-2, dim2=-1)).all(1)   # NaN/Inf reach the diagonal
    if not bool(bad.any()):
        return chol
    which = bad.nonzero().squeeze(1)
    sub = symmetrize(m[which].double())
    if not bool(torch.isfinite(sub).all()):
        raise FactorizationError(f"layer {layer!r}: mini-blocks to invert contain NaN/Inf")
    scale = max(float(m.diagonal(dim1=-2, dim2=-1).double().abs().mean()), 1e-30)
    out = torch.empty_like(sub)
    todo = torch.ones(len(which), dtype=torch.bool, device=m.device)
    counts = []
    for j in range(-1, 5):
        if not bool(todo.any()):
            break
        fac, info = torch.linalg.cholesky_ex(add_diagonal(sub[todo], 0.0 if j < 0 else jitter * scale * 10.0 ** j))
        ok = info == 0
        pos = todo.nonzero().squeeze(1)[ok]
        out[pos], todo[pos] = fac[ok], False
        counts.append(len(pos))
    if bool(todo.any()):
        evals, evecs = torch.linalg.eigh(sub[todo])
        root = evals.clamp_min(jitter * scale).sqrt().unsqueeze(-1) * evecs.transpose(-1, -2)
        r = torch.linalg.qr(root).R
        out[todo] = (r * torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-1)).transpose(-1, -2)
    if not bool(torch.isfinite(out).all()):
        raise FactorizationError(f"layer {layer!r}: could not factorize {len(which)} mini-blocks (Cholesky, float64, "
                                 "jitter and eigendecomposition all failed); increase `damping`")
    chol[which] = out.to(chol.dtype)
    ev = NumericsEvent(layer, f"{len(which)}/{m.shape[0]} mini-blocks of size {m.shape[-1]} failed Cholesky in "
                              f"{m.dtype}: {counts[0]} succeeded in float64, {sum(counts[1:])} with jitter, "
                              f"{int(todo.sum())} by eigendecomposition (eigenvalues clamped)")
    log.warning("curvlab numerics: %s", ev)
    if events is not None:
        events.append(ev)
    return chol


def chol_solve(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^-1 x`` for every block: ``chol`` ``(B, k, k)``, ``rhs`` ``(B, k)``."""
    y = torch.linalg.solve_triangular(chol, rhs.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(chol.transpose(-1, -2), y, upper=True).squeeze(-1)
