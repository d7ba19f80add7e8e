"""Reports: aggregate any set of finished runs into tables and standard figures.

:func:`report` finds every finished run directory under a folder (a sweep, several sweeps, single runs),
groups runs that differ only in ``train.seed`` into one *configuration*, and writes into ``--out``
(default ``DIR/report``):

* ``runs.csv``     one row per run: id, configuration, seed, the axis values and the summary numbers;
* ``report.csv``   one row per configuration: seeds, mean and std of the final test accuracy, mean best
  accuracy, epochs to the target accuracy, final losses, step time (absolute and relative to the
  baseline), refresh time per step, diverged runs;
* ``report.txt``   the readable table (also printed);
* ``curves.png``   train loss, test loss, test accuracy per epoch, and test accuracy against training time,
  one line per configuration (mean over seeds);
* ``best_<axis>.png`` for every axis with several values: the best configuration's score (mean final test
  accuracy, or lowest test loss for regression) at each value of the axis.

Axes are the sweep's grid keys and variants (``sweep.json``) when present, else the config keys that
differ between runs. Step-time ratios are only meaningful between runs timed under the same conditions
(same machine, same ``train.threads``, same number of parallel workers).
"""
from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import flatten, run_id
from .io import atomic_write_bytes, atomic_write_text, read_json
from .runner import DONE, RunResult, load_run
from .sweep import MANIFEST

__all__ = ["collect_runs", "group_runs", "report", "format_table", "Configuration"]

_SKIP_AXIS = {"name", "train.seed", "train.checkpoint"}


@dataclass
class Configuration:
    """Runs that differ only in their seed."""

    label: str
    runs: list[RunResult]
    axes: dict[str, Any] = field(default_factory=dict)

    def values(self, key: str) -> list[float]:
        """Finite values of a summary key over the seeds."""
        out = [r.summary.get(key) for r in self.runs]
        return [float(v) for v in out if isinstance(v, (int, float)) and math.isfinite(v)]

    def mean(self, key: str) -> float | None:
        vals = self.values(key)
        return statistics.fmean(vals) if vals else None

    @property
    def classification(self) -> bool:
        return self.runs[0].summary.get("task") == "classification"

    def score(self) -> float | None:
        """Mean final test accuracy (classification) or mean best test loss (otherwise)."""
        return self.mean("final_test_accuracy") if self.classification else self.mean("best_test_loss")


def collect_runs(root: str | Path) -> list[RunResult]:
    """Every finished run under ``root`` (found by its ``DONE`` marker), each run id once, sorted by name.
    Runs inside a tune folder below ``root`` (one holding ``tune_spec.json``, see :mod:`.tune`) are left out:
    its trials are measured on a validation split, and a tune is reported by the equal-budget comparison."""
    found: dict[str, RunResult] = {}
    root = Path(root)
    for marker in sorted(root.rglob(DONE)):
        inside = marker.parent.relative_to(root).parents
        if any((root / p / "tune_spec.json").is_file() for p in inside if str(p) != "."):
            continue
        result = load_run(marker.parent)
        found.setdefault(result.run_id, result)
    return sorted(found.values(), key=lambda r: (r.config.get("name", ""), r.run_id))


def _manifests(root: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    axes: list[str] = []
    per_run: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob(MANIFEST)):
        data = read_json(path)
        if any(data.get("variants") or []) and "variant" not in axes:
            axes.append("variant")
        axes += [a for a in data.get("axes", []) if a not in axes]
        for entry in data.get("runs", []):
            per_run.setdefault(entry["run_id"], {"variant": entry.get("variant"), **entry.get("axes", {}),
                                                 "_order": len(per_run)})
    return axes, per_run


def _seedless_id(result: RunResult) -> str:
    cfg = {**result.config, "train": {**result.config["train"], "seed": 0}}
    return run_id(cfg)


def group_runs(runs: Sequence[RunResult], root: str | Path | None = None) -> tuple[list[Configuration], list[str]]:
    """Configurations (runs grouped by everything but the seed) and the axes that vary between them."""
    flat = {r.run_id: flatten(r.config) for r in runs}
    axes, per_run = _manifests(Path(root)) if root is not None else ([], {})
    if not axes:
        keys = sorted({k for f in flat.values() for k in f} - _SKIP_AXIS)
        axes = [k for k in keys if len({repr(f.get(k)) for f in flat.values()}) > 1]
    axes = [a for a in axes if a not in _SKIP_AXIS]
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(_seedless_id(r), []).append(r)
    configs = []
    for members in groups.values():
        first = members[0]
        values = {a: per_run.get(first.run_id, {}).get(a, flat[first.run_id].get(a)) for a in axes}
        names = {m.config.get("name", "") for m in members}
        label = names.pop() if len(names) == 1 and "" not in names else \
            " ".join(f"{a.rsplit('.', 1)[-1]}={v}" for a, v in values.items()) or \
            f"{first.config['optimizer']['estimator']}/{first.config['optimizer']['rule']}"
        configs.append(Configuration(label, sorted(members, key=lambda m: m.config["train"]["seed"]), values))
    # sweep order when the runs come from sweep manifests, else by label
    order = {c.label: min(per_run.get(r.run_id, {}).get("_order", math.inf) for r in c.runs) for c in configs}
    configs.sort(key=lambda c: (order[c.label], c.label))
    return configs, axes


def _baseline(configs: Sequence[Configuration], baseline: str | None) -> Configuration | None:
    if baseline is not None:
        match = [c for c in configs if c.label == baseline]
        if not match:
            raise ValueError(f"baseline {baseline!r} is not a configuration; labels: {[c.label for c in configs]}")
        return match[0]
    for c in configs:
        opt = c.runs[0].config["optimizer"]
        if opt["estimator"] == "identity" and opt["rule"] == "natural":
            return c
    return None


def _f(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _rows(configs: Sequence[Configuration], base: Configuration | None) -> tuple[list[str], list[list[str]]]:
    base_ms = base.mean("mean_step_ms") if base else None
    header = ["configuration", "seeds", "final acc", "best acc", "ep->target", "train loss", "test loss",
              "step ms", f"x {base.label}" if base else "x base", "refresh ms", "diverged"]
    rows = []
    for c in configs:
        acc = c.values("final_test_accuracy")
        acc_text = "-" if not acc else f"{statistics.fmean(acc):.4f}" + \
            (f" ± {statistics.stdev(acc):.4f}" if len(acc) > 1 else "")
        reached = [r.summary.get("epochs_to_target") for r in c.runs]
        hits = [e for e in reached if e is not None]
        ep = "-" if not hits else f"{statistics.fmean(hits):g}" + ("" if len(hits) == len(reached)
                                                                     else f" ({len(hits)}/{len(reached)})")
        step = c.mean("mean_step_ms")
        rows.append([c.label, str(len(c.runs)), acc_text, _f(c.mean("best_test_accuracy")), ep,
                     _f(c.mean("final_train_loss")), _f(c.mean("final_test_loss")), _f(step, ".2f"),
                     _f(step / base_ms if step is not None and base_ms else None, ".2f"),
                     _f(c.mean("refresh_ms_per_step"), ".2f"),
                     str(sum(bool(r.summary.get("diverged")) for r in c.runs))])
    return header, rows


def format_table(configs: Sequence[Configuration], baseline: str | None = None) -> str:
    """The readable per-configuration table (step time relative to the baseline configuration)."""
    header, rows = _rows(configs, _baseline(configs, baseline))
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


_RUN_KEYS = ("final_test_accuracy", "best_test_accuracy", "epochs_to_target", "final_train_loss",
             "final_test_loss", "best_test_loss", "mean_step_ms", "refresh_ms_per_step", "train_time_s",
             "skipped_steps", "diverged")


def _mean_curve(c: Configuration, key: str) -> tuple[list[float], list[float]]:
    by_epoch: dict[int, list[float]] = {}
    for r in c.runs:
        for row in r.metrics:
            v = row.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_epoch.setdefault(row["epoch"], []).append(float(v))
    epochs = sorted(by_epoch)
    return [float(e) for e in epochs], [statistics.fmean(by_epoch[e]) for e in epochs]


def _save(fig: Any, path: Path) -> None:
    """PNG through memory and an atomic replace (a killed report never leaves half an image)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(configs: Sequence[Configuration], path: Path, title: str = "") -> None:
    """Train loss, test loss, test accuracy per epoch and accuracy against time (mean over seeds)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in worker processes

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [(axes[0, 0], "train_loss", "train loss", True), (axes[0, 1], "test_loss", "test loss", True),
              (axes[1, 0], "test_accuracy", "test accuracy", False)]
    for c in configs:
        for ax, key, _, _ in panels:
            x, y = _mean_curve(c, key)
            if y:
                ax.plot(x, y, marker="o", ms=2, label=c.label)
        times = {0.0: 0.0, **dict(zip(*_mean_curve(c, "time_s")))}
        epochs, acc = _mean_curve(c, "test_accuracy")
        if acc:
            axes[1, 1].plot([times.get(e, math.nan) for e in epochs], acc, marker="o", ms=2, label=c.label)
    from matplotlib.ticker import MaxNLocator

    for ax, _, name, log in panels:
        ax.set(xlabel="epoch", ylabel=name, title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log and ax.lines:
            ax.set_yscale("log")
    axes[1, 1].set(xlabel="training time (s)", ylabel="test accuracy", title="test accuracy vs time")
    trained = [y for c in configs for e, y in zip(*_mean_curve(c, "test_accuracy")) if e >= 1]
    if trained:  # zoom on the trained part (epoch 0, the random initialization, falls below the view)
        for ax in (axes[1, 0], axes[1, 1]):
            ax.set_ylim(max(0.0, min(trained) - 0.02), min(1.0, max(trained) + 0.01))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_axis(configs: Sequence[Configuration], axis: str, path: Path) -> None:
    """The best configuration's score at each value of ``axis`` (bar chart, or a line for numbers)."""
    from matplotlib.figure import Figure

    best: dict[Any, float] = {}
    classification = all(c.classification for c in configs)
    for c in configs:
        value, score = c.axes.get(axis), c.score()
        if score is None:
            continue
        key = value if isinstance(value, (int, float, str, type(None))) else repr(value)
        if key not in best or (score > best[key] if classification else score < best[key]):
            best[key] = score
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    numeric = all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in best)
    if numeric and best:
        xs = sorted(best)
        ax.plot(xs, [best[x] for x in xs], marker="o")
        if all(x > 0 for x in xs) and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
    else:
        labels, heights = [str(k) for k in best], list(best.values())
        bars = ax.bar(range(len(labels)), heights)
        ax.bar_label(bars, fmt="%.4f" if classification else "%.3g", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        if heights and classification:  # zoom on the differences, keeping a visible base
            low, high = min(heights), max(heights)
            ax.set_ylim(max(0.0, low - max(0.5 * (high - low), 0.02)), min(1.0, high + 0.25 * (high - low) + 0.01))
    ax.set(xlabel=axis, ylabel="best final test accuracy" if classification else "best test loss",
           title=f"best per {axis} value")
    ax.grid(alpha=0.3)
    _save(fig, path)


def report(root: str | Path, out: str | Path | None = None, *, baseline: str | None = None,
           figures: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Aggregate the finished runs under ``root`` (see the module docstring); returns the table text,
    the configurations and the paths written. ValueError if no finished run is found."""
    root = Path(root)
    runs = collect_runs(root)
    if not runs:
        raise ValueError(f"no finished runs under {str(root)!r} (a run directory is finished once it holds {DONE})")
    out = Path(out) if out is not None else root / "report"
    configs, axes = group_runs(runs, root)
    table = format_table(configs, baseline)
    header, rows = _rows(configs, _baseline(configs, baseline))
    _csv(out / "report.csv", [*header, *axes], [[*row, *(c.axes.get(a) for a in axes)] for row, c in zip(rows, configs)])
    label_of = {r.run_id: c.label for c in configs for r in c.runs}
    flat = {r.run_id: flatten(r.config) for r in runs}
    _csv(out / "runs.csv", ["run_id", "configuration", "seed", *axes, *_RUN_KEYS],
         [[r.run_id, label_of[r.run_id], r.config["train"]["seed"], *(flat[r.run_id].get(a) for a in axes),
           *(r.summary.get(k) for k in _RUN_KEYS)] for r in runs])
    atomic_write_text(out / "report.txt", table + "\n")
    written = [out / "report.csv", out / "runs.csv", out / "report.txt"]
    if figures:
        plot_curves(configs, out / "curves.png")
        written.append(out / "curves.png")
        for axis in axes:
            if len({repr(c.axes.get(axis)) for c in configs}) > 1:
                path = out / f"best_{axis.replace('.', '_')}.png"
                plot_axis(configs, axis, path)
                written.append(path)
    if not quiet:
        print(table)
        print(f"wrote {', '.join(str(p) for p in written)}")
    return {"table": table, "configurations": configs, "axes": axes, "files": written}
