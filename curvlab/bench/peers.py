"""Peer libraries at identical settings: one training step of ASDL, curvlinops, pytorch-optimizer and SINGD.

Optional: nothing here is imported by the core, and every peer is imported lazily inside the functions, so
this module imports without them (``make peers`` installs them). For each peer:

* :func:`make_peer_step` returns a zero-argument closure doing ONE full training step with that library on its
  own deep copy of the model (zero_grad, forward, loss, backward, the library's statistics on its statistics
  steps and inverses/roots on its refresh steps, preconditioning, parameter update), with the step counter
  inside -- the cost a user of the library pays per step;
* :func:`curvlab_equivalent` returns ``(estimator, rule, hyper)``: the curvlab configuration doing the same
  math (Fisher type, damping style, bias handling, EMA, intervals, Shampoo exponent / epsilon / statistics);
* :func:`compare` times peers and their curvlab equivalents round-robin in one process
  (:func:`curvlab.bench.harness.interleaved`, blocks of one schedule period) and returns median ratios;
* :data:`DIFFERENCES` (:mod:`curvlab.bench.peer_conventions`) lists, per peer, what could not be made equal (bias conventions, warm-up conventions,
  numerical root methods). ``tests/test_bench_peers.py`` checks the equal-math claims in float64.

Conventions shared by all peers (curvlab's pinned names): ``ema_decay`` is the weight of the OLD statistics
(ASDL's ``ema_decay`` is the weight of the NEW ones, converted here); statistics on steps
``t % stat_interval == 0`` and refreshes on ``t % inv_interval == 0`` (t counted from 0); momentum is torch's
heavy-ball ``m <- mu m + d``, ``theta <- theta - lr m`` (curvlab's ``natural`` rule, ``torch.optim.SGD``).

References: ASDL (Osawa et al., "ASDL: A Unified Interface for Gradient Preconditioning in PyTorch", 2023);
curvlinops (Dangel et al., github.com/f-dangel/curvlinops); pytorch-optimizer (Kim, github.com/kozistr/
pytorch_optimizer); SINGD (Lin et al., "Structured Inverse-Free Natural Gradient Descent", ICML 2024); K-FAC
(Martens & Grosse 2015, eq. K.5 pi-damping in ALGORITHMS.md); Shampoo (Gupta, Koren & Singer 2018, eq. S.4).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata as metadata
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .peer_conventions import _MODULES, COST_NOTES, DIFFERENCES, PEERS  # noqa: F401  (re-exported)

_LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def peer_status() -> dict[str, str]:
    """``{peer: "ok (version)" | reason it is unavailable}`` without raising."""
    out = {}
    for peer, (mod, dist) in _MODULES.items():
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001  (any import failure is a status, not an error)
            out[peer] = f"unavailable: {type(exc).__name__}: {exc} (install with `make peers`)"
            continue
        try:
            out[peer] = f"ok ({dist} {metadata.version(dist)})"
        except metadata.PackageNotFoundError:
            out[peer] = "ok (version unknown)"
    return out


def _check(peer: str, loss: str, fisher: str) -> None:
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {sorted(PEERS)}, got {peer!r}")
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}")
    if fisher not in ("empirical", "mc", "type2"):
        raise ValueError(f"fisher must be 'empirical', 'mc' or 'type2', got {fisher!r}")


def curvlab_equivalent(peer: str, *, lr: float, damping: float, momentum: float, stat_interval: int,
                       inv_interval: int, loss: str = "cross_entropy", fisher: str = "empirical",
                       ema_decay: float = 0.95) -> tuple[str, str, dict[str, Any]]:
    """``(estimator, rule, hyper)``: the curvlab configuration doing the same math as ``peer``.

    What could not be aligned is listed in :data:`DIFFERENCES` ``[peer]``."""
    _check(peer, loss, fisher)
    common = {"lr": lr, "damping": damping, "momentum": momentum, "loss": loss, "kl_clip": None}   # peers: no clip
    if peer in ("asdl-kfac", "curvlinops-kfac"):
        return "kfac", "natural", {**common, "fisher": fisher, "damping_style": "pi", "ema_decay": ema_decay,
                                   "stat_interval": stat_interval, "inv_interval": inv_interval}
    if peer == "singd":
        return "kfac", "natural", {**common, "fisher": "empirical", "damping_style": "pi", "ema_decay": ema_decay,
                                   "stat_interval": stat_interval, "inv_interval": stat_interval}
    shampoo = {"shampoo_exponent": 0.25, "shampoo_grafting": None, "shampoo_block_size": 1024,
               "inv_interval": inv_interval}
    if peer == "asdl-shampoo":
        return "shampoo", "natural", {**common, **shampoo, "shampoo_statistics": "ema", "ema_decay": ema_decay,
                                      "shampoo_epsilon": "relative", "shampoo_root_method": "newton",
                                      "shampoo_newton_dtype": "statistics", "stat_interval": stat_interval}
    # pytorch_optimizer-shampoo: eps * I added once to the summed statistics == ridge eps at refresh
    return "shampoo", "natural", {**common, **shampoo, "shampoo_statistics": "sum", "shampoo_epsilon": "absolute",
                                  "shampoo_root_method": "eigh", "stat_interval": 1}


class _NoNvtx:
    """Stand-in for ``torch.cuda.nvtx`` (ranges are profiler annotations only)."""

    @staticmethod
    def range(*args: Any, **kwargs: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    @staticmethod
    def range_push(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def range_pop() -> None:
        return None


def _asdl_without_nvtx() -> None:
    """ASDL wraps its steps in ``torch.cuda.nvtx.range``, which raises on CPU-only torch builds ("NVTX functions
    not installed"): replace the ``nvtx`` name inside ASDL's modules by a no-op when NVTX is unusable."""
    try:
        torch.cuda.nvtx.range_push("curvlab-probe")
        torch.cuda.nvtx.range_pop()
        return
    except Exception:  # noqa: BLE001
        pass
    for name in ("asdl.operations.operation", "asdl.precondition.natural_gradient", "asdl.precondition.shampoo",
                 "asdl.utils"):
        module = importlib.import_module(name)
        if hasattr(module, "nvtx"):
            module.nvtx = _NoNvtx  # type: ignore[attr-defined]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _plain_step(model: nn.Module, opt: Any, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor
                ) -> Callable[[], None]:
    """zero_grad, forward, loss, backward, ``opt.step()``: the loop of a library that is a torch optimizer."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _asdl_step(maker: Any, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, x: torch.Tensor,
               y: torch.Tensor, dtype: torch.dtype | None = None) -> Callable[[], None]:
    """One training step through an ASDL gradient maker (statistics / inverses on its own schedule) and SGD;
    ``dtype``: run ASDL's part with that default dtype."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        dummy = maker.setup_model_call(model, x)
        maker.setup_loss_call(loss_fn, dummy, y)
        with _default_dtype(dtype) if dtype is not None else contextlib.nullcontext():
            maker.forward_and_backward()
        opt.step()

    return step


def _asdl_kfac(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, damping: float, momentum: float,
               stat_interval: int, inv_interval: int, loss: str, fisher: str, ema_decay: float) -> Callable[[], None]:
    from asdl import KfacGradientMaker, PreconditioningConfig

    _asdl_without_nvtx()

    # accumulate mode always (ASDL's "no EMA" mode would invert on every statistics step); ASDL's ema_decay is
    # the weight of the NEW statistics, so curvlab's xi = 0 is ASDL's 1.0 (old factors multiplied by 0).
    config = PreconditioningConfig(data_size=x.shape[0], damping=damping, ema_decay=1.0 - ema_decay,
                                   preconditioner_upd_interval=inv_interval, curvature_upd_interval=stat_interval)
    fisher_type = {"empirical": "fisher_emp", "mc": "fisher_mc", "type2": "fisher_exact"}[fisher]
    maker = KfacGradientMaker(model, config, fisher_type=fisher_type, loss_type=loss)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = _LOSSES[loss]

    return _asdl_step(maker, model, opt, loss_fn, x, y)


def _asdl_shampoo(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, damping: float,
                  momentum: float, stat_interval: int, inv_interval: int, loss: str, fisher: str,
                  ema_decay: float) -> Callable[[], None]:
    from asdl import PreconditioningConfig, ShampooGradientMaker

    _asdl_without_nvtx()

    config = PreconditioningConfig(damping=damping, ema_decay=1.0 - ema_decay,
                                   preconditioner_upd_interval=inv_interval, curvature_upd_interval=stat_interval)
    dtype = next(model.parameters()).dtype
    with _default_dtype(dtype):
        maker = ShampooGradientMaker(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = _LOSSES[loss]

    # ASDL builds identities / power-iteration vectors in the default dtype
    return _asdl_step(maker, model, opt, loss_fn, x, y, dtype)


def _curvlinops_kfac(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, damping: float,
                     momentum: float, stat_interval: int, inv_interval: int, loss: str, fisher: str,
                     ema_decay: float) -> Callable[[], None]:
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = _LOSSES[loss]
    loss_module = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()
    fisher_type = {"empirical": "empirical", "mc": "mc", "type2": "type-2"}[fisher]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    state: dict[str, Any] = {"t": 0, "kfac": None, "inverse": None, "A": None, "G": None}

    def fold(old: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if old is None or ema_decay == 0.0:
            return dict(new)
        return {k: old[k].mul(ema_decay).add_(v, alpha=1.0 - ema_decay) for k, v in new.items()}

    def step() -> None:
        t = state["t"]
        if t % stat_interval == 0:
            kfac = KFACLinearOperator(model, loss_module, params, [(x, y)], fisher_type=fisher_type,
                                      separate_weight_and_bias=False, check_deterministic=False,
                                      num_data=x.shape[0], num_per_example_loss_terms=1)
            kfac.compute_kronecker_factors()
            state["A"] = kfac._input_covariances = fold(state["A"], kfac._input_covariances)
            state["G"] = kfac._gradient_covariances = fold(state["G"], kfac._gradient_covariances)
            state["kfac"] = kfac
        if t % inv_interval == 0 or state["inverse"] is None:
            state["inverse"] = KFACInverseLinearOperator(state["kfac"], damping=damping, use_heuristic_damping=True,
                                                         min_damping=0.0, cache=True)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            directions = state["inverse"] @ [p.grad for p in params]
            for p, d in zip(params, directions):
                p.grad = d
        opt.step()
        state["t"] = t + 1

    return step


def _pytorch_optimizer_shampoo(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, damping: float,
                               momentum: float, stat_interval: int, inv_interval: int, loss: str, fisher: str,
                               ema_decay: float) -> Callable[[], None]:
    from pytorch_optimizer import Shampoo

    if stat_interval != 1:
        raise ValueError(f"pytorch_optimizer-shampoo gathers statistics on every step: stat_interval must be 1, "
                         f"got {stat_interval}")
    opt = Shampoo(model.parameters(), lr=lr, momentum=momentum, preconditioning_compute_steps=inv_interval,
                  matrix_eps=damping)
    loss_fn = _LOSSES[loss]

    return _plain_step(model, opt, loss_fn, x, y)


def _singd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, damping: float, momentum: float,
           stat_interval: int, inv_interval: int, loss: str, fisher: str, ema_decay: float) -> Callable[[], None]:
    from singd.optim.optimizer import SINGD

    opt = SINGD(model, lr=lr, momentum=momentum, damping=damping, T=stat_interval, structures=("dense", "dense"),
                kfac_like=True, alpha1=0.0, warn_unsupported=False)   # IKFAC ignores alpha1; lr_cov: default
    loss_fn = _LOSSES[loss]

    return _plain_step(model, opt, loss_fn, x, y)


_BUILDERS = {"asdl-kfac": _asdl_kfac, "asdl-shampoo": _asdl_shampoo, "curvlinops-kfac": _curvlinops_kfac,
             "pytorch_optimizer-shampoo": _pytorch_optimizer_shampoo, "singd": _singd}


def make_peer_step(peer: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, damping: float,
                   momentum: float, stat_interval: int, inv_interval: int, loss: str = "cross_entropy",
                   fisher: str = "empirical", ema_decay: float = 0.95) -> Callable[[], None]:
    """A closure doing one full training step of ``peer`` on its own deep copy of ``model``.

    The copy is exposed as ``step.model`` (to read the parameters after a step). ``fisher`` is ignored by the
    Shampoo peers and SINGD (empirical Fisher only). Raises ``ImportError`` naming ``make peers`` when the
    library is missing."""
    _check(peer, loss, fisher)
    if stat_interval < 1 or inv_interval < 1:
        raise ValueError(f"stat_interval and inv_interval must be >= 1, got {stat_interval}, {inv_interval}")
    mod, dist = _MODULES[peer]
    try:
        importlib.import_module(mod)
    except ImportError as exc:
        raise ImportError(f"peer {peer!r} needs the package {dist!r} (`make peers`): {exc}") from exc
    own = copy.deepcopy(model)
    step = _BUILDERS[peer](own, x, y, lr=lr, damping=damping, momentum=momentum, stat_interval=stat_interval,
                           inv_interval=inv_interval, loss=loss, fisher=fisher, ema_decay=ema_decay)
    step.model = own  # type: ignore[attr-defined]
    return step


def make_curvlab_step(peer: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **settings: Any
                      ) -> Callable[[], None]:
    """The same as :func:`make_peer_step` for ``curvlab_equivalent(peer, **settings)``."""
    import curvlab

    estimator, rule, hyper = curvlab_equivalent(peer, **settings)
    own = copy.deepcopy(model)
    opt = curvlab.optimizer(own, estimator, rule, **hyper)
    step = _plain_step(own, opt, _LOSSES[hyper["loss"]], x, y)
    step.model = own  # type: ignore[attr-defined]
    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def compare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], *, repeats: int = 7,
            warmup: int = 1, clock: str = "wall", **settings: Any) -> dict[str, Any]:
    """Step time of each peer in ``names`` and of its curvlab equivalent, interleaved in one process.

    Every callable runs blocks of one schedule period (``lcm(stat_interval, inv_interval)`` steps) per round
    (:func:`curvlab.bench.harness.interleaved`, ``clock`` "wall" or "process"); ``ratios[peer]`` is the median over
    rounds of ``peer time / curvlab-equivalent time`` in the same round. Peers whose library is missing are
    skipped."""
    import math
    import statistics

    from .harness import interleaved

    steps: dict[str, Callable[[], None]] = {}
    reference: dict[str, str] = {}
    for peer in names:
        if not peer_status()[peer].startswith("ok"):
            continue
        steps[peer] = make_peer_step(peer, model, x, y, **settings)
        config = curvlab_equivalent(peer, **settings)
        label = f"curvlab {config[0]} " + ",".join(f"{k.removeprefix('shampoo_')}={v}" for k, v in sorted(
            config[2].items()) if k in ("stat_interval", "inv_interval", "shampoo_statistics", "shampoo_root_method"))
        reference[peer] = label
        if label not in steps:
            steps[label] = make_curvlab_step(peer, model, x, y, **settings)
    period = math.lcm(settings["stat_interval"], settings["inv_interval"])
    times = interleaved(steps, warmup=warmup, repeats=repeats, block=period, clock=clock)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {p: statistics.median(a / b for a, b in zip(times[p], times[r])) for p, r in reference.items()}
    finite = {k: all(bool(torch.isfinite(p).all()) for p in fn.model.parameters())  # type: ignore[attr-defined]
              for k, fn in steps.items()}
    return {"seconds": med, "ratios": ratios, "reference": reference, "times": times, "finite": finite}
