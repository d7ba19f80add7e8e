"""The equal-budget comparison protocol: methods are compared only after the same tuning effort.

An optimizer comparison is only as fair as the tuning behind each method (Schmidt, Schneider & Hennig,
"Descending through a crowded valley", ICML 2021; Choi et al., "On empirical comparisons of optimizers for deep
learning", 2019): every method gets the same number of trials over its learning rate and damping (and momentum,
where tuned), selected on validation data; a second-order method's damping is always tuned, since its best value
moves with the learning rate. :func:`compare_tunes` enforces this on tuning records -- ``curvlab tune``'s
``tune.json`` or an in-process record (:meth:`curvlab.tuning.TuneResult.record` plus a ``final`` entry from
:func:`mean_std`) -- and reports the test mean +- std of each method's best configuration re-run with
several seeds.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["BudgetError", "check_equal_budget", "compare_tunes", "format_comparison", "mean_std", "load_tunes",
           "has_damping"]


class BudgetError(ValueError):
    """The tunes of a comparison differ in budget, or a second-order method's damping was not tuned."""


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "values", "n"}`` of the finite values (sample std, ddof 1; 0 for one value)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "values": list(values), "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "values": list(values), "n": len(vals)}


def has_damping(space: Mapping[str, Any]) -> bool:
    """Whether a search space tunes a damping (a key ``damping`` or ``<section>.damping``)."""
    return any(str(k).rsplit(".", 1)[-1] == "damping" for k in space)


def _second_order(record: Mapping[str, Any]) -> bool:
    method = record.get("method") or {}
    if "second_order" in method:
        return bool(method["second_order"])
    return method.get("estimator", "identity") != "identity"


def check_equal_budget(tunes: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise :class:`BudgetError` unless every tune has the same trial budget and, for second-order methods,
    a damping in its search space.

    Args:
        tunes: method label -> tuning record (keys ``trials``, ``space``, ``method``).
    """
    if len(tunes) < 1:
        raise BudgetError("no tunes to compare: give at least one tuning record (tune.json)")
    for name, rec in tunes.items():
        for key in ("trials", "space"):
            if key not in rec:
                raise BudgetError(f"{name}: the record has no {key!r}; is it a tuning record (tune.json)?")
    trials = {name: rec["trials"] for name, rec in tunes.items()}
    if len(set(trials.values())) > 1:
        raise BudgetError("unequal tuning budgets: " + ", ".join(f"{n} {t} trials" for n, t in trials.items())
                          + "; tune every method with the same --trials before comparing them")
    finished = {name: rec.get("budget", {}).get("finished") for name, rec in tunes.items()}
    short = {n: f for n, f in finished.items() if f is not None and f < trials[n]}
    if short:
        raise BudgetError("unfinished tunes: " + ", ".join(f"{n} {f}/{trials[n]} trials" for n, f in short.items())
                          + "; run their `curvlab tune` again to finish the budget")
    for name, rec in tunes.items():
        if _second_order(rec) and not has_damping(rec["space"]):
            raise BudgetError(f"{name} is a second-order method but its search space {sorted(rec['space'])} has no "
                              "damping; add e.g. \"optimizer.damping\" = {low = 1e-4, high = 1, log = true}")


def compare_tunes(tunes: Mapping[str, Mapping[str, Any]], metric: str = "test_accuracy") -> dict[str, Any]:
    """Check the budgets (:func:`check_equal_budget`) and tabulate each method's best configuration and the
    test mean +- std of its re-runs (``record["final"][metric]``, see :func:`mean_std`).

    Returns:
        ``{"trials", "metric", "rows": [{method, second_order, space, best_params, val, test_mean, test_std,
        seeds}], "table"}``.
    """
    check_equal_budget(tunes)
    rows = []
    for name, rec in tunes.items():
        final = (rec.get("final") or {}).get(metric)
        if final is None:
            raise BudgetError(f"{name}: the record has no final {metric!r} (the test re-runs of its best "
                              "configuration); finish the tune first")
        best = rec.get("best") or {}
        rows.append({"method": name, "second_order": _second_order(rec), "space": sorted(rec["space"]),
                     "best_params": best.get("params"), "val": best.get("value"), "test_mean": final["mean"],
                     "test_std": final["std"], "seeds": final.get("n", len(final.get("values", [])))})
    out = {"trials": next(iter(tunes.values()))["trials"], "metric": metric, "rows": rows}
    out["table"] = format_comparison(out)
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def format_comparison(result: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`compare_tunes`' rows."""
    head = ["method", "tuned", "val (best)", f"{result['metric']} mean +- std", "seeds", "best params"]
    body = []
    for r in result["rows"]:
        params = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                           for k, v in (r["best_params"] or {}).items())
        test = f"{_fmt(r['test_mean'])} +- {_fmt(r['test_std'])}"
        body.append([r["method"], "+".join(k.rsplit(".", 1)[-1] for k in r["space"]), _fmt(r["val"]), test,
                     str(r["seeds"]), params])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [f"equal budget: {result['trials']} trials per method, selected on validation data"]
    lines += ["  ".join(x[i].ljust(widths[i]) for i in range(len(head))).rstrip() for x in [head, *body]]
    return "\n".join(lines)


def load_tunes(paths: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """``tune.json`` records by method label (the folder name) from tune folders or ``tune.json`` files; a
    folder without one is searched one level down (a folder of tunes)."""
    found: dict[str, dict[str, Any]] = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else ([p / "tune.json"] if (p / "tune.json").is_file() else
                                          sorted(p.glob("*/tune.json")))
        for f in files:
            found[f.parent.name] = json.loads(f.read_text())
    if not found:
        raise BudgetError(f"no tune.json under {', '.join(map(str, paths))}: run `curvlab tune` into these folders")
    return found
