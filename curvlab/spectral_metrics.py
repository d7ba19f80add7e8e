"""Metrics of how well an approximate curvature block ``B`` matches the exact block ``E`` (same index order),
used by :mod:`curvlab.spectra` (which re-exports them) and ``analysis/spectra.py``.

Comparisons (:func:`compare`) of an approximation ``B`` with the exact ``E`` (same index order): relative
Frobenius error, the same after the best scalar fit ``min_c ||cB - E|| / ||E||`` (for surrogates of another
scale, e.g. Shampoo's ``L^1/4 (x) R^1/4``), relative errors of the top-k eigenvalues, and the overlap of the
top-k eigenspaces: ``||Q_B^T Q_E||_F^2 / k`` = mean squared cosine of the principal angles (Bjorck & Golub
1973), 1 for equal subspaces, 0 for orthogonal ones. Eigenspaces are ill-defined where the k-th and
(k+1)-th eigenvalues tie (e.g. ``I (x) A``); the overlap is then basis-dependent.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = ["eigvals", "relative_frobenius_error", "top_eigenvalue_error", "principal_angles", "subspace_overlap",
           "compare"]


def eigvals(matrix: Tensor) -> Tensor:
    """Eigenvalues of a symmetric matrix, DESCENDING, in float64 (the matrix is symmetrized first)."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
    m = matrix.detach().to(torch.float64)
    return torch.linalg.eigvalsh(0.5 * (m + m.T)).flip(0)


def _f64(m: Tensor) -> Tensor:
    m = m.detach().to(torch.float64)
    return 0.5 * (m + m.T)


def _check_pair(B: Tensor, E: Tensor) -> None:
    if B.shape != E.shape or B.dim() != 2 or B.shape[0] != B.shape[1]:
        raise ValueError(f"B and E must be square of the same shape, got {tuple(B.shape)} and {tuple(E.shape)}")


def relative_frobenius_error(B: Tensor, E: Tensor, fit_scale: bool = False) -> float:
    """``||B - E||_F / ||E||_F``; with ``fit_scale`` ``min_c ||c B - E||_F / ||E||_F`` (c = <B,E>/<B,B>)."""
    _check_pair(B, E)
    B, E = B.detach().to(torch.float64), E.detach().to(torch.float64)
    if fit_scale:
        bb = float((B * B).sum())
        B = B * (float((B * E).sum()) / bb if bb > 0 else 0.0)
    return float((B - E).norm() / E.norm())


def _eigh_desc(m: Tensor) -> tuple[Tensor, Tensor]:
    vals, vecs = torch.linalg.eigh(_f64(m))
    return vals.flip(0), vecs.flip(1)


def _eig_error(lb: Tensor, le: Tensor) -> np.ndarray:
    return ((lb - le).abs() / le.abs().clamp_min(torch.finfo(torch.float64).tiny)).numpy()


def _overlap(QB: Tensor, QE: Tensor) -> float:
    return float(torch.linalg.svdvals(QB.T @ QE).pow(2).sum() / QB.shape[1])


def top_eigenvalue_error(B: Tensor, E: Tensor, k: int = 5) -> np.ndarray:
    """``|lambda_i(B) - lambda_i(E)| / |lambda_i(E)|`` for the ``k`` largest eigenvalues (descending)."""
    _check_pair(B, E)
    return _eig_error(eigvals(B)[:k], eigvals(E)[:k])


def principal_angles(QB: Tensor, QE: Tensor) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spans of ``QB`` and ``QE``."""
    return scipy.linalg.subspace_angles(QB.detach().to(torch.float64).numpy(),
                                        QE.detach().to(torch.float64).numpy())[::-1]


def _check_k(k: int, n: int) -> None:
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")


def subspace_overlap(B: Tensor, E: Tensor, k: int = 5) -> float:
    """Overlap of the top-``k`` eigenspaces: ``||Q_B^T Q_E||_F^2 / k`` = mean ``cos^2`` of the principal
    angles, in [0, 1] (1: same subspace, 0: orthogonal)."""
    _check_pair(B, E)
    _check_k(k, B.shape[0])
    return _overlap(_eigh_desc(B)[1][:, :k], _eigh_desc(E)[1][:, :k])


def compare(B: Tensor, E: Tensor, k: int = 5) -> dict[str, Any]:
    """All metrics of ``B`` against ``E``: ``rel_frobenius``, ``rel_frobenius_fitted``, ``top_eig_rel_error``
    (list), ``overlap`` (top-``k`` eigenspaces); ``k`` is capped at the block size. One ``eigh`` per matrix."""
    _check_pair(B, E)
    k = min(k, B.shape[0])
    _check_k(k, B.shape[0])
    (lb, QB), (le, QE) = _eigh_desc(B), _eigh_desc(E)
    return {"rel_frobenius": relative_frobenius_error(B, E),
            "rel_frobenius_fitted": relative_frobenius_error(B, E, fit_scale=True),
            "top_eig_rel_error": _eig_error(lb[:k], le[:k]).tolist(),
            "overlap": _overlap(QB[:, :k], QE[:, :k]), "k": k}
