"""The equal-budget protocol (:mod:`.fair`) for the paper figures that plot traces (:mod:`.traces`).

paper_figures/mbf.py (Bahamou et al., AISTATS 2023: training loss vs wall-clock) and paper_figures/isaac.py
(Petersen et al., ICLR 2023: accuracy per step and per second) compare methods by their curves. This module makes
those curves come out of :func:`.fair.fair_compare`:

* :class:`TracedRuns` is the ``run(method, params, phase, seed)`` callable: it builds the model and the optimizer
  (:func:`.traces.build_optimizer` with ``method.fixed`` and the tuned values), trains on the FITTING part of the
  training data with :func:`.traces.train_traced`, and returns the last evaluated row, whose ``val_*`` keys (phase
  ``"val"``) or ``test_*`` keys (phase ``"test"``) come from the caller's ``evaluate(model, phase)``; the test set
  is read only in phase ``"test"``. It keeps the traces of the test re-runs (the curves of the figure) and, for
  curvlab optimizers, the damping diagnostic (:func:`curvlab.diagnostics.damping_metrics`) at the end of each of
  them: damping vs the curvature's eigenvalues per layer, at the tuned configuration.
* :func:`results_of` turns the record and the runs into the ``{label: {"lr", "traces"}}`` form that
  :func:`.traces.summary_rows` and :func:`.traces.plot_curves` read; :func:`tuned_methods` gives the method
  dicts at their tuned values (for :func:`.traces.bench_chosen`).
* :func:`edge_hits` names the tuned values that sit near an edge of their log range (the optimum may lie
  outside); :func:`damping_summary` condenses a diagnostic into "how many factors are swamped".
* :func:`publish_fair` writes the figure and the JSON (setup, tuning record with every trial, search spaces and
  budgets, table, traces, damping diagnostic, edge hits) and prints the tables.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .fair import Method, edge_params
from .traces import Trace, build_optimizer, format_table, numbers, train_traced

__all__ = ["TracedRuns", "results_of", "tuned_methods", "edge_hits", "damping_summary", "publish_fair"]

#: A tuned value within this fraction of its (log) range from an edge is reported as an edge hit.
EDGE_FRACTION = 0.05


class TracedRuns:
    """``run(method, params, phase, seed) -> metrics`` for :func:`.fair.fair_compare` over traced training.

    Args:
        make_model: ``make_model(seed) -> nn.Module``.
        x_fit, y_fit: the fitting part of the training data (the validation part is carved off by the caller,
            :func:`curvlab.validation.carve_validation`).
        evaluate: ``evaluate(model, phase) -> metrics``; in phase ``"val"`` it must not read the test set.
        loss: curvlab's loss name (``"cross_entropy"`` | ``"mse"``) for the curvature; ``loss_fn`` the callable.
        batch_size, steps, eval_every: the training budget of every run (tuning trials and test re-runs alike).
        progress: a progress bar per run.

    Attributes:
        traces: ``{method name: [Trace per test seed]}``.
        damping: ``{method name: [damping_metrics per test seed]}`` (curvlab optimizers only).
        cpu_s: ``{method name: process CPU seconds of all its runs}``.
    """

    def __init__(self, make_model: Callable[[int], torch.nn.Module], x_fit: torch.Tensor, y_fit: torch.Tensor,
                 evaluate: Callable[[torch.nn.Module, str], dict[str, float]], *, loss: str, loss_fn: Callable,
                 batch_size: int, steps: int, eval_every: int, progress: bool = False) -> None:
        self.make_model, self.x_fit, self.y_fit, self.evaluate = make_model, x_fit, y_fit, evaluate
        self.loss, self.loss_fn = loss, loss_fn
        self.batch_size, self.steps, self.eval_every, self.progress = batch_size, steps, eval_every, progress
        self.traces: dict[str, list[Trace]] = {}
        self.damping: dict[str, list[dict[str, Any]]] = {}
        self.cpu_s: dict[str, float] = {}

    def __call__(self, method: Method, params: dict[str, Any], phase: str, seed: int) -> dict[str, Any]:
        if phase not in ("val", "test"):
            raise ValueError(f"phase must be 'val' or 'test', got {phase!r}")
        start = time.process_time()
        model = self.make_model(seed)
        opt = build_optimizer(model, {"label": method.name, **params}, params["lr"], self.loss, seed)
        trace = train_traced(model, opt, self.x_fit, self.y_fit, loss_fn=self.loss_fn, batch_size=self.batch_size,
                             steps=self.steps, eval_every=self.eval_every,
                             evaluate=lambda m: self.evaluate(m, phase), seed=seed, progress=self.progress,
                             desc=f"{method.name} {phase} seed {seed}")
        metrics: dict[str, Any] = dict(trace.rows[-1]) if trace.rows else {}
        if trace.diverged:                              # a diverged run scores worst (fair._score: NaN)
            metrics = {k: (math.nan if k.startswith(f"{phase}_") else v) for k, v in metrics.items()}
        metrics["diverged"] = trace.diverged
        if phase == "test":
            self.traces.setdefault(method.name, []).append(trace)
            if hasattr(opt, "units"):
                from ..diagnostics import damping_metrics

                self.damping.setdefault(method.name, []).append(damping_metrics(opt))
        self.cpu_s[method.name] = self.cpu_s.get(method.name, 0.0) + time.process_time() - start
        return metrics


def results_of(record: Mapping[str, Any], runs: TracedRuns) -> dict[str, dict[str, Any]]:
    """``{label: {"lr", "params", "grid", "traces"}}`` of the tuned configurations' test re-runs (for
    :func:`.traces.summary_rows` and :func:`.traces.plot_curves`; ``grid`` is the tuning history)."""
    out = {}
    for name, rec in record["methods"].items():
        params = {**rec["fixed"], **rec["best"]["params"]}
        out[name] = {"lr": params["lr"], "params": params, "grid": rec["history"], "traces": runs.traces[name]}
    return out


def tuned_methods(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each method as a :mod:`.traces` method dict (``label``, ``optimizer``, tuned ``lr`` and hyper-parameters)."""
    return [{"label": name, **rec["fixed"], **rec["best"]["params"]} for name, rec in record["methods"].items()]


def edge_hits(record: Mapping[str, Any], fraction: float = EDGE_FRACTION) -> dict[str, list[str]]:
    """``{method: ["lr at high edge", ...]}``: tuned values within ``fraction`` of their range (in log space for
    log ranges) from an edge, i.e. the optimum may lie outside the searched range. Methods without hits are
    left out."""
    hits: dict[str, list[str]] = {}
    for name, rec in record["methods"].items():
        params, space = rec["best"]["params"], rec["space"]
        for key in edge_params(params, space, tol=fraction):
            spec, value = space[key], params[key]
            f = math.log if spec.get("log") else float
            low_side = f(value) - f(spec["low"]) <= f(spec["high"]) - f(value)
            hits.setdefault(name, []).append(f"{key}={value:.3g} at the {'low' if low_side else 'high'} edge "
                                             f"of [{spec['low']:g}, {spec['high']:g}]")
    return hits


def damping_summary(metrics: Mapping[str, Mapping[str, Any]], threshold: float = 1.0) -> dict[str, Any]:
    """Condense one :func:`curvlab.diagnostics.damping_metrics` result: number of damped factors, how many have
    ``damping / mean eigenvalue > threshold`` (swamped: the preconditioner is close to ``I / damping`` there),
    and the median and range of that ratio."""
    ratios = [r["ratio_mean"] for r in metrics.values() if r.get("ratio_mean") is not None]
    return {"factors": len(metrics), "swamped": sum(r > threshold for r in ratios), "threshold": threshold,
            "median_ratio_mean": statistics.median(ratios) if ratios else None,
            "min_ratio_mean": min(ratios) if ratios else None, "max_ratio_mean": max(ratios) if ratios else None}


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def publish_fair(out: Any, stem: str, fig: Any, record: dict[str, Any], results: dict[str, dict[str, Any]],
                 rows: list[dict[str, Any]], setup: dict[str, Any], runs: TracedRuns, bench: dict[str, list[float]],
                 columns: Sequence[str], *, threshold_note: str, bench_steps: int) -> dict[str, Any]:
    """Write ``out/stem.png/.pdf`` and ``out/stem.json`` (module doc) and print the tuning table, edge hits,
    damping summaries and the curve table; returns the JSON data."""
    from ..figures import save_figure, write_numbers

    save_figure(fig, out, stem)
    data = numbers(results, rows, setup)
    for name, res in results.items():
        data["methods"][name]["params"] = res["params"]
    hits = edge_hits(record)
    damping = {name: {"per_seed": per_seed, "summary": [damping_summary(m) for m in per_seed]}
               for name, per_seed in runs.damping.items()}
    data.update(tuning=record, edge_hits=hits, damping=damping, bench_step_s=bench,
                cpu_s={k: round(v, 2) for k, v in runs.cpu_s.items()})
    write_numbers(out, stem, data)
    print(f"equal-budget tuning ({record['trials']} trials per method, selected on {record['metric']}):")
    print(record["table"])
    for name, rec in record["methods"].items():
        print(f"  {name}: best {_fmt_params(rec['best']['params'])} (val {rec['best']['value']:.4g}); "
              f"space {_fmt_params({k: (v.get('low'), v.get('high')) for k, v in rec['space'].items()})}")
    for name, items in hits.items():
        print(f"  EDGE {name}: " + "; ".join(items))
    for name, d in damping.items():
        s = d["summary"][0]
        if not s["factors"]:
            continue
        print(f"  damping diagnostic {name} (first test seed, end of training): {s['swamped']}/"
              f"{s['factors']} factors with damping > mean eigenvalue; damping/mean median "
              f"{s['median_ratio_mean']:.3g} (range {s['min_ratio_mean']:.3g}..{s['max_ratio_mean']:.3g})"
              if s["median_ratio_mean"] is not None else f"  damping diagnostic {name}: no damped factor")
    print(f"{threshold_note} (steps / seconds to reach it below); bench_*: mean step time over {bench_steps} "
          "round-robin steps")
    print(format_table(rows, columns))
    return data
