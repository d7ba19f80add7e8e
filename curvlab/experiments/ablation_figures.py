"""Figures of the ablation reports (:mod:`curvlab.experiments.ablation_report`): the annotated heat map (best
cell per row framed), metric-vs-axis curves with the spread over seeds, and epochs / seconds to a target.

Each function takes the report object (:class:`~curvlab.experiments.ablation_report.Heatmap`, ``Curves``,
``TargetTable``) and returns a matplotlib ``Figure`` (no pyplot: safe in worker processes); the report module
writes it as PNG and PDF.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .ablation_axes import format_value, higher_is_better, ordered

if TYPE_CHECKING:
    from .ablation_report import Curves, Heatmap, TargetTable


def heatmap_figure(h: Heatmap, spec: str) -> Any:
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    data = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in r] for r in h.values], dtype=float))
    fig = Figure(figsize=(2.5 + 1.1 * max(len(h.cols), 2), 1.5 + 0.6 * max(len(h.rows), 2)), layout="constrained")
    ax = fig.subplots()
    cmap = "viridis" if higher_is_better(h.metric) else "viridis_r"  # brighter = better either way
    image = ax.imshow(data, cmap=cmap, aspect="auto")
    fig.colorbar(image, ax=ax, label=h.metric)
    finite = data.compressed()
    mid = float(finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i, row in enumerate(h.values):
        for j, v in enumerate(row):
            if v is None:
                ax.text(j, i, "-", ha="center", va="center", color="grey")
                continue
            bright = (v >= mid) == higher_is_better(h.metric)
            ax.text(j, i, format(v, spec), ha="center", va="center", fontsize=8,
                    color="black" if bright else "white", fontweight="bold" if j == h.best_col[i] else "normal")
        if h.best_col[i] is not None:
            ax.add_patch(Rectangle((h.best_col[i] - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_xticks(range(len(h.cols)), [format_value(c) for c in h.cols], rotation=30, ha="right")
    ax.set_yticks(range(len(h.rows)), [format_value(r) for r in h.rows])
    ax.set(xlabel=h.col_axis, ylabel=h.row_axis, title=f"{h.metric}\n(best per row framed)")
    return fig


def is_numeric(xs: Sequence[Any]) -> bool:
    return bool(xs) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)


def x_ticks(ax: Any, xs: Sequence[Any]) -> None:
    """Numbers spanning a factor >= 8: log2 scale with the values as ticks; labels: one tick each."""
    if not is_numeric(xs):
        ax.set_xticks(range(len(xs)), [format_value(x) for x in xs], rotation=30, ha="right")
    elif all(x > 0 for x in xs) and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [format_value(x) for x in xs])


def curves_figure(c: Curves, title: str | None = None) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    xs = ordered([x for pts in c.points.values() for x, *_ in pts])
    numeric = is_numeric(xs)
    pos = {repr(x): (x if numeric else i) for i, x in enumerate(xs)}
    for s, pts in c.points.items():
        ax.errorbar([pos[repr(x)] for x, *_ in pts], [v for _, v, *_ in pts],
                    yerr=[sd or 0.0 for _, _, sd, _ in pts], marker="o", capsize=3, label=format_value(s))
    x_ticks(ax, xs)
    ax.set(xlabel=c.x_axis, ylabel=c.metric, title=title or f"{c.metric} vs {c.x_axis}")
    ax.grid(alpha=0.3)
    if len(c.points) > 1:
        ax.legend(fontsize=8, title=c.series_axis)
    return fig


def target_figure(t: TargetTable) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    numeric = is_numeric(t.rows)
    xs = t.rows if numeric else list(range(len(t.rows)))
    for j, col in enumerate(t.cols):
        for ax, attr in zip(axes, ("epochs", "seconds")):
            pts = [(x, getattr(row[j], attr)) for x, row in zip(xs, t.entries) if getattr(row[j], attr) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=format_value(col))
    for ax, what in zip(axes, ("epochs", "training seconds")):
        x_ticks(ax, t.rows)
        ax.set(xlabel=t.row_axis, ylabel=f"{what} to {t.target:g}", title=f"{what} to test accuracy {t.target:g}")
        ax.grid(alpha=0.3)
        if ax.lines and len(t.cols) > 1:
            ax.legend(fontsize=8, title=t.col_axis)
    return fig
