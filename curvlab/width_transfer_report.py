"""The reading of a learning-rate x width sweep (:func:`curvlab.width_transfer.lr_width_sweep`; Ishikawa &
Karakida, ICLR 2024, arXiv 2312.12226, Figure 6; ALGORITHMS.md 5.4).

:func:`best_lr_shift` reduces the sweep's records to the best lr per width and its shift
``log2(best_lr(M_max) / best_lr(M_min))`` per (estimator, scaling), the number the paper's claim is about (muP:
the optimum stays put, shift ~ 0; SP: it drifts); :func:`base_width_agreement` checks that SP and muP coincide at
the base width (``sp_init="matched"``); :func:`format_table` prints the shifts and :func:`plot_lr_width` draws the
Figure-6-like panels. Everything here reads records (plain dicts) only: no training.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

__all__ = ["best_lr_shift", "base_width_agreement", "format_table", "plot_lr_width"]


def _group(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[int, dict[float, list[float]]]]:
    """``{(estimator, scaling): {width: {lr: [final_loss per seed]}}}``."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        loss = r["final_loss"]
        out[(r["estimator"], r["scaling"])][int(r["width"])][float(r["lr"])].append(
            math.nan if loss is None or r.get("diverged") else float(loss))
    return out


def best_lr_shift(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``"estimator/scaling"``: the best lr at each width and how far it moves from the smallest width.

    The loss at (width, lr) is the mean over seeds; a seed that diverged (NaN) makes that lr count as diverged.
    ``best_lr[i]`` is the lr of the lowest mean loss at ``widths[i]`` (``None`` if every lr diverged);
    ``shift_log2 = log2(best_lr[-1] / best_lr[0])`` and ``shift_steps`` the same in positions of the sorted
    lr grid (union of the grids of that group); ``max_abs_shift_log2`` the largest ``|log2(best_lr[i] /
    best_lr[0])|``; ``at_edge`` whether some best lr is the smallest or largest lr tried (then the true optimum
    may lie outside the grid and the shift is a bound); ``stability_edge[i]`` whether the next larger lr diverged
    at ``widths[i]`` (the best lr is then the largest stable one, not a minimum of a smooth loss curve)."""
    summary: dict[str, dict[str, Any]] = {}
    for (est, scaling), by_width in sorted(_group(records).items()):
        widths = sorted(by_width)
        grid = sorted({lr for w in widths for lr in by_width[w]})
        best_lr: list[float | None] = []
        best_loss: list[float] = []
        curves: dict[int, list[float]] = {}
        for w in widths:
            means = {lr: (sum(v) / len(v)) for lr, v in by_width[w].items()}
            curves[w] = [means.get(lr, math.nan) for lr in grid]
            finite = {lr: m for lr, m in means.items() if math.isfinite(m)}
            if finite:
                lr = min(finite, key=lambda k: (finite[k], k))
                best_lr.append(lr)
                best_loss.append(finite[lr])
            else:
                best_lr.append(None)
                best_loss.append(math.nan)
        # the next larger lr diverged: the optimum is set by stability, not by a minimum of the loss curve
        edge = [b is not None and grid.index(b) + 1 < len(grid) and math.isnan(curves[w][grid.index(b) + 1])
                for w, b in zip(widths, best_lr)]
        first, last = best_lr[0], best_lr[-1]
        ok = first is not None and last is not None
        known = [b for b in best_lr if b is not None]
        summary[f"{est}/{scaling}"] = {
            "estimator": est, "scaling": scaling, "widths": widths, "lr_grid": grid, "best_lr": best_lr,
            "best_loss": best_loss, "curves": {str(w): c for w, c in curves.items()},
            "shift_log2": math.log2(last / first) if ok else math.nan,
            "shift_steps": grid.index(last) - grid.index(first) if ok else None,
            "max_abs_shift_log2": (max(abs(math.log2(b / first)) for b in known) if first is not None
                                   else math.nan),
            "at_edge": any(b in (grid[0], grid[-1]) for b in known) if len(grid) > 1 else True,
            "stability_edge": edge,
            "diverged_runs": sum(1 for w in widths for v in by_width[w].values() for x in v if math.isnan(x)),
        }
    return summary


def base_width_agreement(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per estimator: the largest ``|loss_SP - loss_muP|`` over (lr, seed) at the smallest width (0 when the two
    scalings coincide there, as they should with ``sp_init="matched"`` and ``base_width = min(widths)``)."""
    runs: dict = defaultdict(dict)
    for r in records:
        runs[r["estimator"]][(r["scaling"], int(r["width"]), float(r["lr"]), r["seed"])] = r["final_loss"]
    out = {}
    for est, table in runs.items():
        w0 = min(k[1] for k in table)
        diffs = [abs(table[("standard", w, lr, s)] - v) for (sc, w, lr, s), v in table.items()
                 if sc == "mup" and w == w0 and ("standard", w, lr, s) in table]
        finite = [d for d in diffs if math.isfinite(d)]
        if diffs:
            out[est] = max(finite) if finite else math.nan
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The best lr per width and the shift per (estimator, scaling), as text."""
    lines = []
    for key, s in summary.items():
        cells = "  ".join(f"{w}:{'diverged' if b is None else f'{b:.3g}'}" for w, b in zip(s["widths"], s["best_lr"]))
        steps = "n/a" if s["shift_steps"] is None else f"{s['shift_steps']:+d}"
        edge = "  (best lr at grid edge)" if s["at_edge"] else ""
        stab = sum(s.get("stability_edge", []))
        stab_note = f"  (next lr diverged at {stab}/{len(s['widths'])} widths)" if stab else ""
        lines.append(f"{key:<20} best lr by width  {cells}   shift log2 {s['shift_log2']:+.2f} "
                     f"({steps} grid steps), max |shift| {s['max_abs_shift_log2']:.2f}{edge}{stab_note}")
    return "\n".join(lines)


def plot_lr_width(summary: dict[str, dict[str, Any]], title: str = "") -> Any:
    """One panel per estimator (rows) x scaling (columns): final train loss vs lr (log-log), one curve per width
    (viridis, dark = narrow), best lr marked by a star; diverged points are left out of the curves (said in the
    figure title)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    estimators = list(dict.fromkeys(s["estimator"] for s in summary.values()))
    scalings = list(dict.fromkeys(s["scaling"] for s in summary.values()))
    # fixed margins instead of a constrained layout: the layout engine's tight boxes dominate the drawing time
    fig = Figure(figsize=(4.2 * len(scalings), 3.3 * len(estimators) + 0.5))
    axes = fig.subplots(len(estimators), len(scalings), squeeze=False)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.07, top=0.9, wspace=0.3, hspace=0.45)
    for i, est in enumerate(estimators):
        for j, sc in enumerate(scalings):
            ax, s = axes[i][j], summary.get(f"{est}/{sc}")
            if s is None:
                ax.set_axis_off()
                continue
            cmap = colormaps["viridis"]
            n = len(s["widths"])
            for k, (w, b, bl) in enumerate(zip(s["widths"], s["best_lr"], s["best_loss"])):
                color = cmap(k / max(n - 1, 1) * 0.9)
                ax.plot(s["lr_grid"], s["curves"][str(w)], marker="o", ms=3, color=color, label=f"width {w}")
                if b is not None:
                    ax.plot([b], [bl], marker="*", ms=12, color=color, markeredgecolor="k", zorder=5)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):                  # plain labels: mathtext parsing is slow
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
                axis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_locator(LogLocator(base=4.0))
            ax.set_xlabel("learning rate")
            ax.set_ylabel("final train loss")
            ax.set_title(f"{est} / {sc}: shift log2 {s['shift_log2']:+.2f}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle((title + "\n" if title else "") + "(missing points: the run diverged)", fontsize=10)
    return fig
