"""Loss-vs-step and loss-vs-wall-clock traces of one optimizer, for the paper-figure scripts.

The experiment runner (:mod:`.runner`) records one row per epoch and builds curvlab optimizers only. The
comparisons of MBF (Bahamou et al., AISTATS 2023: training loss vs wall-clock against K-FAC, Shampoo and
Adam) and ISAAC (Petersen et al., ICLR 2023: accuracy per step and per second against SGD and K-FAC) need
finer traces and a ``torch.optim`` baseline (Adam) in the same loop, so this module provides:

* :func:`train_traced`: trains ``steps`` minibatch steps with ANY ``torch.optim.Optimizer`` (a
  :class:`curvlab.CurvlabOptimizer` or e.g. ``torch.optim.Adam``) and evaluates every ``eval_every`` steps.
  Only ``zero_grad + forward + backward + step`` is timed (``time.perf_counter``, with a device
  synchronization before each clock read on CUDA); evaluation, data shuffling and logging are not, so the
  ``time_s`` axis is pure optimizer wall-clock and per-step times of different methods measured in one
  process are comparable. Returns a :class:`Trace`.
* :func:`interleaved_step_times`: per-step times of several optimizers timed round-robin on the same
  batches, so that a changing machine load (shared CPUs) hits every method alike.
* :func:`time_to_threshold`: the first x (step or second) at which a recorded metric reaches a threshold.
* :func:`format_table`: a plain-text table of dict rows (what the scripts print).

Method comparisons: a *method* is a dict ``{"label", "optimizer": "adam" | a curvlab estimator name, "lr",
**hyper}`` (:func:`build_optimizer`: ``torch.optim.Adam`` or ``curvlab.optimizer(..., rule="natural")``).
:func:`sweep_method` gives every method the same lr sweep, ``lr * scale`` for the same ``lr_scales`` and the
same training budget, on the first seed; the lr with the best final score wins and is run on the remaining
seeds. :func:`summary_rows` makes the table (final score, median step time relative to a baseline measured
in the same process, steps and seconds to a threshold), :func:`plot_curves` the figure (seed means) and
:func:`numbers` the JSON.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..divergence import Diverged
from ..linalg import FactorizationError

__all__ = ["Trace", "train_traced", "batch_stream", "interleaved_step_times", "time_to_threshold", "format_table",
           "build_optimizer",
           "sweep_method", "mean_curve", "summary_rows", "plot_curves", "numbers", "train_fn"]

Evaluate = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class Trace:
    """What :func:`train_traced` recorded.

    Attributes:
        rows: one dict per evaluation point (step 0 = before training, then every ``eval_every`` steps and the
            last step) with ``step``, ``epoch`` (examples seen / training-set size), ``time_s`` (cumulative timed
            seconds of the steps so far) and the keys returned by ``evaluate``.
        step_times: seconds of every timed step, in order.
        diverged: a training loss or an evaluated metric became NaN/Inf, or the optimizer raised
            :class:`curvlab.linalg.FactorizationError` or :class:`curvlab.Diverged` (training stopped there).
        error: that error's message, if any.
    """

    rows: list[dict[str, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    diverged: bool = False
    error: str | None = None

    def column(self, key: str) -> list[float]:
        """The recorded values of ``key`` (one per row)."""
        return [r[key] for r in self.rows]

    @property
    def median_step_s(self) -> float:
        """Median seconds per step (robust to the first steps' warm-up and to curvature refresh spikes)."""
        return statistics.median(self.step_times) if self.step_times else math.nan

    @property
    def mean_step_s(self) -> float:
        """Mean seconds per step (includes the amortized inverse / root refreshes)."""
        return sum(self.step_times) / len(self.step_times) if self.step_times else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "mean_step_s": self.mean_step_s, "median_step_s": self.median_step_s,
                "steps": len(self.step_times), "diverged": self.diverged, "error": self.error}


def batch_stream(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0, drop_last: bool = True
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless minibatches: a fresh permutation (private generator seeded by ``seed``) per epoch.

    ``drop_last`` (default) keeps every batch at ``batch_size`` so that per-step times are comparable.
    """
    n = len(x)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the training-set size), got {batch_size}")
    if len(y) != n:
        raise ValueError(f"x and y must have the same length, got {n} and {len(y)}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen).to(x.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_traced(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int, steps: int,
                 eval_every: int, evaluate: Evaluate, seed: int = 0, progress: bool = False, desc: str = ""
                 ) -> Trace:
    """Train ``steps`` steps of ``opt`` on minibatches of ``(x, y)`` and record a :class:`Trace`.

    Args:
        model: the model ``opt`` updates (already on the data's device).
        opt: any optimizer; ``opt.step()`` is called after ``loss_fn(model(xb), yb).backward()``.
        loss_fn: the MEAN minibatch loss (curvlab's capture assumes mean reduction).
        batch_size: examples per step (:func:`batch_stream`, last partial batch dropped).
        steps: number of steps; ``eval_every``: evaluation period in steps (>= 1).
        evaluate: ``model -> {metric: value}``, called at step 0, every ``eval_every`` steps and after the
            last step, untimed (it should run under ``torch.no_grad`` and ``curvlab.capture.paused()``).
        seed: seed of the batch order (the model and the optimizer are seeded by the caller).
        progress: show a tqdm bar with the last loss.

    Training stops early, with ``diverged=True``, at the first non-finite training loss or metric or at a
    :class:`~curvlab.linalg.FactorizationError` or :class:`curvlab.Diverged` of the optimizer (a run blown up by a
    too-large lr).
    """
    if steps < 0 or eval_every < 1:
        raise ValueError(f"steps must be >= 0 and eval_every >= 1, got steps={steps}, eval_every={eval_every}")
    device = next(model.parameters()).device
    trace = Trace()
    stream = batch_stream(x, y, batch_size, seed)

    def record(step: int) -> None:
        metrics = evaluate(model)
        trace.rows.append({"step": step, "epoch": step * batch_size / len(x), "time_s": sum(trace.step_times),
                           **{k: None if v is None else float(v) for k, v in metrics.items()}})
        if not all(math.isfinite(v) for v in metrics.values() if v is not None):
            trace.diverged = True

    record(0)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc, leave=False)
    model.train()
    for step in range(1, steps + 1):
        if trace.diverged:
            break
        xb, yb = next(stream)
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        try:
            opt.step()
        except (FactorizationError, Diverged) as err:   # a blown-up run (statistics too large to factor, or
            # max_skipped_steps non-finite steps in a row)
            trace.error, loss = str(err), torch.tensor(math.nan)
        _sync(device)
        trace.step_times.append(time.perf_counter() - start)
        value = float(loss.detach())
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {value:.4g}", refresh=False)
        if not math.isfinite(value):
            trace.diverged = True
            trace.rows.append({"step": step, "epoch": step * batch_size / len(x), "time_s": sum(trace.step_times),
                               **{k: math.nan for k in trace.rows[0] if k not in ("step", "epoch", "time_s")}})
            break
        if step % eval_every == 0 or step == steps:
            record(step)
    if bar is not None:
        bar.close()
    return trace


def interleaved_step_times(setups: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]], x: torch.Tensor,
                           y: torch.Tensor, *, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           batch_size: int, steps: int, warmup: int = 2, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per step of several ``(model, optimizer)`` pairs timed ROUND-ROBIN on the same minibatches.

    Each round takes one batch and times one step of every method on it, so changes in machine load hit all
    methods alike (the traces of :func:`train_traced` are timed one run after another). The first
    ``warmup`` rounds are not recorded; use ``steps`` a multiple of the methods' ``inv_interval`` so that
    the mean includes the amortized refreshes. Returns ``{label: [seconds of each recorded step]}``.
    """
    stream = batch_stream(x, y, batch_size, seed)
    times: dict[str, list[float]] = {label: [] for label in setups}
    for i in range(warmup + steps):
        xb, yb = next(stream)
        for label, (model, opt) in setups.items():
            device = next(model.parameters()).device
            _sync(device)
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
            _sync(device)
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    return times


def time_to_threshold(xs: Sequence[float], values: Sequence[float], threshold: float, *, below: bool = True
                      ) -> float | None:
    """The first ``xs[i]`` with ``values[i] <= threshold`` (``below=True``, e.g. a loss) or ``>= threshold``
    (``below=False``, e.g. an accuracy); ``None`` if never reached (NaN values never reach it)."""
    if len(xs) != len(values):
        raise ValueError(f"xs and values must have the same length, got {len(xs)} and {len(values)}")
    for x, v in zip(xs, values):
        if v is not None and math.isfinite(v) and (v <= threshold if below else v >= threshold):
            return x
    return None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A left-aligned plain-text table of ``rows`` restricted to ``columns`` (``None`` prints as ``-``,
    floats with 4 significant digits)."""
    cells = [list(columns)] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- method comparisons (paper_figures/mbf.py, paper_figures/isaac.py) ------------------------------------


def build_optimizer(model: torch.nn.Module, method: dict[str, Any], lr: float, loss: str, seed: int
                    ) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (``optimizer="adam"``) or ``curvlab.optimizer`` with rule ``natural``."""
    hyper = {k: v for k, v in method.items() if k not in ("label", "optimizer", "lr")}
    if method["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, **hyper)
    from ..optim import optimizer

    return optimizer(model, method["optimizer"], "natural", loss=loss, lr=lr, seed=seed, **hyper)


def _final(trace: Trace, key: str, lower: bool) -> float:
    value = trace.rows[-1].get(key, math.nan) if trace.rows else math.nan
    if trace.diverged or value is None or not math.isfinite(value):
        return math.inf if lower else -math.inf
    return value


def sweep_method(method: dict[str, Any], lr_scales: Sequence[float], seeds: Sequence[int],
                 make_model: Callable[[int], torch.nn.Module], train: Callable[..., Trace], *, loss: str,
                 score: str, lower: bool, tune: Callable[..., Trace] | None = None) -> dict[str, Any]:
    """Sweep ``method["lr"] * scale`` on ``seeds[0]``; run the winner (best final ``score``) on all seeds.

    ``train(model, opt, seed, desc=...)`` returns a :class:`Trace` (``desc`` labels a progress bar). Returns
    ``{"lr", "grid": [{"lr", "final", "diverged"}], "traces": [Trace per seed]}``; a diverged run scores worst.
    With ``tune`` (e.g. a shorter budget), the grid runs use ``tune`` and the winner is re-run with ``train``
    on every seed, ``seeds[0]`` included.
    """
    grid, by_lr = [], {}
    for scale in lr_scales:
        lr = method["lr"] * scale
        model = make_model(seeds[0])
        trace = (tune or train)(model, build_optimizer(model, method, lr, loss, seeds[0]), seeds[0],
                                desc=f"{method['label']} lr {lr:.3g}")
        by_lr[lr] = trace
        grid.append({"lr": lr, "final": _final(trace, score, lower), "diverged": trace.diverged})
    best = (min if lower else max)(grid, key=lambda g: g["final"])["lr"]
    traces = [] if tune else [by_lr[best]]
    for seed in seeds if tune else seeds[1:]:
        model = make_model(seed)
        traces.append(train(model, build_optimizer(model, method, best, loss, seed), seed,
                            desc=f"{method['label']} lr {best:.3g} seed {seed}"))
    return {"lr": best, "grid": grid, "traces": traces}


def mean_curve(traces: Sequence[Trace], key: str) -> list[float]:
    """Mean over seeds of ``key`` at each evaluation point (shortest trace wins if lengths differ)."""
    n = min(len(t.rows) for t in traces)
    return [sum(t.rows[i][key] for t in traces) / len(traces) for i in range(n)]


def summary_rows(results: dict[str, dict[str, Any]], baseline: str, score: str, lower: bool,
                 threshold: float | None, bench: dict[str, list[float]] | None = None) -> list[dict[str, Any]]:
    """One table row per method: chosen lr, final score (mean over seeds), step time (median, relative to
    ``baseline``'s measured in the same process) and the steps / seconds to reach ``threshold``; with
    ``bench`` (from :func:`interleaved_step_times`) also the round-robin mean step time and its ratio."""
    base = sum(t.median_step_s for t in results[baseline]["traces"]) / len(results[baseline]["traces"])
    rows = []
    for label, res in results.items():
        traces = res["traces"]
        step_s = sum(t.median_step_s for t in traces) / len(traces)
        mean_s = sum(t.mean_step_s for t in traces) / len(traces)
        curve, steps, secs = mean_curve(traces, score), mean_curve(traces, "step"), mean_curve(traces, "time_s")
        final = [_final(t, score, lower) for t in traces]
        rows.append({"method": label, "lr": res["lr"], f"final_{score}": sum(final) / len(final),
                     "ms_per_step": 1e3 * step_s, "mean_ms_per_step": 1e3 * mean_s,
                     f"step_time_vs_{baseline}": step_s / base,
                     "steps_to_threshold": None if threshold is None else
                     time_to_threshold(steps, curve, threshold, below=lower),
                     "s_to_threshold": None if threshold is None else
                     time_to_threshold(secs, curve, threshold, below=lower),
                     "diverged_seeds": sum(t.diverged for t in traces)})
        if bench is not None:
            rows[-1]["bench_ms_per_step"] = 1e3 * statistics.fmean(bench[label])
            rows[-1][f"bench_vs_{baseline}"] = statistics.fmean(bench[label]) / statistics.fmean(bench[baseline])
    return rows


def plot_curves(results: dict[str, dict[str, Any]], panels: Sequence[tuple[str, str, str, bool]], title: str,
                ncols: int | None = None) -> Any:
    """A ``Figure`` with one panel per ``(x key, y key, y label, log y)`` on a grid of ``ncols`` columns
    (default: one row); one line per method (mean over seeds)."""
    from matplotlib.figure import Figure

    ncols = ncols or len(panels)
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.3), layout="constrained")
    xlabels = {"step": "step", "time_s": "optimizer wall-clock (s)", "epoch": "epoch"}
    for k, (xkey, ykey, ylabel, logy) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for label, res in results.items():
            ax.plot(mean_curve(res["traces"], xkey), mean_curve(res["traces"], ykey),
                    label=f"{label} (lr {res['lr']:.3g})")
        ax.set_xlabel(xlabels.get(xkey, xkey))
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def numbers(results: dict[str, dict[str, Any]], rows: list[dict[str, Any]], setup: dict[str, Any]
            ) -> dict[str, Any]:
    """The JSON behind the figures: setup, table rows, per-method lr grid and every seed's trace."""
    return {"setup": setup, "table": rows,
            "methods": {label: {"lr": res["lr"], "grid": res["grid"],
                                "traces": [t.as_dict() for t in res["traces"]]} for label, res in results.items()}}


def bench_chosen(methods: Sequence[dict[str, Any]], results: dict[str, dict[str, Any]],
                 make_model: Callable[[int], torch.nn.Module], x: torch.Tensor, y: torch.Tensor, *, loss: str,
                 loss_fn: Callable, batch_size: int, steps: int, seed: int) -> dict[str, float]:
    """Every method at its chosen lr (``results[label]["lr"]``), timed round-robin on the same batches
    (:func:`interleaved_step_times`): the robust cost ratio on a shared machine."""
    setups = {}
    for method in methods:
        model = make_model(seed)
        setups[method["label"]] = (model, build_optimizer(model, method, results[method["label"]]["lr"], loss, seed))
    return interleaved_step_times(setups, x, y, loss_fn=loss_fn, batch_size=batch_size, steps=steps)


def publish(out: Any, stem: str, fig: Any, results: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
            setup: dict[str, Any], bench: dict[str, float], columns: Sequence[str], *, threshold_note: str,
            score_name: str, bench_steps: int) -> dict[str, Any]:
    """Write ``fig`` (PNG + PDF) and the numbers (JSON, :func:`numbers` plus the round-robin step times) as
    ``out/stem.*``, then print the threshold, every method's lr grid and the table; returns the numbers."""
    from ..figures import save_figure, write_numbers

    save_figure(fig, out, stem)
    data = numbers(results, rows, setup)
    data["bench_step_s"] = bench
    write_numbers(out, stem, data)
    print(f"{threshold_note} (steps / seconds to reach it below); bench_*: mean step time over {bench_steps} "
          "round-robin steps")
    print(f"lr grids ({score_name}):")
    width = max(len(label) for label in results)
    for label, res in results.items():
        print(f"  {label:{width}s} " + ", ".join(f"{g['lr']:.3g}: {g['final']:.4g}" for g in res["grid"]))
    print(format_table(rows, columns))
    return data


def train_fn(x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, batch_size: int, steps: int, eval_every: int,
             evaluate: Callable, progress: bool) -> Callable[..., Trace]:
    """``train(model, opt, seed)`` for :func:`sweep_method` with the mode's budget."""
    def train(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int, desc: str = "") -> Trace:
        return train_traced(model, opt, x, y, loss_fn=loss_fn, batch_size=batch_size, steps=steps,
                            eval_every=eval_every, evaluate=evaluate, seed=seed, progress=progress,
                            desc=desc or type(opt).__name__)
    return train
