"""The report of a tune (``DIR/report/``): the trial history and the parameter importances.

* ``history.png/.pdf``: every finished trial's selection metric (validation) against the trial number, with
  the running best; diverged trials are marked.
* ``importance.png/.pdf``: Optuna's fANOVA parameter importances (Hutter, Hoos & Leyton-Brown, ICML 2014) over
  the completed trials (needs >= 2 of them and a space of >= 2 parameters; a one-parameter space has
  importance 1 by definition and no figure).
* ``report.txt``: the method, the budget, the best configuration and the test mean +- std of its re-runs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .io import atomic_write_text

__all__ = ["write_tune_report", "param_importances", "format_tune"]


def param_importances(storage: str, study_name: str = "curvlab-tune") -> dict[str, float] | str:
    """fANOVA importances of the study's parameters, or a sentence saying why there are none."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=storage)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    done = [t for t in done if t.value is not None and math.isfinite(t.value)]
    names = {n for t in done for n in t.params}
    if len(done) < 2:
        return f"{len(done)} completed trial(s) with a finite value: too few for importances"
    if len(names) < 2:
        return "a one-parameter space: its importance is 1 by definition"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except Exception as err:  # noqa: BLE001  (a report never fails on its optional part)
        return f"importances unavailable: {type(err).__name__}: {err}"


def format_tune(doc: dict[str, Any]) -> str:
    """A few lines on a tune: method, budget, best trial, test mean +- std."""
    m, b, best, final = doc["method"], doc["budget"], doc["best"], doc["final"]
    acc = final["test_accuracy"]
    lines = [f"method: {m['estimator']} + {m['rule']} ({m['scaling']}); second order: {m['second_order']}",
             f"budget: {b['finished']}/{b['trials']} finished trials, {b['sampler']} sampler, {b['epochs']} epochs each, "
             f"validation = {b['val_fraction']:g} of the training set",
             "space: " + "; ".join(f"{k} {v}" for k, v in b["space"].items()),
             f"best trial {best['trial']}: {best['params']} -> {doc['metric']} {best['value']}",
             f"test accuracy of the best configuration over seeds {final['seeds']}: "
             + (f"{acc['mean']:.4f} +- {acc['std']:.4f}" if acc["mean"] is not None else "n/a")
             + f" (values {[round(v, 4) if isinstance(v, float) else v for v in acc['values']]})"]
    return "\n".join(lines)


def write_tune_report(out: str | Path, doc: dict[str, Any]) -> list[Path]:
    """Write ``out/report/{history,importance}.{png,pdf}`` and ``report.txt``; also store the importances
    in ``doc["importance"]``. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curvlab.figures import save_figure

    rep = Path(out) / "report"
    rep.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    rows = [h for h in doc["history"] if h["state"] == "COMPLETE" and isinstance(h["value"], (int, float))]
    maximize = doc["direction"] == "maximize"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if rows:
        xs = [h["number"] for h in rows]
        ys = [h["value"] for h in rows]
        running, best = [], -math.inf if maximize else math.inf
        for y in ys:
            best = max(best, y) if maximize else min(best, y)
            running.append(best)
        finite = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        ax.plot([x for x, _ in finite], [y for _, y in finite], "o", ms=4, label="trial")
        ax.step(xs, running, where="post", label="best so far")
        diverged = [h["number"] for h in rows if h["extras"].get("diverged")]
        if diverged:
            ax.plot(diverged, [min(y for _, y in finite)] * len(diverged) if finite else [0] * len(diverged), "x",
                    color="red", label="diverged")
        ax.legend(fontsize=8)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{doc['metric']} (validation)")
    ax.set_title(f"{doc['method']['estimator']}+{doc['method']['rule']}: {doc['budget']['finished']} trials")
    fig.tight_layout()
    files += save_figure(fig, rep, "history")
    plt.close(fig)
    importance = param_importances(doc["storage"])
    doc["importance"] = importance
    if isinstance(importance, dict):
        fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * len(importance)))
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names])
        ax.set_xlabel("fANOVA importance")
        fig.tight_layout()
        files += save_figure(fig, rep, "importance")
        plt.close(fig)
    text = format_tune(doc) + "\nimportance: " + (", ".join(f"{k} {v:.3f}" for k, v in importance.items())
                                                  if isinstance(importance, dict) else importance) + "\n"
    path = rep / "report.txt"
    atomic_write_text(path, text)
    return [*files, path]
