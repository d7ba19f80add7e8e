"""The equal-budget protocol in process: tune every method alike on a validation split, then touch the test set once.

The paper-figure scripts train in process (:mod:`curvlab.experiments.traces`), not through run directories, so they
use this module instead of ``curvlab tune``; the rules are the same (:mod:`curvlab.equal_budget`):

1. every method gets the same number of trials, the same sampler and seed, over its own search space; a
   second-order method's space always holds its damping (:func:`curvlab.equal_budget.check_equal_budget` refuses
   otherwise);
2. a trial trains on the fitting part of the training data and is scored on the validation part (carved from the
   training data with :func:`curvlab.validation.carve_validation`); the test set is never read while tuning;
3. the best configuration of each method is re-run with several seeds and evaluated on the test set, once.

The caller supplies ``run(method, params, phase, seed) -> metrics``: with ``phase == "val"`` it trains on the fitting
part and returns validation metrics, with ``phase == "test"`` it trains the same way and returns test metrics. The
record (:func:`fair_compare`) holds, per method, the search space, the budget, every trial, the best parameters and
the test mean +- std, so a figure's JSON says how each method was tuned.

    methods = [Method("sgd", {"lr": LR}), Method("kfac", {"lr": LR, "damping": DAMPING}, second_order=True)]
    record = fair_compare(methods, run, trials=8, metric="val_accuracy", seeds=[0, 1, 2])
    print(record["table"])
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..equal_budget import check_equal_budget, compare_tunes, mean_std
from ..tuning import parse_space, tune

__all__ = ["Method", "fair_compare", "edge_params", "PHASES"]

#: What ``run`` is asked for: ``"val"`` (tuning: score on the validation split) or ``"test"`` (the final re-runs).
PHASES = ("val", "test")


@dataclass
class Method:
    """One method of a comparison.

    Attributes:
        name: the label in tables and figures.
        space: its search space (:func:`curvlab.tuning.parse_space`), e.g. ``{"lr": {"low": 1e-3, "high": 1,
            "log": True}}``.
        second_order: whether it preconditions with a curvature (its space must then tune ``damping``).
        fixed: settings that are not tuned (recorded; handed to ``run`` through ``method.fixed``).
    """

    name: str
    space: dict[str, Any]
    second_order: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)


def _score(metrics: Mapping[str, Any], metric: str, direction: str) -> float:
    value = metrics.get(metric)
    if value is None or not math.isfinite(float(value)):
        return -math.inf if direction == "maximize" else math.inf
    return float(value)


def fair_compare(methods: Sequence[Method], run: Callable[[Method, dict[str, Any], str, int], Mapping[str, Any]],
                 trials: int, *, metric: str = "val_accuracy", test_metric: str | None = None,
                 direction: str = "maximize", seeds: Sequence[int] = (0, 1, 2), sampler: str = "tpe",
                 seed: int = 0, tuning_seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Tune each method with the same budget on validation data, re-run its best configuration with ``seeds`` on
    the test set, and tabulate.

    Args:
        methods: the methods (distinct names).
        run: ``run(method, params, phase, seed) -> metrics`` (see the module docstring); ``params`` merges the
            tuned values over ``method.fixed``.
        trials: the budget per method.
        metric: the validation metric selected on (a key of ``run``'s result in phase ``"val"``).
        test_metric: the key reported from phase ``"test"`` (default: ``metric`` with ``val_`` -> ``test_``).
        direction: ``"maximize"`` or ``"minimize"``.
        seeds: the seeds of the final re-runs.
        sampler, seed: the sampler and its seed, the same for every method (:func:`curvlab.tuning.tune`).
        tuning_seed: the training seed of every trial (the same for every method and trial).
        progress: print a line per finished trial to stderr.

    Returns:
        ``{"protocol", "trials", "metric", "test_metric", "methods": {name: record}, "rows", "table"}`` where a
        method's record is :meth:`curvlab.tuning.TuneResult.record` plus ``fixed``, ``budget`` and ``final``
        (``{test_metric: mean_std(...), "runs": [metrics per seed]}``).
    """
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be distinct, got {names}")
    test_metric = test_metric or (metric.replace("val_", "test_", 1) if metric.startswith("val_") else metric)
    records: dict[str, dict[str, Any]] = {}
    # check the budgets before spending them (same trials; damping in every second-order space)
    check_equal_budget({m.name: {"trials": trials, "space": m.space,
                                 "method": {"second_order": m.second_order}} for m in methods})
    for m in methods:
        def objective(params: dict[str, Any], ctx: Any, m: Method = m) -> float:
            metrics = run(m, {**m.fixed, **params}, "val", tuning_seed)
            ctx.set("metrics", {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, type(None)))})
            value = _score(metrics, metric, direction)
            if progress:
                shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
                print(f"  [{m.name}] trial {ctx.number + 1}/{trials}: {metric}={value:.4g} ({shown})",
                      file=sys.stderr, flush=True)
            return value

        result = tune(objective, m.space, trials, sampler=sampler, seed=seed, metric=metric, direction=direction,
                      method={"name": m.name, "second_order": m.second_order})
        rec = result.record()
        best = {**m.fixed, **result.best_params}
        runs = [dict(run(m, best, "test", s)) for s in seeds]
        rec.update(fixed=dict(m.fixed), budget={"trials": trials, "finished": result.finished, "sampler": sampler,
                                                "space": rec["space"], "tuning_seed": tuning_seed},
                   final={test_metric: mean_std([r.get(test_metric) for r in runs]), "seeds": list(seeds),
                          "runs": runs})
        records[m.name] = rec
        if progress:
            f = rec["final"][test_metric]
            print(f"[{m.name}] best {result.best_params} -> {test_metric} {f['mean']} +- {f['std']} "
                  f"({len(seeds)} seeds)", file=sys.stderr, flush=True)
    table = compare_tunes(records, metric=test_metric)
    return {"protocol": "equal budget: same trials, sampler and seed per method; selection on a validation split "
                        "of the training data; the best configuration re-run on the test set with several seeds",
            "trials": trials, "metric": metric, "test_metric": test_metric, "methods": records,
            "rows": table["rows"], "table": table["table"]}


def edge_params(params: Mapping[str, Any], space: Mapping[str, Any], tol: float = 0.1) -> list[str]:
    """The names of ``params`` within ``tol`` of their range's width (in log space for a log range) from an
    edge of ``space``: the best there may lie outside the range."""
    flagged = []
    for name, p in parse_space(space).items():
        if p.choices is not None or name not in params:
            continue
        f = math.log if p.log else float
        lo, hi, v = f(p.low), f(p.high), f(params[name])
        if hi > lo and min(v - lo, hi - v) <= tol * (hi - lo):
            flagged.append(name)
    return flagged
