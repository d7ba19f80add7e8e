"""Numerics policy for factor inversions (ALGORITHMS.md 1.1 pitfalls, 7.1 precision).

Every inversion goes through the same ladder, and what fired is reported, never hidden:

1. symmetrize ``(M + M^T)/2`` and Cholesky-factorize in the statistics dtype (``cholesky_ex``);
2. on failure retry in float64;
3. then add jitter ``eps * mean(diag) * 10^k`` (k = 0..4) in float64;
4. then an eigendecomposition with eigenvalues clamped to ``>= floor``;
5. if the result is still not finite: :class:`FactorizationError` naming the layer.

Steps 2-4 are recorded as :class:`NumericsEvent` (logged as a warning and kept by the optimizer).
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
