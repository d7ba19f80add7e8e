"""The configurations and axes of an ablation report (:mod:`.ablation_report`): what a report's rows, columns and
cells are made of.

A *configuration* is the runs that differ only in ``train.seed`` (:func:`~curvlab.experiments.reporting.group_runs`;
its number is the mean over its seeds). An *axis* is named by

* a sweep axis (``sweep.json``: ``variant``, ``optimizer.lr``, ...),
* or any dotted config key, even one the sweep did not vary (``optimizer.estimator`` set by a variant),
* or the unique last component of one (``estimator``, ``batch_size``, ``lr``),
* or several joined by ``+`` (``estimator+rule`` -> the value ``"kfac/fop"``).

:func:`resolve_axis` turns a name into full keys (a missing or ambiguous name raises ``ValueError`` listing the
available ones), :func:`axis_value` reads a configuration's value on an axis, :func:`ordered` lays the values out,
and :func:`best_of` picks a cell's configuration when several fall into it: the BEST by the seed-mean of the metric
(:func:`higher_is_better`: highest accuracy, lowest loss / time / epochs), i.e. "each method at its best learning
rate".
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from .config import flatten
from .reporting import Configuration, collect_runs, group_runs
from .runner import RunResult

__all__ = ["Source", "AxisSpec", "higher_is_better", "load_configurations", "resolve_axis", "axis_name",
           "axis_value", "ordered", "check_metric", "format_value", "best_of"]

Source = Union[str, Path, Sequence[Configuration], Sequence[RunResult]]
AxisSpec = Union[str, Sequence[str]]


def higher_is_better(metric: str) -> bool:
    """Accuracies are maximized; everything else (losses, times, epochs, step ms) minimized."""
    return "accuracy" in metric


def load_configurations(source: Source) -> tuple[list[Configuration], list[str]]:
    """Configurations and varying axes of a folder of runs, a list of runs or a list of configurations."""
    if isinstance(source, (str, Path)):
        runs = collect_runs(source)
        if not runs:
            raise ValueError(f"no finished runs under {str(source)!r} (a run directory is finished once it "
                             "holds DONE)")
        return group_runs(runs, source)
    items = list(source)
    if not items:
        raise ValueError("no configurations given")
    if all(isinstance(i, Configuration) for i in items):
        axes: list[str] = []
        for c in items:
            axes += [a for a in c.axes if a not in axes]
        return items, axes
    if all(isinstance(i, RunResult) for i in items):
        return group_runs(items)
    raise TypeError("source must be a folder, a list of RunResult or a list of Configuration")


def _keys(configs: Sequence[Configuration]) -> list[str]:
    keys: list[str] = []
    for c in configs:
        keys += [k for k in flatten(c.runs[0].config) if k not in keys]
    return keys


def resolve_axis(configs: Sequence[Configuration], axes: Sequence[str], axis: AxisSpec) -> list[str]:
    """The full key(s) an axis name refers to (see the module docstring); ValueError listing the choices."""
    parts = axis.split("+") if isinstance(axis, str) else list(axis)
    keys = _keys(configs)
    out = []
    for part in parts:
        part = part.strip()
        if part in axes or part in keys:
            out.append(part)
            continue
        cands = list(dict.fromkeys(k for k in [*axes, *keys] if k.rsplit(".", 1)[-1] == part))
        if len(cands) == 1:
            out.append(cands[0])
            continue
        varying = ", ".join(axes) or "(none)"
        if cands:
            raise ValueError(f"axis {part!r} is ambiguous: it could be {', '.join(cands)}; give the full key")
        raise ValueError(f"axis {part!r} not found. Axes that vary in these runs: {varying}; any config key "
                         f"also works: {', '.join(k for k in keys if k not in axes)}")
    return out


def axis_name(keys: Sequence[str]) -> str:
    """Display name of an axis: the last part of each key (``estimator+rule``)."""
    return "+".join(k.rsplit(".", 1)[-1] for k in keys)


def axis_value(c: Configuration, keys: Sequence[str]) -> Any:
    """The value of configuration ``c`` on the axis of ``keys`` (several keys: their values joined by ``/``)."""
    flat = flatten(c.runs[0].config)
    vals = [c.axes[k] if k in c.axes else flat.get(k) for k in keys]
    return vals[0] if len(vals) == 1 else "/".join(str(v) for v in vals)


def ordered(values: list[Any]) -> list[Any]:
    """Distinct values: sorted when all numbers, else in order of first appearance (sweep order)."""
    distinct = list(dict.fromkeys(repr(v) for v in values))
    first = {repr(v): v for v in reversed(values)}
    vals = [first[r] for r in distinct]
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return sorted(vals)
    return vals


def check_metric(configs: Sequence[Configuration], metric: str) -> None:
    """ValueError listing the numeric summary keys unless some run's summary holds ``metric``."""
    if any(metric in r.summary for c in configs for r in c.runs):
        return
    numeric = sorted({k for c in configs for r in c.runs for k, v in r.summary.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
    raise ValueError(f"metric {metric!r} is not in the runs' summaries; numeric summary keys: {', '.join(numeric)}")


def format_value(v: Any) -> str:
    """An axis value as a table cell or tick label (floats in ``%g``)."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def best_of(configs: Sequence[Configuration], metric: str) -> tuple[Configuration | None, float | None]:
    """The best configuration by the seed-mean of ``metric`` (None when no configuration has a value)."""
    scored = [(c.mean(metric), c) for c in configs]
    scored = [(v, c) for v, c in scored if v is not None]
    if not scored:
        return None, None
    sign = -1.0 if higher_is_better(metric) else 1.0
    v, c = min(scored, key=lambda t: sign * t[0])
    return c, v
