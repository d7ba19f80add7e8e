"""``scaling="mup"``: muP for second-order optimizers (Ishikawa & Karakida, ICLR 2024, "On the Parameterization
of Second-Order Optimization Effective Towards the Infinite Width", arXiv 2312.12226; ALGORITHMS.md section 5).

Width ``M`` relative to ``base_width`` ``M0`` sets, per weight layer, the init scale, the learning-rate multiplier
and the damping multipliers, so that hyper-parameters tuned at ``M0`` transfer to ``M``. Every weight layer
(``Linear`` / ``Conv1d/2d/3d``, preconditioned or first-order fallback) gets a role, inferred in module
registration order (forward order for ``nn.Sequential`` and most models): the first is ``"input"``, the last
``"output"``, the others ``"hidden"``; ``mup_roles={"name": role}`` overrides any of them. Per layer
``r_in = width_in / M0`` (``in_features`` / ``in_channels``; 1 for the input layer, whose fan-in is the fixed
data dimension) and ``r_out = width_out / M0`` (1 for the output layer). For a hidden ``M -> M`` layer both
are ``r = M / M0``; distinct ratios cover layers whose widths differ (CNN stages; per-layer fan-in/fan-out
ratios of the reference code, 5.6). Conv layers: width = channels, fan-in = ``c_in k^2 / groups``.

* Init (eq. P.1, ``init=True``): ``W ~ N(0, (mup_sigma * fan_in^-b)^2)``, ``b = 1/2`` (input, hidden),
  ``b = 1`` (output: nonzero ``sigma / M``; a zero head under K-FAC locks in an NNGP-like solution, 5.6);
  biases zero. ``init=False`` leaves the weights as they are (resuming, or a custom init).
* LR (eq. P.2) ``lr_l = lr * lr_mult`` with, for a one-step update that moves every layer's output
  coordinates by O(1) (5.1 "Why"): SGD / ``identity``: ``r_out / r_in`` (table 5.1: ``c = (-1, 0, 1)``);
  K-FAC: 1 (``c = 0``); Shampoo with exponent ``e`` (``L^-e G R^-e``): ``(r_out / r_in)^(1 - 2e)``
  (``c = (2e - 1, 0, 1 - 2e)``: the SGD row at ``e = 0``, K-FAC's at ``e = 1/2``). Others: see the estimators.
* Damping: K-FAC per side by ``mup_damping``: ``"explicit"`` (default, the reference code's rule):
  ``rho_A = rho_A0 * r_in`` and ``rho_G = rho_B0 / r_out`` (``rho_A0 = mup_rho_A0``, ``rho_B0 = mup_rho_B0``, both
  ``damping`` by default) (table 5.1: ``{1, r, r}`` and ``{1/r, 1/r, 1}``),
  the eigenvalue scales of ``A ~ h h^T`` and ``G ~ delta delta^T`` (K-FAC's ``damping_style="explicit"``);
  ``"trace"``: ``rho_A = damping tr(A)``, ``rho_G = damping tr(G)`` (width-consistent in all layer types
  without exponents); ``"pi"``: K-FAC's pi-damping unchanged (right in hidden layers, but it over-damps the
  input layer's ``A`` by ~``r``, so its update decays ~``1/r``, and under-damps the output layer's ``A``; 5.1).
* Units that no adapter claims step with their plain gradient, so a fallback weight gets the SGD row; biases
  of fallback layers and other vector-like parameters (norm gains) keep multiplier 1 and their values (5.2).
  The bias of a preconditioned layer is part of its unit and shares its multiplier, unless the estimator's row
  gives it its own (``Scale.curvature_attrs``: Shampoo, whose bias has a diagonal root; see ``_shampoo`` in
  :mod:`.mup_rows`).
* ``norm_weight`` (for rules with a global norm) ``= lr_mult * sqrt(r_in / r_out)``: a muP-correct update of a
  layer has ``||Delta W||_F ~ sqrt(r_out / r_in)``, so ``sum_l norm_weight_l^2 ||d_l||^2`` does not grow with width.

Update rules: ``natural`` and ``fop`` act per unit with scale-free factors (FOP's ``beta*``, ``eta*`` are ratios
of quadratic forms of one layer), so the estimator's row applies unchanged. ``sngm`` divides every direction by
ONE global Euclidean norm, whose width scaling is set by whichever layer dominates it (coordinate check, widths
64..512: with SGD it grows like ``sqrt(r)`` through the output layer and all updates shrink, slope -0.4; with K-FAC
it shrinks and all updates grow, slope +0.45); per-layer multipliers cannot undo a global scalar.
mup therefore builds with a global-norm rule only if the rule declares ``norm_weights = True`` (it then measures
``sqrt(sum_u norm_weight_u^2 ||d_u||^2)``, width-independent); otherwise it raises at construction. A plugin rule
declares ``mup_kind = "per_unit"`` or ``"global_norm"``; an estimator plugin registers its row with
:func:`register_mup_estimator` (the rows of the built-in estimators are in :mod:`.mup_rows`). Unsupported
combinations raise ``ValueError`` at optimizer creation.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..hyper import HyperParameterError, Option, boolean, one_of, optional_positive, positive
from ..registry import RULES, register_scaling
from ..units import Unit
from . import Parameterization
from .mup_rows import MUP_ESTIMATORS, ROLES, Layer, Scale
from .mup_rows import INIT_EXPONENT, MupRow, register_mup_estimator  # noqa: F401  (re-exported)

RULE_KINDS = {"natural": "per_unit", "fop": "per_unit", "sngm": "global_norm"}


def _roles_option(name: str, value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise HyperParameterError(f"{name} must be a dict {{module name: role}}, got {value!r}")
    for k, v in value.items():
        if v not in ROLES:
            raise HyperParameterError(f"{name}[{k!r}] must be one of {ROLES}, got {v!r}")
    return dict(value)


def _is_weight_layer(name: str, module: nn.Module, trainable: list[nn.Parameter]) -> bool:
    """True for a Linear / ConvNd weight layer; ValueError for a trainable matrix parameter muP cannot read."""
    if isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed):
        if any(p is module.weight for p in trainable):
            return True
    if any(p.dim() >= 2 for p in trainable):
        raise ValueError(
            f"scaling='mup': module {name!r} ({type(module).__name__}) has a matrix parameter whose fan-in and width "
            "muP cannot infer (supported weight layers: Linear, Conv1d/2d/3d); freeze it, replace it, or use "
            "scaling='standard'")
    return False


def weight_layers(model: nn.Module, units: list[Unit], base_width: float,
                  roles: dict[str, str] | None = None) -> dict[str, Layer]:
    """The trainable weight layers of ``model`` (those with a parameter in ``units``) in registration order,
    with their roles (inferred, then overridden by ``roles``) and widths."""
    owned = {id(p) for u in units for p in u.params}
    found: list[tuple[str, nn.Module]] = []
    for mname, module in model.named_modules():
        mine = [p for p in module.parameters(recurse=False) if id(p) in owned]
        label = mname or type(module).__name__
        if mine and _is_weight_layer(label, module, mine):
            found.append((label, module))
    roles = dict(roles or {})
    unknown = sorted(set(roles) - {n for n, _ in found})
    if unknown:
        raise HyperParameterError(f"mup_roles names {unknown}, which are not trainable weight layers; weight layers "
                                  f"are {[n for n, _ in found]}")
    out: dict[str, Layer] = {}
    for i, (name, module) in enumerate(found):
        inferred = "input" if i == 0 else "output" if i == len(found) - 1 else "hidden"
        w = module.weight
        width_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        out[name] = Layer(name, module, roles.get(name, inferred), w[0].numel(), width_in, w.shape[0], base_width)
    return out


@register_scaling("mup")
class MuP(Parameterization):
    """muP for second-order methods (Ishikawa & Karakida, ICLR 2024): init, per-layer LR and damping from width."""

    options = {
        "base_width": Option(64, positive, "M0: the width at which hyper-parameters are tuned (ratios r = M / M0)"),
        "mup_roles": Option(None, _roles_option, "{module name: 'input'|'hidden'|'output'} overriding inference"),
        "init": Option(True, boolean,
                           "re-initialize weights (std sigma fan_in^-b, biases 0) at optimizer creation"),
        "mup_sigma": Option(1.0, positive, "sigma of the init std sigma * fan_in^-b (eq. P.1)"),
        "mup_damping": Option("explicit", one_of("explicit", "pi", "trace"),
                              "K-FAC damping under muP: width exponents | pi-damping | trace-proportional"),
        "mup_rho_A0": Option(None, optional_positive,
                             "K-FAC explicit muP damping: rho_A0 of rho_A = rho_A0 * r_in (None: = damping)"),
        "mup_rho_B0": Option(None, optional_positive,
                             "K-FAC explicit muP damping: rho_B0 of rho_B = rho_B0 / r_out (None: = damping)"),
    }

    @classmethod
    def defaults_for(cls, estimator: str, rule: str, config: dict[str, Any]) -> dict[str, Any]:
        """K-FAC with ``mup_damping="explicit"`` (per-side ``damping * r_in`` and ``damping / r_out``): ``damping``
        is the ridge of EACH factor, so its default is ``0.03 ~ sqrt(1e-3)``, the per-side ridge of the standard
        default's pi-damping at ``pi = 1``. At 1e-3 (a 1e-3 ridge per side, ~30x less than standard K-FAC's) the
        tanh MLP 64-32-10 at batch 32 reaches 0.72 train accuracy in 3 epochs; 0.01-0.1 train every digits model
        (README "Defaults")."""
        if estimator == "kfac" and config.get("mup_damping") == "explicit":
            return {"damping": 0.03}
        return {}

    def configure(self, model: nn.Module, units: list[Unit], estimator: str, rule: str) -> None:
        cfg = self.config
        self._check_rule(rule)
        row = MUP_ESTIMATORS.get(estimator)
        if row is None:
            raise ValueError(f"scaling='mup' has no width exponents for estimator {estimator!r}; register them with "
                             "curvlab.scalings.mup.register_mup_estimator, or use scaling='standard'")
        layers = weight_layers(model, units, cfg["base_width"], cfg["mup_roles"])
        by_param = {id(p): layer for layer in layers.values() for p in layer.module.parameters(recurse=False)}
        plan: list[tuple[Unit, Scale, Layer | None]] = []
        for unit in units:                                    # resolve everything before changing anything
            layer = by_param.get(id(unit.params[0]))
            if unit.preconditioned:
                if layer is None:
                    raise ValueError(f"scaling='mup': preconditioned unit {unit.name!r} is not a Linear/Conv layer")
                scale = row(layer, cfg)
                if scale.damping_style is not None and not hasattr(unit.curvature, "damping_style"):
                    raise ValueError(f"unit {unit.name!r}: its curvature has no damping_style to set")
                missing = [k for k in scale.curvature_attrs or {} if not hasattr(unit.curvature, k)]
                if missing:
                    raise ValueError(f"unit {unit.name!r}: its curvature has no {missing} to set")
            elif layer is not None and unit.params[0] is layer.module.weight:
                scale = Scale(lr_mult=layer.r_out / layer.r_in)   # fallback weight: plain gradient = SGD row
            else:
                scale, layer = Scale(), None                      # biases of fallback layers, norm gains: 5.2
            plan.append((unit, scale, layer))
        if cfg["init"]:
            self.initialize(layers.values(), cfg["mup_sigma"])
        for unit, scale, layer in plan:
            unit.lr_mult, unit.damping_mult = scale.lr_mult, scale.damping_mult
            if scale.damping_style is not None:
                unit.curvature.damping_style = scale.damping_style
            if scale.damping_sides is not None:
                unit.set_damping_sides(*scale.damping_sides)
            for key, value in (scale.curvature_attrs or {}).items():
                setattr(unit.curvature, key, value)
            unit.norm_weight = scale.lr_mult * (math.sqrt(layer.r_in / layer.r_out) if layer is not None else 1.0)

    @staticmethod
    def initialize(layers, sigma: float) -> None:
        """Eq. P.1: ``W ~ N(0, (sigma fan_in^-b)^2)`` per role, biases zero (uses torch's global RNG)."""
        with torch.no_grad():
            for layer in layers:
                layer.module.weight.normal_(0.0, sigma * layer.init_std)
                if getattr(layer.module, "bias", None) is not None:
                    layer.module.bias.zero_()

    @staticmethod
    def _check_rule(rule: str) -> None:
        cls = RULES.get(rule)
        kind = getattr(cls, "mup_kind", None) or RULE_KINDS.get(rule)
        if kind == "per_unit":
            return
        if kind == "global_norm":
            if getattr(cls, "norm_weights", False):
                return
            raise ValueError(
                f"scaling='mup' cannot be combined with rule={rule!r}: it divides every layer's direction by one "
                "global Euclidean norm, which changes like width^(+-1/2) under muP, so every normalized update "
                "shrinks or grows with width and per-layer multipliers cannot undo it. It needs a rule that weights "
                "each unit by Unit.norm_weight (declared by norm_weights = True); use rule='natural' or 'fop', or "
                "scaling='standard'")
        raise ValueError(f"scaling='mup' does not know how rule {rule!r} combines per-layer directions; a rule whose "
                         "per-unit step is lr_u times a scale-free function of that unit's direction declares "
                         "mup_kind = 'per_unit'")
