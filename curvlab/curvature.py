"""The estimator seam: an :class:`Estimator` builds one :class:`Curvature` per preconditioned layer.

A ``Curvature`` works on the layer's gradient in its adapter's matrix view ``(d_out, d_in[+1])``
(:mod:`curvlab.adapters`) and provides (DESIGN.md, "Estimators"):

* ``statistics(stats)``       -- this step's statistics from the captured records (pure: no state change);
* ``accumulate(new, ema_decay)`` -- fold them into the running estimate (``S <- xi S + (1 - xi) S_new``;
  the first update takes ``S_new`` as is). The optimizer checks ``new`` for NaN/Inf in between, for
  every layer, so a bad batch never reaches any curvature state;
* ``refresh(damping)``          -- recompute inverses / roots; damping enters here only, never the statistics;
* ``solve(V)``                  -- the damped inverse times ``V`` (``(C + lambda)^-1 V`` or the estimator's
  equivalent);
* ``mv(V)``                     -- the UNDAMPED product ``C V`` (FOP needs it);
* ``dense()``                   -- ``C`` as a dense matrix in the order of
  ``torch.cat([p.reshape(-1) for p in module.parameters(recurse=False)])`` (for checks on small layers);
* ``state_dict()`` / ``load_state_dict()``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import LayerAdapter
from .stats import LayerStats
from .hyper import Option
from .linalg import NumericsEvent


class Curvature:
    """Per-layer curvature approximation. Subclasses implement the methods listed in the module doc."""

    #: ``solve`` is the identity on every parameter of the layer: units then skip the matrix view entirely
    passthrough: bool = False
    #: data parallel (:mod:`curvlab.distributed`): how each statistic is reduced across ranks, by key
    #: (``"mean"`` default, ``"mean_sym"``, ``"cat"``, ``"cat_rms"``, ``"none"``; ``"*"`` for every key)
    reductions: dict[str, str] = {}
    #: data parallel, ``data_parallel_refresh="distributed"``: the attributes a refresh sets (sent by the owner
    #: rank); ``None`` = the whole ``state_dict``; ``()`` = nothing
    refreshed: tuple[str, ...] | None = None
    #: data parallel: a message refusing it (the curvature cannot be made equal to the whole-batch step)
    data_parallel_refusal: str | None = None

    def __init__(self, name: str, module: nn.Module, adapter: LayerAdapter, config: dict[str, Any],
                 events: list[NumericsEvent]) -> None:
        self.name, self.module, self.adapter, self.config = name, module, adapter, config
        self.events = events
        weight = module.weight
        self.dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.device = weight.device
        self.shape = adapter.shape(module)

    @property
    def ready(self) -> bool:
        """True once the curvature can ``solve`` (statistics gathered and inverses refreshed)."""
        return True

    def bind(self, unit: Any) -> None:
        """Called once by the optimizer with the :class:`curvlab.units.Unit` owning this curvature, after the
        parameterization configured it (a curvature that must read live per-unit hyper-parameters keeps it)."""

    def statistics(self, stats: LayerStats) -> dict[str, torch.Tensor]:
        return {}

    def accumulate(self, new: dict[str, torch.Tensor], ema_decay: float) -> None:
        pass

    def refresh(self, damping: float) -> None:
        pass

    def solve(self, mat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mv(self, mat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def _param_dense(self, wbar_dense: torch.Tensor) -> torch.Tensor:
        """Reorder a dense matrix over row-major ``vec(Wbar)`` into the module's parameter order."""
        idx = self.adapter.param_order(self.module).to(wbar_dense.device)
        return wbar_dense[idx][:, idx]

    @staticmethod
    def ema(old: torch.Tensor | None, new: torch.Tensor, decay: float) -> torch.Tensor:
        return new if old is None or decay == 0.0 else old.mul(decay).add_(new, alpha=1.0 - decay)


class Estimator:
    """Factory of per-layer curvatures. Class attributes describe what the estimator needs.

    * ``options``: extra hyper-parameters (:class:`curvlab.hyper.Option`) it accepts;
    * ``fisher_types``: the ``fisher`` values it supports;
    * ``provides``: the operations its curvatures implement (rules check ``requires`` against it);
    * ``suggested``: starting hyper-parameters known to train small problems;
    * ``defaults``: what this estimator sets for options the user does not pass (over the COMMON defaults and
      the option tables; ``kl_clip`` only reaches rules with ``trust_region = True``); ``rule_defaults``: the same
      for one rule by name, over the rule's own defaults (:func:`curvlab.hyper.declared_defaults`).
    """

    options: dict[str, Option] = {}
    #: Defaults that train without tuning (README "Defaults"): a trust region, the KL clip of Ba, Grosse & Martens
    #: (2017) at kfac-pytorch's kappa, for every curvature estimator (plugins inherit it) under the rules that apply
    #: it. Without it K-FAC's first step at damping 1e-3 moves each layer of the digits MLP 64-128-128-10 by 75-106%
    #: of its weights and the run is NaN by step 5 (README "Defaults" for the measurements).
    defaults: dict[str, Any] = {"kl_clip": 1e-3}
    #: ``{rule name: defaults}``: this estimator's defaults for one rule (over the rule's ``defaults``)
    rule_defaults: dict[str, dict[str, Any]] = {}
    #: Known-good starting hyper-parameters for small classification problems (digits MLP/CNN, batch 64);
    #: the registry-wide training test and the demo use them. A plugin estimator should set its own.
    suggested: dict[str, Any] = {"lr": 0.05, "damping": 0.1, "momentum": 0.5}
    fisher_types: tuple[str, ...] = ("empirical", "mc", "type2")
    provides: frozenset[str] = frozenset({"solve", "mv", "dense"})
    #: whether the damping enters ``solve`` (False: ``gamma_adapt`` is refused, :mod:`curvlab.factor_damping`)
    damped_solve: bool = True
    curvature_class: type[Curvature] = Curvature

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def captures(self) -> set[str]:
        """What the statistics need: a subset of {"inputs", "fisher_grads", "real_grads", "grad"}.

        The first three are recorded by the capture backend during forward/backward; ``"grad"`` asks for the
        mean-loss gradient in the matrix view (``LayerStats.grad``), for gradient-statistics estimators."""
        return set()

    def unsupported_reason(self, adapter: LayerAdapter) -> str | None:
        """``None`` if this estimator gives ``adapter``'s layers a curvature, else why not (first-order fallback).

        Elementwise layers (LayerNorm / RMSNorm scale and shift, :mod:`curvlab.estimators.scale_shift`) get a
        small Fisher block from per-example gradients when the estimator reads output gradients, the
        estimator's own curvature when it works on gradients or nothing (Shampoo, identity), else none."""
        if not getattr(adapter, "elementwise", False):
            return None
        if self.config.get("norm_curvature") == "off":
            return "norm_curvature='off'"
        if self.captures() & {"real_grads", "fisher_grads"} or self.captures() <= {"grad"}:
            return None
        return (f"estimator {self.registry_name!r} reads no output gradients, so it has no curvature for "  # type: ignore
                "elementwise (normalization) layers")

    def create(self, name: str, module: nn.Module, adapter: LayerAdapter,
               events: list[NumericsEvent]) -> Curvature:
        if getattr(adapter, "elementwise", False) and self.captures() & {"real_grads", "fisher_grads"}:
            from .estimators.scale_shift import ScaleShiftCurvature
            return ScaleShiftCurvature(name, module, adapter, self.config, events)
        return self.curvature_class(name, module, adapter, self.config, events)

    def describe(self, adapter: LayerAdapter) -> str:
        return f"{self.registry_name} ({type(adapter).__name__.removesuffix('Adapter')})"  # type: ignore
