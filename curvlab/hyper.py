"""Hyper-parameters: the pinned names every estimator and rule shares, their defaults and validation.

Pinned names (later estimators and rules reuse them, never rename them):

=============== ========================================================================================
``lr``           learning rate (per param group; LR schedulers act on it)
``damping``      Tikhonov damping lambda of the curvature (per param group), ``>= 0``
``momentum``     heavy-ball momentum mu in ``[0, 1)`` (per param group)
``weight_decay`` L2 / decoupled weight decay, ``>= 0`` (per param group)
``ema_decay``    weight of the OLD statistics in ``S <- xi S + (1 - xi) S_new``; 0 = current batch only
``stat_interval`` T_cov: statistics are gathered on steps ``t % T_cov == 0``
``inv_interval`` T_inv: inverses / roots are refreshed on steps ``t % T_inv == 0``
``fisher``       ``"empirical"`` (real labels), ``"mc"`` (labels sampled from the model), ``"type2"``
                 (exact loss-Hessian factorization: K-FAC's G becomes the GGN output factor)
``loss``         ``"cross_entropy"`` or ``"mse"``: the torch losses with mean reduction the user trains on
``kl_clip``      kappa of the KL / trust-region clip (Ba et al. 2017), ``None`` = off
=============== ========================================================================================

Non-finite steps: ``nonfinite`` (``"skip"``/``"raise"``) and ``max_skipped_steps`` (skips in a row before
:class:`curvlab.Diverged`, :mod:`curvlab.divergence`).

Adaptive damping (:mod:`curvlab.damping`, Martens & Grosse 2015 sec. 6.5): ``damping_adapt`` (None/``"lm"``),
``damping_interval`` (T1), ``damping_omega``, ``damping_min``/``damping_max``, ``damping_thresholds``,
``damping_refresh``, ``damping_rho`` (``"same"``/``"next"``); the
curvature's own damping gamma (:mod:`curvlab.factor_damping`, sec. 6.6): ``gamma_adapt``, ``gamma_interval`` (T2),
``gamma_omega``, ``gamma_score`` (``"model"``/``"next"``).

Data parallelism (:mod:`curvlab.distributed`): ``data_parallel`` (``"auto"``/True/False) and
``data_parallel_refresh`` (``"replicated"``/``"distributed"``).

Components declare extra options with :class:`Option`; :func:`resolve` validates the union and raises
``ValueError``/``TypeError`` naming the argument.

Defaults (README "Defaults"). The table above holds the COMMON defaults; each component of the triple may
override them for options the user did not pass (:func:`declared_defaults`, later wins)::

    COMMON  <  estimator (its option table, then ``Estimator.defaults``; ``kl_clip`` only if the rule has
               ``trust_region = True``)  <  rule (option table, ``UpdateRule.defaults``)
            <  ``Estimator.rule_defaults[rule]``  <  scaling (``Parameterization.defaults_for``)  <  what you pass

so ``curvlab.optimizer(model, estimator, rule, scaling)`` with nothing else trains (the built-in triples on MLPs and
small CNNs, digits and MNIST; ``tests/test_defaults_train.py``). The mechanism, chosen from measurements
(``analysis/defaults.py``, README "Defaults"): a trust region on by default -- ``kl_clip = 1e-3`` (Ba, Grosse &
Martens 2017; kfac-pytorch's default) for every curvature estimator under the rules that apply it (``natural``,
``fop``; ``qmodel`` uses its own ``1e-1`` on the final update) -- plus per-component defaults where an estimator's
or a rule's hyper-parameters mean something else (ISAAC's ``damping`` is lambda_a; SNGM's and LARS's ``lr`` is a
step length; Shampoo's step has O(1) singular values; identity is momentum SGD). ``suggested`` (the best-known
settings, used by the demo and the run configs) is a separate table. ``CurvlabOptimizer.component_defaults``
lists what the components set for a given optimizer.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

FISHER_TYPES = ("empirical", "mc", "type2")


class HyperParameterError(ValueError, TypeError):
    """An invalid hyper-parameter (bad value, bad type or unknown name); the message names it.

    Both a ``ValueError`` and a ``TypeError``, so either ``except`` clause catches it."""
LOSSES = ("cross_entropy", "mse")


@dataclass(frozen=True)
class Option:
    """One named hyper-parameter: its default, a validator and whether it lives in the param groups."""

    default: Any
    check: Callable[[str, Any], Any]
    doc: str
    per_group: bool = False


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HyperParameterError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise HyperParameterError(f"{name} must be finite, got {value!r}")
    return float(value)


def non_negative(name: str, value: Any) -> float:
    v = _number(name, value)
    if v < 0:
        raise HyperParameterError(f"{name} must be >= 0, got {value!r}")
    return v


def positive(name: str, value: Any) -> float:
    v = _number(name, value)
    if v <= 0:
        raise HyperParameterError(f"{name} must be > 0, got {value!r}")
    return v


def unit_interval(name: str, value: Any) -> float:
    v = _number(name, value)
    if not 0.0 <= v < 1.0:
        raise HyperParameterError(f"{name} must lie in [0, 1), got {value!r}")
    return v


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HyperParameterError(f"{name} must be an integer, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise HyperParameterError(f"{name} must be >= 1, got {value!r}")
    return value


def optional_positive(name: str, value: Any) -> float | None:
    return None if value is None else positive(name, value)


def one_of(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise HyperParameterError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.{hint}")
        return value

    return check


def _names(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise HyperParameterError(f"{name} must be a list of module names (strings), got {value!r}")
    return tuple(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise HyperParameterError(f"{name} must be True or False, got {value!r}")
    return value


def _optional_lm(name: str, value: Any) -> str | None:
    return None if value is None else one_of("lm")(name, value)


def _omega(name: str, value: Any, default: str = "(19/20)^damping_interval") -> float | None:
    if value is None:
        return None
    v = _number(name, value)
    if not 0.0 < v < 1.0:
        raise HyperParameterError(f"{name} must lie in (0, 1) (or None for {default}), got {value!r}")
    return v


def _thresholds(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise HyperParameterError(f"{name} must be a pair (low, high) of reduction ratios, got {value!r}")
    low, high = (_number(name, v) for v in value)
    if not low < high:
        raise HyperParameterError(f"{name} must be (low, high) with low < high, got {value!r}")
    return (low, high)


def _data_parallel(name: str, value: Any) -> str | bool:
    if value in ("auto",) or isinstance(value, bool):
        return value
    raise HyperParameterError(f"{name} must be 'auto', True or False, got {value!r}")


COMMON: dict[str, Option] = {
    "lr": Option(0.1, non_negative, "learning rate", per_group=True),
    "damping": Option(1e-3, non_negative, "Tikhonov damping lambda", per_group=True),
    "momentum": Option(0.0, unit_interval, "heavy-ball momentum", per_group=True),
    "weight_decay": Option(0.0, non_negative, "weight decay", per_group=True),
    "ema_decay": Option(0.95, unit_interval, "weight of the old statistics in the EMA (0 = current batch only)"),
    "stat_interval": Option(1, positive_int, "T_cov: gather statistics every this many steps"),
    "inv_interval": Option(10, positive_int, "T_inv: refresh inverses every this many steps"),
    "fisher": Option("mc", one_of(*FISHER_TYPES), "which Fisher the output-side statistics estimate"),
    "loss": Option("cross_entropy", one_of(*LOSSES), "the loss the user trains on (mean reduction)"),
    "kl_clip": Option(None, optional_positive, "KL clip kappa (None = off)"),
    "mc_samples": Option(1, positive_int, "labels sampled per example for fisher='mc'"),
    "loss_terms_per_example": Option(None, lambda name, v: None if v is None else positive_int(name, v),
                                     "loss terms per example of an (N, *rows, C) output (None = the rows, one term per "
                                     "position); the loss is their mean (curvlab.losses)"),
    "norm_curvature": Option("auto", one_of("auto", "dense", "diagonal", "off"),
                             "LayerNorm/RMSNorm scale and shift: a dense or diagonal Fisher block from per-example "
                             "gradients ('auto': dense up to 1024 parameters per layer), or 'off' (first-order "
                             "fallback); see curvlab.estimators.scale_shift"),
    "capture": Option("hooks", one_of("hooks", "backpack"),
                      "statistics backend: forward/backward hooks (default) or BackPACK extensions"),
    "layers": Option(None, lambda name, v: _names(name, v),
                     "precondition only these module names (None = every layer an adapter claims)"),
    "nonfinite": Option("skip", one_of("skip", "raise"),
                        "NaN/Inf in gradients or statistics: skip the step (logged) or raise"),
    "max_skipped_steps": Option(10, lambda name, v: None if v is None else positive_int(name, v),
                                "raise curvlab.Diverged after this many skipped (non-finite) steps in a row, or when "
                                "step(closure)'s loss is NaN/Inf (None = never; curvlab.divergence)"),
    # Levenberg-Marquardt damping (Martens & Grosse 2015 sec. 6.5; curvlab.damping): needs opt.step(closure)
    "damping_adapt": Option(None, _optional_lm, "None = fixed damping; 'lm' = Levenberg-Marquardt adaptation of "
                            "every group's damping from the reduction ratio rho (needs opt.step(closure))"),
    "damping_interval": Option(5, positive_int, "T1: adapt the damping on steps t % T1 == 0"),
    "damping_omega": Option(None, _omega, "LM factor omega in (0, 1): rho > high -> damping * omega, rho < low -> "
                            "damping / omega (None = (19/20)^damping_interval)"),
    "damping_min": Option(1e-8, non_negative, "lower bound of the adapted damping"),
    "damping_max": Option(1e6, positive, "upper bound of the adapted damping"),
    "damping_thresholds": Option((0.25, 0.75), _thresholds, "(low, high) reduction-ratio thresholds of the LM rule"),
    "damping_refresh": Option(False, boolean, "True = refresh the curvature on the step after an LM adaptation that "
                              "moved the damping (default: at its next inv_interval refresh; no effect with "
                              "gamma_adapt, where the curvature uses gamma)"),
    "damping_rho": Option("same", one_of("same", "next"), "which batch measures rho's actual loss change: 'same' = "
                          "the step's own batch; 'next' = the next step's batch, at the parameters before and after "
                          "the update (a held-out ratio; needs the closure on the step after each adaptation step)"),
    # the curvature's own damping gamma (Martens & Grosse 2015 sec. 6.6; curvlab.factor_damping)
    "gamma_adapt": Option(False, boolean, "True = the curvature's solve uses a separate damping gamma per group "
                          "(initially its damping), chosen greedily every gamma_interval steps among gamma * "
                          "{omega2, 1, 1/omega2} by the lowest quadratic-model value M(delta)"),
    "gamma_interval": Option(20, positive_int, "T2: choose gamma on steps t % T2 == 0"),
    "gamma_omega": Option(None, lambda name, v: _omega(name, v, "sqrt(19/20)^gamma_interval"),
                          "omega2 in (0, 1): the gamma candidates are gamma * omega2, gamma, gamma / omega2 "
                          "(None = sqrt(19/20)^gamma_interval)"),
    "gamma_score": Option("model", one_of("model", "next"), "what chooses gamma: 'model' = the lowest M(delta) on "
                          "the step's batch (Martens & Grosse 6.6); 'next' = the lowest loss of the next step's batch at the "
                          "three candidate updates (held out; needs the closure on the step after each gamma step)"),
    "data_parallel": Option("auto", _data_parallel,
                            "torch.distributed data parallelism (curvlab.distributed): 'auto' = on for a DDP model or "
                            "a process group of > 1 ranks; True = require a process group; False = this rank only"),
    "data_parallel_refresh": Option("replicated", one_of("replicated", "distributed"),
                                    "data-parallel inverse/root refreshes: every rank refreshes every layer "
                                    "('replicated') or each layer's owner rank refreshes and broadcasts it "
                                    "('distributed', KAISA-like, owners balanced by estimated cost)"),
}


def resolve(given: Mapping[str, Any], options: Mapping[str, Option]) -> dict[str, Any]:
    """Validate ``given`` against ``options`` and fill in defaults.

    Unknown names raise ``TypeError`` with a "did you mean"; bad values raise ``ValueError``/``TypeError``
    naming the argument.
    """
    out: dict[str, Any] = {}
    for key in given:
        if key not in options:
            close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise HyperParameterError(f"unknown hyper-parameter {key!r}.{hint} Accepted: {', '.join(sorted(options))}.")
    for key, opt in options.items():
        out[key] = opt.check(key, given[key]) if key in given else opt.default
    return out


def declared_defaults(estimator: type, rule: type, scaling: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults the components of an (estimator, rule, scaling) triple declare, merged by precedence.

    ``estimator.defaults`` and ``estimator.defaults_for(rule name, config)`` if it has one (without ``kl_clip``
    unless ``rule.trust_region``; an option the rule's or the scaling's
    option table declares is left to that table), then ``rule.defaults``, then ``estimator.rule_defaults.get(rule
    name)``, then ``scaling.defaults_for(estimator name, rule name, config)``; each later table wins. ``config`` is
    the configuration resolved without them (the user's values and the option tables' defaults), for defaults that
    depend on another option (muP's ``mup_damping``). Values are validated by :func:`resolve` like the user's; the
    caller lets the user's values win.
    """
    est_name, rule_name = getattr(estimator, "registry_name", ""), getattr(rule, "registry_name", "")
    out = dict(getattr(estimator, "defaults", {}) or {})
    by_estimator = getattr(estimator, "defaults_for", None)
    if by_estimator is not None:
        out.update(by_estimator(rule_name, config) or {})
    if not getattr(rule, "trust_region", False):
        out.pop("kl_clip", None)          # a rule that does not apply the KL clip never gets it by default
    for key in getattr(rule, "options", {}):
        out.pop(key, None)                # a rule's own option table sits at the rule's level (qmodel's lr)
    out.update(getattr(rule, "defaults", {}) or {})
    out.update((getattr(estimator, "rule_defaults", {}) or {}).get(rule_name, {}))
    for key in getattr(scaling, "options", {}):
        out.pop(key, None)
    by_scaling = getattr(scaling, "defaults_for", None)
    if by_scaling is not None:
        out.update(by_scaling(est_name, rule_name, config) or {})
    return out


def merge_options(*tables: Iterable[tuple[str, Option]] | Mapping[str, Option]) -> dict[str, Option]:
    """Union of option tables; later tables override earlier defaults for the same name."""
    merged: dict[str, Option] = {}
    for table in tables:
        items = table.items() if isinstance(table, Mapping) else table
        merged.update(dict(items))
    return merged
