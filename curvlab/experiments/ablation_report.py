"""Ablation reports from ANY finished sweep (or any folder of run directories): heat maps of a metric over
two axes, a metric against one axis with one line per series, and time-to-target tables.

Everything starts from :func:`~curvlab.experiments.reporting.collect_runs` and
:func:`~curvlab.experiments.reporting.group_runs` (runs differing only in ``train.seed`` form one
*configuration*; a configuration's number is the mean over its seeds). An *axis* is named by

* a sweep axis (``sweep.json``: ``variant``, ``optimizer.lr``, ...),
* or any dotted config key, even one the sweep did not vary (``optimizer.estimator`` set by a variant),
* or the unique last component of one (``estimator``, ``batch_size``, ``lr``),
* or several joined by ``+`` (``estimator+rule`` -> the value ``"kfac/fop"``).

A missing or ambiguous axis raises ``ValueError`` naming it and listing the available ones. The axes, the
configurations and the choice of a cell's best live in :mod:`.ablation_axes`; this module lays them out.

When several configurations fall into the same cell (e.g. an ``optimizer.lr`` grid that is not one of the
two axes), the cell shows the BEST of them (highest for metrics containing ``accuracy``, lowest otherwise:
losses, times, epochs), i.e. "each method at its best learning rate", and records which configuration won.

:func:`time_to_target_table` recomputes, from each run's ``metrics.jsonl``, the first epoch whose test
accuracy reaches ``target`` and the cumulative training time ``time_s`` at that epoch (``"-"`` when never
reached), in the format of FOP's Table 1 (Lu & Armour, AAAI-26): ``epochs / seconds``.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ablation_axes import (AxisSpec, Source, axis_name, axis_value, best_of, check_metric, format_value,
                            higher_is_better, load_configurations, ordered, resolve_axis)
from .io import atomic_write_text
from .reporting import Configuration
from .runner import RunResult

__all__ = ["Heatmap", "Curves", "TargetTable", "load_configurations", "resolve_axis", "heatmap", "metric_vs_axis",
           "time_to_target_table", "higher_is_better", "write_extras"]


def _table_text(header: list[str], rows: list[list[str]]) -> str:
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text.replace("+", "_"))


def _write(out: str | Path | None, stem: str, text: str, csv_text: str, fig: Any) -> list[Path]:
    if out is None:
        return []
    from ..figures import save_figure

    out = Path(out)
    atomic_write_text(out / f"{stem}.txt", text + "\n")
    atomic_write_text(out / f"{stem}.csv", csv_text)
    return [out / f"{stem}.txt", out / f"{stem}.csv", *save_figure(fig, out, stem)]


# --------------------------------------------------------------------------------------------------- heat map
@dataclass
class Heatmap:
    """``values[i][j]``: the metric at ``rows[i]`` x ``cols[j]`` (best configuration of the cell, mean over
    its seeds; None when empty); ``best_col[i]``: the best column of row i (None for an empty row)."""

    row_axis: str
    col_axis: str
    metric: str
    rows: list[Any]
    cols: list[Any]
    values: list[list[float | None]]
    std: list[list[float | None]]
    labels: list[list[str | None]]
    best_col: list[int | None]
    figure: Any = None
    files: list[Path] = field(default_factory=list)

    def text(self, spec: str = ".4f") -> str:
        """The table; the best cell of each row is marked ``*``."""
        rows = [[format_value(r), *(("-" if v is None else format(v, spec)) + ("*" if j == self.best_col[i] else " ")
                            for j, v in enumerate(vals))] for i, (r, vals) in enumerate(zip(self.rows, self.values))]
        return f"{self.metric}: rows {self.row_axis}, columns {self.col_axis} (* best in row)\n" + \
            _table_text([f"{self.row_axis} \\ {self.col_axis}", *map(format_value, self.cols)], rows)

    def csv(self) -> str:
        return _csv_text([self.row_axis, *map(format_value, self.cols)],
                         [[r, *("" if v is None else v for v in vals)] for r, vals in zip(self.rows, self.values)])


def heatmap(source: Source, row_axis: AxisSpec, col_axis: AxisSpec, metric: str = "final_test_accuracy", *,
            out: str | Path | None = None, stem: str | None = None, spec: str = ".4f") -> Heatmap:
    """A ``row_axis`` x ``col_axis`` table of ``metric`` and its annotated figure (best cell per row framed).

    Args:
        source: a folder of finished runs (a sweep folder), or runs / configurations.
        row_axis, col_axis: axis names (module docstring), e.g. ``"estimator"``, ``"rule"``.
        metric: a numeric ``summary.json`` key (mean over seeds).
        out: when given, writes ``stem.{txt,csv,png,pdf}`` there (default stem ``heatmap_<row>_<col>_<metric>``).
    """
    configs, axes = load_configurations(source)
    rk, ck = resolve_axis(configs, axes, row_axis), resolve_axis(configs, axes, col_axis)
    check_metric(configs, metric)
    rname, cname = axis_name(rk), axis_name(ck)
    rows = ordered([axis_value(c, rk) for c in configs])
    cols = ordered([axis_value(c, ck) for c in configs])
    values, std, labels, best = [], [], [], []
    sign = 1.0 if higher_is_better(metric) else -1.0
    for r in rows:
        vrow, srow, lrow = [], [], []
        for col in cols:
            cell = [c for c in configs if repr(axis_value(c, rk)) == repr(r) and repr(axis_value(c, ck)) == repr(col)]
            chosen, v = best_of(cell, metric)
            vals = chosen.values(metric) if chosen else []
            vrow.append(v)
            srow.append(statistics.stdev(vals) if len(vals) > 1 else None)
            lrow.append(chosen.label if chosen else None)
        filled = [(sign * v, j) for j, v in enumerate(vrow) if v is not None]
        best.append(max(filled)[1] if filled else None)
        values.append(vrow), std.append(srow), labels.append(lrow)
    result = Heatmap(rname, cname, metric, rows, cols, values, std, labels, best)
    from .ablation_figures import heatmap_figure
    result.figure = heatmap_figure(result, spec)
    result.files = _write(out, stem or f"heatmap_{_slug(rname)}_{_slug(cname)}_{metric}", result.text(spec),
                          result.csv(), result.figure)
    return result


# ---------------------------------------------------------------------------------------- metric vs an axis
@dataclass
class Curves:
    """``points[series]``: ``(x, value, std over seeds or None, winning configuration label)`` per x value."""

    x_axis: str
    series_axis: str | None
    metric: str
    points: dict[Any, list[tuple[Any, float, float | None, str]]]
    figure: Any = None
    files: list[Path] = field(default_factory=list)

    def text(self, spec: str = ".4f") -> str:
        xs = ordered([x for pts in self.points.values() for x, *_ in pts])
        rows = []
        for s, pts in self.points.items():
            at = {repr(x): format(v, spec) + ("" if sd is None else f" ± {sd:{spec}}") for x, v, sd, _ in pts}
            rows.append([format_value(s), *(at.get(repr(x), "-") for x in xs)])
        return f"{self.metric} vs {self.x_axis} (best configuration per point; ± std over seeds)\n" + \
            _table_text([f"{self.series_axis or 'series'} \\ {self.x_axis}", *map(format_value, xs)], rows)

    def csv(self) -> str:
        return _csv_text(["series", self.x_axis, self.metric, "std", "configuration"],
                         [[s, x, v, "" if sd is None else sd, lab] for s, pts in self.points.items()
                          for x, v, sd, lab in pts])


def _default_series(configs: Sequence[Configuration], axes: Sequence[str], x_keys: Sequence[str]) -> list[str] | None:
    if "variant" in axes and "variant" not in x_keys and len({axis_value(c, ["variant"]) for c in configs}) > 1:
        return ["variant"]
    keys = ["optimizer.estimator", "optimizer.rule"]
    if len({axis_value(c, keys) for c in configs}) > 1:
        return keys
    return None


def metric_vs_axis(source: Source, x_axis: AxisSpec, series_axis: AxisSpec | None = None,
                   metric: str = "final_test_accuracy", *, out: str | Path | None = None, stem: str | None = None,
                   spec: str = ".4f", title: str | None = None) -> Curves:
    """``metric`` against ``x_axis`` (e.g. ``batch_size``), one line per value of ``series_axis`` (default:
    ``variant`` when the sweep has variants, else ``estimator+rule``); each point is the best configuration
    over the remaining axes (e.g. the best learning rate), mean over seeds with its standard deviation."""
    configs, axes = load_configurations(source)
    xk = resolve_axis(configs, axes, x_axis)
    sk = resolve_axis(configs, axes, series_axis) if series_axis is not None else _default_series(configs, axes, xk)
    check_metric(configs, metric)
    series = ordered([axis_value(c, sk) for c in configs]) if sk else ["all"]
    points: dict[Any, list[tuple[Any, float, float | None, str]]] = {}
    for s in series:
        members = [c for c in configs if sk is None or repr(axis_value(c, sk)) == repr(s)]
        for x in ordered([axis_value(c, xk) for c in members]):
            chosen, v = best_of([c for c in members if repr(axis_value(c, xk)) == repr(x)], metric)
            if chosen is not None:
                vals = chosen.values(metric)
                points.setdefault(s, []).append((x, v, statistics.stdev(vals) if len(vals) > 1 else None,
                                                 chosen.label))
    result = Curves(axis_name(xk), axis_name(sk) if sk else None, metric, points)
    from .ablation_figures import curves_figure
    result.figure = curves_figure(result, title)
    result.files = _write(out, stem or f"{metric}_vs_{_slug(result.x_axis)}", result.text(spec), result.csv(),
                          result.figure)
    return result


# ---------------------------------------------------------------------------------------- time to target
def run_to_target(run: RunResult, target: float) -> tuple[int | None, float | None]:
    """(first epoch with test accuracy >= target, cumulative training seconds then); (None, None) if never."""
    for row in run.metrics:
        acc = row.get("test_accuracy")
        if row.get("epoch", 0) > 0 and isinstance(acc, (int, float)) and acc >= target:
            t = row.get("time_s")
            return int(row["epoch"]), float(t) if isinstance(t, (int, float)) else None
    return None, None


@dataclass
class TargetEntry:
    """One cell: mean epochs / seconds over the seeds that reached the target, of the winning configuration."""

    epochs: float | None
    seconds: float | None
    reached: int
    seeds: int
    label: str | None

    def text(self) -> str:
        if not self.reached:
            return "-"
        sec = "?" if self.seconds is None else f"{self.seconds:.1f}"
        return f"{self.epochs:g} / {sec}" + ("" if self.reached == self.seeds else f" ({self.reached}/{self.seeds})")


@dataclass
class TargetTable:
    """``entries[i][j]``: time to ``target`` at ``rows[i]`` x ``cols[j]`` (``cols == ["time"]`` for one axis)."""

    target: float
    row_axis: str
    col_axis: str | None
    rows: list[Any]
    cols: list[Any]
    entries: list[list[TargetEntry]]
    figure: Any = None
    files: list[Path] = field(default_factory=list)

    def text(self) -> str:
        return f"epochs / seconds to test accuracy {self.target:g} ('-': never reached)\n" + _table_text(
            [f"{self.row_axis}" + (f" \\ {self.col_axis}" if self.col_axis else ""), *map(format_value, self.cols)],
            [[format_value(r), *(e.text() for e in row)] for r, row in zip(self.rows, self.entries)])

    def csv(self) -> str:
        return _csv_text([self.row_axis, "column", "epochs_to_target", "seconds_to_target", "seeds_reached",
                          "seeds", "configuration"],
                         [[r, c, e.epochs, e.seconds, e.reached, e.seeds, e.label]
                          for r, row in zip(self.rows, self.entries) for c, e in zip(self.cols, row)])


def _entry(configs: Sequence[Configuration], target: float, rank: str) -> TargetEntry:
    best: TargetEntry | None = None
    for c in configs:
        hits = [run_to_target(r, target) for r in c.runs]
        hits = [h for h in hits if h[0] is not None]
        secs = [s for _, s in hits if s is not None]
        e = TargetEntry(statistics.fmean(h[0] for h in hits) if hits else None,
                        statistics.fmean(secs) if secs else None, len(hits), len(c.runs), c.label)
        key = lambda t: (-t.reached / t.seeds, *((t.epochs, t.seconds or 0.0) if rank == "epochs"  # noqa: E731
                                                  else (t.seconds or math.inf, t.epochs)))
        if e.reached and (best is None or key(e) < key(best)):
            best = e
    return best or TargetEntry(None, None, 0, max((len(c.runs) for c in configs), default=0), None)


def time_to_target(source: Source, target: float, by: AxisSpec | Sequence[AxisSpec] | None = None, *,
                   rank: str = "epochs") -> TargetTable:
    """Compute the table of :func:`time_to_target_table` without writing or plotting."""
    if not 0 < target <= 1:
        raise ValueError(f"target must be a test accuracy in (0, 1], got {target!r}")
    if rank not in ("epochs", "seconds"):
        raise ValueError(f"rank must be 'epochs' or 'seconds', got {rank!r}")
    configs, axes = load_configurations(source)
    if not any(c.classification for c in configs):
        raise ValueError("time to a target accuracy needs classification runs; these runs are regression")
    if by is None:
        by = "variant" if "variant" in axes else "estimator+rule"
    by = [by] if isinstance(by, str) else list(by)
    if not 1 <= len(by) <= 2:
        raise ValueError(f"by must name one axis (rows) or two (rows, columns), got {by!r}")
    rk = resolve_axis(configs, axes, by[0])
    ck = resolve_axis(configs, axes, by[1]) if len(by) == 2 else None
    rows = ordered([axis_value(c, rk) for c in configs])
    cols = ordered([axis_value(c, ck) for c in configs]) if ck else ["time"]
    entries = [[_entry([c for c in configs if repr(axis_value(c, rk)) == repr(r)
                        and (ck is None or repr(axis_value(c, ck)) == repr(col))], target, rank) for col in cols]
               for r in rows]
    return TargetTable(target, axis_name(rk), axis_name(ck) if ck else None, rows, cols, entries)


def time_to_target_table(source: Source, target: float, by: AxisSpec | Sequence[AxisSpec] | None = None, *,
                         rank: str = "epochs", out: str | Path | None = None, stem: str | None = None,
                         title: str | None = None) -> TargetTable:
    """Epochs and seconds to reach test accuracy ``target``, rows ``by[0]``, columns ``by[1]`` (if given;
    ``by=None``: one row per ``variant`` when the sweep has variants, else per ``estimator+rule``).

    Each cell is the configuration that reaches the target in the most seeds, then in the fewest epochs
    (``rank="epochs"``, the hardware-independent measure) or seconds (``rank="seconds"``); the text is
    ``"epochs / seconds"`` (means over the seeds that reached it, ``(k/n)`` when only k of n did), ``"-"``
    when no configuration reaches it. ``out`` writes ``stem.{txt,csv,png,pdf}`` (the figure: epochs and
    seconds to target against the row axis, one line per column; unreached points are left out).
    """
    table = time_to_target(source, target, by, rank=rank)
    from .ablation_figures import target_figure
    table.figure = target_figure(table)
    if title:
        table.figure.suptitle(title)
    table.files = _write(out, stem or f"time_to_{target:g}_by_{_slug(table.row_axis)}", table.text(), table.csv(),
                         table.figure)
    return table


def write_extras(root: str | Path, out: str | Path, *, heatmap_axes: Sequence[str] | None = None,
                 vs: str | None = None, series: str | None = None, target: float | None = None,
                 metric: str = "final_test_accuracy", quiet: bool = False) -> list[Path]:
    """What ``curvlab report --heatmap ROW,COL --vs AXIS --target ACC`` adds to the standard report."""
    files: list[Path] = []
    texts: list[str] = []
    configs, axes = load_configurations(root)
    if heatmap_axes is not None:
        if len(heatmap_axes) != 2:
            raise ValueError(f"--heatmap takes ROW,COL (two axes), got {','.join(heatmap_axes)!r}")
        h = heatmap(configs, heatmap_axes[0], heatmap_axes[1], metric, out=out)
        files += h.files
        texts.append(h.text())
    if vs is not None:
        c = metric_vs_axis(configs, vs, series, metric, out=out)
        files += c.files
        texts.append(c.text())
    if target is not None:
        columns = series or ("variant" if "variant" in axes else "estimator+rule")
        t = time_to_target_table(configs, target, [vs, columns] if vs else [columns], out=out)
        files += t.files
        texts.append(t.text())
    if not quiet:
        for text in texts:
            print("\n" + text)
        if files:
            print(f"wrote {', '.join(str(p) for p in files)}")
    return files
