"""Ablation reports from ANY finished sweep (or any folder of run directories): heat maps of a metric over
two axes, a metric against one axis with one line per series, and time-to-target tables.

Everything starts from :func:`~curvlab.experiments.reporting.collect_runs` and
:func:`~curvlab.experiments.reporting.group_runs` (runs differing only in ``train.seed`` form one
*configuration*; a configuration's number is the mean over its seeds). An *axis* is named by

* a sweep axis (``sweep.json``: ``variant``, ``optimizer.lr``, ...),
* or any dotted config key, even one the sweep did not vary (``optimizer.estimator`` set by a variant),
* or the unique last component of one (``estimator``, ``batch_size``, ``lr``),
* or several joined by ``+`` (``estimator+rule`` -> the value ``"kfac/fop"``).

A missing or ambiguous axis raises ``ValueError`` naming it and listing the available ones.

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
from typing import Any, Union

from .config import flatten
from .io import atomic_write_text
from .reporting import Configuration, collect_runs, group_runs
from .runner import RunResult

__all__ = ["Heatmap", "Curves", "TargetTable", "load_configurations", "resolve_axis", "heatmap", "metric_vs_axis",
           "time_to_target_table", "higher_is_better", "write_extras"]

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


def _name(keys: Sequence[str]) -> str:
    """Display name of an axis: the last part of each key (``estimator+rule``)."""
    return "+".join(k.rsplit(".", 1)[-1] for k in keys)


def _value(c: Configuration, keys: Sequence[str]) -> Any:
    flat = flatten(c.runs[0].config)
    vals = [c.axes[k] if k in c.axes else flat.get(k) for k in keys]
    return vals[0] if len(vals) == 1 else "/".join(str(v) for v in vals)


def _order(values: list[Any]) -> list[Any]:
    """Distinct values: sorted when all numbers, else in order of first appearance (sweep order)."""
    distinct = list(dict.fromkeys(repr(v) for v in values))
    first = {repr(v): v for v in reversed(values)}
    vals = [first[r] for r in distinct]
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return sorted(vals)
    return vals


def _check_metric(configs: Sequence[Configuration], metric: str) -> None:
    if any(metric in r.summary for c in configs for r in c.runs):
        return
    numeric = sorted({k for c in configs for r in c.runs for k, v in r.summary.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
    raise ValueError(f"metric {metric!r} is not in the runs' summaries; numeric summary keys: {', '.join(numeric)}")


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _pick(configs: Sequence[Configuration], metric: str) -> tuple[Configuration | None, float | None]:
    """The best configuration by the seed-mean of ``metric`` (None when no configuration has a value)."""
    scored = [(c.mean(metric), c) for c in configs]
    scored = [(v, c) for v, c in scored if v is not None]
    if not scored:
        return None, None
    sign = -1.0 if higher_is_better(metric) else 1.0
    v, c = min(scored, key=lambda t: sign * t[0])
    return c, v


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
        rows = [[_fmt(r), *(("-" if v is None else format(v, spec)) + ("*" if j == self.best_col[i] else " ")
                            for j, v in enumerate(vals))] for i, (r, vals) in enumerate(zip(self.rows, self.values))]
        return f"{self.metric}: rows {self.row_axis}, columns {self.col_axis} (* best in row)\n" + \
            _table_text([f"{self.row_axis} \\ {self.col_axis}", *map(_fmt, self.cols)], rows)

    def csv(self) -> str:
        return _csv_text([self.row_axis, *map(_fmt, self.cols)],
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
    _check_metric(configs, metric)
    rname, cname = _name(rk), _name(ck)
    rows = _order([_value(c, rk) for c in configs])
    cols = _order([_value(c, ck) for c in configs])
    values, std, labels, best = [], [], [], []
    sign = 1.0 if higher_is_better(metric) else -1.0
    for r in rows:
        vrow, srow, lrow = [], [], []
        for col in cols:
            cell = [c for c in configs if repr(_value(c, rk)) == repr(r) and repr(_value(c, ck)) == repr(col)]
            chosen, v = _pick(cell, metric)
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
        xs = _order([x for pts in self.points.values() for x, *_ in pts])
        rows = []
        for s, pts in self.points.items():
            at = {repr(x): format(v, spec) + ("" if sd is None else f" ± {sd:{spec}}") for x, v, sd, _ in pts}
            rows.append([_fmt(s), *(at.get(repr(x), "-") for x in xs)])
        return f"{self.metric} vs {self.x_axis} (best configuration per point; ± std over seeds)\n" + \
            _table_text([f"{self.series_axis or 'series'} \\ {self.x_axis}", *map(_fmt, xs)], rows)

    def csv(self) -> str:
        return _csv_text(["series", self.x_axis, self.metric, "std", "configuration"],
                         [[s, x, v, "" if sd is None else sd, lab] for s, pts in self.points.items()
                          for x, v, sd, lab in pts])


def _default_series(configs: Sequence[Configuration], axes: Sequence[str], x_keys: Sequence[str]) -> list[str] | None:
    if "variant" in axes and "variant" not in x_keys and len({_value(c, ["variant"]) for c in configs}) > 1:
        return ["variant"]
    keys = ["optimizer.estimator", "optimizer.rule"]
    if len({_value(c, keys) for c in configs}) > 1:
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
    _check_metric(configs, metric)
    series = _order([_value(c, sk) for c in configs]) if sk else ["all"]
    points: dict[Any, list[tuple[Any, float, float | None, str]]] = {}
    for s in series:
        members = [c for c in configs if sk is None or repr(_value(c, sk)) == repr(s)]
        for x in _order([_value(c, xk) for c in members]):
            chosen, v = _pick([c for c in members if repr(_value(c, xk)) == repr(x)], metric)
            if chosen is not None:
                vals = chosen.values(metric)
                points.setdefault(s, []).append((x, v, statistics.stdev(vals) if len(vals) > 1 else None,
                                                 chosen.label))
    result = Curves(_name(xk), _name(sk) if sk else None, metric, points)
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
            [f"{self.row_axis}" + (f" \\ {self.col_axis}" if self.col_axis else ""), *map(_fmt, self.cols)],
            [[_fmt(r), *(e.text() for e in row)] for r, row in zip(self.rows, self.entries)])

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
    rows = _order([_value(c, rk) for c in configs])
    cols = _order([_value(c, ck) for c in configs]) if ck else ["time"]
    entries = [[_entry([c for c in configs if repr(_value(c, rk)) == repr(r)
                        and (ck is None or repr(_value(c, ck)) == repr(col))], target, rank) for col in cols]
               for r in rows]
    return TargetTable(target, _name(rk), _name(ck) if ck else None, rows, cols, entries)


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
