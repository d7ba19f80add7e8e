"""Curvature spectra: dense and matrix-free eigenvalues of exact curvature matrices and of estimator blocks,
a spectral-density estimate, and metrics of how well an approximation matches the exact block.

Dense (small models): :func:`exact_spectra` (per module block of :func:`curvlab.exact.exact_blocks`, and the
whole matrix), :func:`estimator_blocks` / :func:`estimator_spectra` (``opt.blocks()`` after one forward and
backward and ``opt.update_curvature()``, on an independent hook-free copy of the model).

Matrix-free (large models), each a :class:`scipy.sparse.linalg.LinearOperator` over the flat parameter vector
of :mod:`curvlab.exact` (float64 by default), with the conventions of :mod:`curvlab.exact` (mean loss):

* ``"ggn"``: ``G v = J^T (d^2 L / df^2) (J v)`` -- ``J^T w`` by ``torch.func.vjp``, ``J v`` as the vjp of that
  linear pullback (the "double-vjp" trick: reverse mode only; forward mode ``torch.func.jvp`` would do the
  same but loads TorchScript decompositions that warn in torch 2.13), the output Hessian of the mean loss by
  reverse-over-reverse autodiff
  (Schraudolph 2002, eq. 7; Martens 2010, sec. 4.2);
* ``"fisher"``: the GGN operator. For both curvlab losses the true Fisher EQUALS the GGN (cross-entropy on
  logits is a canonical-link exponential family, Martens 2020 "New insights...", sec. 9.2; MSE with the
  Gaussian of :func:`curvlab.exact.fisher`), which the tests check against the dense ``exact.fisher``;
* ``"empirical"``: ``E v = (1/N) sum_n g_n (g_n^T v)`` from per-example gradients (``vmap(grad)``, in chunks,
  recomputed at each product so that memory stays ``O(chunk * P)``);
* ``"hessian"``: ``H v = grad (grad L . v)`` (Pearlmutter 1994, reverse-over-reverse);
* :func:`estimator_operator`: ``C v`` of one estimator block through ``Unit.mv`` (never forms ``C``).

:func:`top_eigenvalues` runs ARPACK Lanczos (``scipy.sparse.linalg.eigsh``); :func:`spectral_density` is
stochastic Lanczos quadrature (Golub & Meurant 2009; Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao
2019, "An investigation into neural net optimization via Hessian eigenvalue density", sec. 2.2): Rademacher
probes, ``m`` Lanczos steps with full reorthogonalization, nodes = Ritz values, weights = squared first
components of the Ritz vectors, smoothed by a Gaussian.

Comparisons of an approximation with the exact block (:func:`compare` and the single metrics) live in
:mod:`curvlab.spectral_metrics` and are re-exported here.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from . import exact
from .capture import paused
from .exact import _example_loss, _hookless_copy, _Problem
from .spectral_metrics import (compare, eigvals, principal_angles, relative_frobenius_error, subspace_overlap,
                               top_eigenvalue_error)

__all__ = ["eigvals", "exact_spectra", "estimator_blocks", "estimator_spectra", "module_params",
           "curvature_operator", "estimator_operator", "as_operator", "top_eigenvalues", "lanczos",
           "SpectralDensity", "spectral_density", "relative_frobenius_error", "top_eigenvalue_error",
           "principal_angles", "subspace_overlap", "compare", "along_training", "WHOLE"]

WHOLE = "<whole>"  #: key of the whole-matrix spectrum in :func:`exact_spectra`


# ------------------------------------------------------------------------------------------------ dense
def exact_spectra(kind: str, model: nn.Module, inputs: Tensor, targets: Tensor | None,
                  loss: str = "cross_entropy", modules: list[str] | None = None,
                  whole: bool = True) -> dict[str, Tensor]:
    """Descending eigenvalues of each module block of the exact ``kind`` matrix (:mod:`curvlab.exact`), plus
    the whole ``P x P`` matrix under the key :data:`WHOLE` if ``whole``."""
    mat = exact.exact_matrix(kind, model, inputs, targets, loss)
    out = {name: eigvals(b) for name, b in exact.module_blocks(mat, model, modules).items()}
    if whole:
        out[WHOLE] = eigvals(mat)
    return out


def _fresh_copy(model: nn.Module) -> nn.Module:
    """An independent copy without hooks: an optimizer attached to it cannot disturb the user's model."""
    with paused():
        return copy.deepcopy(_hookless_copy(model))


def estimator_blocks(model: nn.Module, inputs: Tensor, targets: Tensor, estimator: str = "kfac",
                     loss: str = "cross_entropy", fisher: str = "type2", **hyper: Any) -> dict[str, Tensor]:
    """``opt.blocks()`` of ``estimator`` after ONE forward/backward on ``(inputs, targets)`` and
    ``opt.update_curvature()`` with ``ema_decay=0`` (unless given), on a hook-free deep copy of ``model``
    (so the model and any optimizer already attached to it are untouched). Blocks are keyed by module name
    and indexed like :func:`curvlab.exact.module_blocks`."""
    from .optim import optimizer

    net = _fresh_copy(model)
    hyper.setdefault("ema_decay", 0.0)
    opt = optimizer(net, estimator, "natural", loss=loss, fisher=fisher, **hyper)
    lossfn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    lossfn(net(inputs), targets).backward()
    if not opt.update_curvature():
        raise FloatingPointError(f"estimator {estimator!r}: non-finite curvature statistics on this batch")
    blocks = opt.blocks()
    if opt.capture is not None:
        opt.capture.remove()
    return blocks


def estimator_spectra(model: nn.Module, inputs: Tensor, targets: Tensor, estimator: str = "kfac",
                      loss: str = "cross_entropy", fisher: str = "type2", **hyper: Any) -> dict[str, Tensor]:
    """Descending eigenvalues of every block of :func:`estimator_blocks`."""
    blocks = estimator_blocks(model, inputs, targets, estimator, loss, fisher, **hyper)
    return {name: eigvals(b) for name, b in blocks.items()}


# ------------------------------------------------------------------------------------------ matrix-free
def module_params(model: nn.Module, module: str) -> list[str]:
    """Full names (``model.named_parameters()``) of the trainable parameters owned by ``module``, in the
    order of the module's block in :func:`curvlab.exact.module_blocks`."""
    mods = dict(model.named_modules())
    if module not in mods:
        raise ValueError(f"module: no module named {module!r}; valid: {[n for n in mods if n]}")
    own = [pn for pn, p in mods[module].named_parameters(recurse=False) if p.requires_grad]
    if not own:
        raise ValueError(f"module {module!r} owns no trainable parameters")
    return [f"{module}.{pn}" if module else pn for pn in own]


def as_operator(matvec: Callable[[Tensor], Tensor], n: int, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> sla.LinearOperator:
    """Wrap a symmetric torch product ``v -> A v`` (flat ``(n,)`` tensors) as a float64 scipy LinearOperator.
    Also accepts ``(n, k)`` blocks (applied column by column)."""
    def mv(v: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.ascontiguousarray(v).reshape(n), dtype=dtype, device=device)
        return matvec(t).detach().to("cpu", torch.float64).numpy()

    def mm(V: np.ndarray) -> np.ndarray:
        return np.stack([mv(V[:, j]) for j in range(V.shape[1])], axis=1)

    return sla.LinearOperator((n, n), matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)


def curvature_operator(kind: str, model: nn.Module, inputs: Tensor, targets: Tensor | None,
                       loss: str = "cross_entropy", module: str | None = None, params: list[str] | None = None,
                       chunk: int = 256) -> sla.LinearOperator:
    """Matrix-free exact ``kind`` matrix (``"ggn"``, ``"fisher"``, ``"empirical"``, ``"hessian"``) as a
    LinearOperator, over all trainable parameters, one ``module``'s block, or the named ``params``.

    Products are computed in the model's dtype (use a float64 model for tight checks) with the forward run
    inside :func:`curvlab.capture.paused` on a hook-free copy. ``chunk``: examples per ``vmap`` call of the
    empirical Fisher. See the module docstring for the formulas.
    """
    if kind not in exact.KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {exact.KINDS}")
    if module is not None:
        if params is not None:
            raise ValueError("give either module or params, not both")
        params = module_params(model, module)
    prob = _Problem(model, params)
    x, y, _ = prob.data(inputs, targets, loss, need_targets=kind != "fisher")
    theta, n = prob.theta, x.shape[0]
    lossfn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss

    if kind in ("ggn", "fisher"):
        if kind == "fisher":  # F = G for both losses; the targets do not enter the output Hessian
            with paused(), torch.no_grad():
                f0 = prob.batch_out(theta, x)
            y = f0.argmax(-1) if loss == "cross_entropy" else f0
        grad_f = grad(lambda f: lossfn(f, y))

        def matvec(v: Tensor) -> Tensor:
            with paused():
                f, pull = vjp(lambda th: prob.batch_out(th, x), theta)
                # J v as the vjp of the (linear) pullback u -> J^T u: reverse mode only, like curvlab.exact
                jv = vjp(lambda u: pull(u)[0], torch.zeros_like(f))[1](v)[0]
                hjv = grad(lambda out: (grad_f(out) * jv).sum())(f)
                return pull(hjv)[0]
    elif kind == "hessian":
        grad_theta = grad(lambda th: lossfn(prob.batch_out(th, x), y))

        def matvec(v: Tensor) -> Tensor:
            with paused():
                return grad(lambda th: (grad_theta(th) * v).sum())(theta)
    else:
        per_grad = vmap(grad(lambda th, xn, yn: _example_loss(loss, prob.example_out(th, xn), yn)),
                        in_dims=(None, 0, 0))

        def matvec(v: Tensor) -> Tensor:
            out = torch.zeros_like(theta)
            with paused():
                for i in range(0, n, chunk):
                    g = per_grad(theta, x[i:i + chunk], y[i:i + chunk])
                    out += g.T @ (g @ v)
            return out / n

    return as_operator(lambda v: matvec(v.to(prob.dtype)), prob.P, prob.dtype, theta.device)


def estimator_operator(opt: Any, unit: str) -> sla.LinearOperator:
    """The undamped block ``C`` of one preconditioned unit of a :class:`curvlab.CurvlabOptimizer` as a
    LinearOperator through ``Unit.mv`` (flat vectors in the module's parameter order, as ``opt.blocks()``)."""
    units = {u.name: u for u in opt.units if u.preconditioned}
    if unit not in units:
        raise ValueError(f"unit: no preconditioned unit {unit!r}; valid: {sorted(units)}")
    u = units[unit]
    shapes = [p.shape for p in u.params]
    sizes = [p.numel() for p in u.params]
    dtype = u.params[0].dtype

    def matvec(v: Tensor) -> Tensor:
        parts = [c.reshape(s) for c, s in zip(v.split(sizes), shapes)]
        with torch.no_grad():
            return torch.cat([t.reshape(-1) for t in u.mv(parts)])

    return as_operator(matvec, sum(sizes), dtype, u.params[0].device)


def top_eigenvalues(op: sla.LinearOperator, k: int = 6, which: str = "LA", tol: float = 0.0,
                    seed: int = 0) -> np.ndarray:
    """The ``k`` extreme eigenvalues of a symmetric operator by ARPACK Lanczos (``eigsh``), descending.

    ``which="LA"`` (default): largest algebraic -- the top of a PSD GGN/Fisher spectrum and the most positive
    Hessian eigenvalues; ``"LM"`` largest magnitude (Hessian outliers of either sign). ``tol=0``: machine
    precision. A deterministic start vector (``seed``) makes runs reproducible."""
    n = op.shape[0]
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for an operator of size {n} (use eigvals for all), got {k}")
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals = sla.eigsh(op, k=k, which=which, tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(vals)[::-1]


# -------------------------------------------------------------------------------- spectral density (SLQ)
def lanczos(op: sla.LinearOperator, v0: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` Lanczos iterations from ``v0`` with full reorthogonalization (float64); returns the
    tridiagonal's diagonal ``alpha`` and off-diagonal ``beta``. Stops early (shorter arrays) when the Krylov
    space is exhausted (``beta`` below ``1e-12`` of the largest ``|alpha|``)."""
    n = op.shape[0]
    steps = min(steps, n)
    Q = np.zeros((steps, n))
    alpha, beta = [], []
    q = v0 / np.linalg.norm(v0)
    for j in range(steps):
        Q[j] = q
        w = op.matvec(q)
        a = float(q @ w)
        alpha.append(a)
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)     # full reorthogonalization, twice (Kahan)
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = float(np.linalg.norm(w))
        if j == steps - 1 or b <= 1e-12 * max(1.0, max(abs(x) for x in alpha)):
            break
        beta.append(b)
        q = w / b
    return np.array(alpha), np.array(beta)


@dataclass
class SpectralDensity:
    """Gauss quadrature of the spectral measure ``(1/n) sum_i delta(t - lambda_i)``: for every probe ``p``
    Ritz values ``nodes[p]`` with weights ``weights[p]`` summing to 1; the estimate averages the probes."""

    nodes: list[np.ndarray]
    weights: list[np.ndarray]

    def mean(self) -> float:
        """``int t rho(t) dt``: the Hutchinson estimate of ``trace / n`` (exact identity of SLQ)."""
        return float(np.mean([w @ t for t, w in zip(self.nodes, self.weights)]))

    def sigma(self) -> float:
        """Default smoothing width: 1% of the Ritz-value range (1 if the range is empty)."""
        allt = np.concatenate(self.nodes)
        span = float(allt.max() - allt.min())
        return 0.01 * span if span > 0 else 1.0

    def grid(self, points: int = 1000, sigma: float | None = None) -> np.ndarray:
        """A grid covering the Ritz values with ``5 sigma`` margins."""
        s = self.sigma() if sigma is None else sigma
        allt = np.concatenate(self.nodes)
        return np.linspace(allt.min() - 5 * s, allt.max() + 5 * s, points)

    def density(self, grid: np.ndarray | None = None, sigma: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(grid, rho)`` with ``rho(t) = mean_p sum_j w_pj N(t; theta_pj, sigma^2)``."""
        s = self.sigma() if sigma is None else float(sigma)
        if s <= 0:
            raise ValueError(f"sigma must be > 0, got {s}")
        t = self.grid(sigma=s) if grid is None else np.asarray(grid, dtype=np.float64)
        rho = np.zeros_like(t)
        for nodes, w in zip(self.nodes, self.weights):
            rho += (w[None, :] * np.exp(-0.5 * ((t[:, None] - nodes[None, :]) / s) ** 2)).sum(1)
        return t, rho / (len(self.nodes) * s * math.sqrt(2 * math.pi))


def spectral_density(op: sla.LinearOperator, probes: int = 4, steps: int = 40, seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature with ``probes`` Rademacher vectors and ``steps`` Lanczos steps each."""
    if probes < 1 or steps < 1:
        raise ValueError(f"probes and steps must be >= 1, got probes={probes}, steps={steps}")
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    for _ in range(probes):
        v = rng.choice([-1.0, 1.0], size=op.shape[0])
        alpha, beta = lanczos(op, v, steps)
        theta, vecs = scipy.linalg.eigh_tridiagonal(alpha, beta[: len(alpha) - 1])
        nodes.append(theta)
        weights.append(vecs[0] ** 2)
    return SpectralDensity(nodes, weights)


# ------------------------------------------------------------------------------------------ along training
def along_training(model: nn.Module, batches: Any, probe: tuple[Tensor, Tensor], checkpoints: list[int],
                   estimator: str = "kfac", kind: str = "ggn", loss: str = "cross_entropy", fisher: str = "type2",
                   k: int = 5, progress: bool = False, **hyper: Any) -> list[dict[str, Any]]:
    """Train a hook-free copy of ``model`` with ``curvlab.optimizer(copy, estimator, "natural", **hyper)``
    on ``batches`` (an iterable of ``(x, y)``) and, before each step ``t`` in ``checkpoints`` (and after the
    last step if ``len(batches)`` is in ``checkpoints``), compare with the exact ``kind`` blocks on the fixed
    ``probe`` batch: ``"fresh"`` = the estimator's blocks from the probe batch alone
    (:func:`estimator_blocks`, approximation error only), ``"running"`` = the training optimizer's own
    EMA blocks (approximation + estimation error; absent before the first step). Returns one dict per
    checkpoint: ``{"step", "probe_loss", "fresh": {layer: compare(...)}, "running": {...}}``.
    """
    from .optim import optimizer

    net = _fresh_copy(model)
    opt = optimizer(net, estimator, "natural", loss=loss, fisher=fisher, **hyper)
    lossfn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    px, py = probe
    fresh_hyper = {key: v for key, v in hyper.items() if key != "ema_decay"}
    wanted, records = set(checkpoints), []

    def checkpoint(t: int) -> None:
        with torch.no_grad(), paused():
            probe_loss = float(lossfn(net(px), py))
        names = [u.name for u in opt.units if u.preconditioned]
        ref = exact.exact_blocks(kind, net, px, py, loss, modules=names)
        fresh = estimator_blocks(net, px, py, estimator, loss, fisher, **fresh_hyper)
        rec = {"step": t, "probe_loss": probe_loss, "fresh": {n: compare(fresh[n], ref[n], k) for n in names}}
        if t > 0:
            rec["running"] = {n: compare(b, ref[n], k) for n, b in opt.blocks().items()}
        records.append(rec)

    batches = list(batches)
    steps = range(len(batches))
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"{estimator} training", leave=False)
    for t in steps:
        if t in wanted:
            checkpoint(t)
        x, y = batches[t]
        opt.zero_grad()
        lossfn(net(x), y).backward()
        opt.step()
    if len(batches) in wanted:
        checkpoint(len(batches))
    if opt.capture is not None:
        opt.capture.remove()
    return records
