"""The numbers a run records: the per-epoch metrics of an adaptive damping and the run's ``summary.json``.

:data:`TIMING_KEYS` names the metric keys that measure time (the only ones not reproducible bit for bit);
:func:`damping_row` adds the damping and its adaptations of one epoch to that epoch's row (the
Levenberg-Marquardt rule's ``rho`` and ``damping``, ALGORITHMS.md section 10, eqs. Q.2-Q.3, Martens & Grosse, ICML
2015, section 6.5, :mod:`curvlab.damping`; the curvature's damping ``gamma`` of ``gamma_adapt``, section 6.6,
:mod:`curvlab.factor_damping`); :func:`summarize` reduces the rows to the final
numbers of ``summary.json``. The row layout is documented in :mod:`.runner`.
"""
from __future__ import annotations

import math
from typing import Any

from .evaluation import needs_closure

__all__ = ["TIMING_KEYS", "damping_row", "history_marks", "summarize"]

#: Metric keys that measure time (everything else is reproducible bit for bit).
TIMING_KEYS = ("step_time_ms", "refresh_time_s", "epoch_time_s", "time_s")


def damping_row(opt: Any, start: tuple[int, int]) -> dict[str, Any]:
    """The metrics of an adaptive damping (``damping_adapt`` / ``gamma_adapt``): the damping at the epoch's end and
    the adaptations made in it (``step``, ``rho``, ``damping``; ``gamma`` for the curvature's damping). Empty for a
    fixed damping, so a plain run's metrics keep their keys."""
    if not needs_closure(opt) and getattr(opt, "gamma", None) is None:
        return {}
    group = opt.param_groups[0]
    row: dict[str, Any] = {"damping": group["damping"]}
    if "gamma" in group:
        row["gamma"] = group["gamma"]
    row["damping_history"] = [{k: h[k] for k in ("step", "rho", "damping")}
                              for h in opt.damping_history[start[0]:]]
    if getattr(opt, "gamma", None) is not None:
        row["gamma_history"] = [{k: h[k] for k in ("step", "gamma", "measured_at") if k in h}
                                for h in opt.gamma_history[start[1]:]]
    return row


def history_marks(opt: Any) -> tuple[int, int]:
    """The lengths of the damping and gamma histories: where an epoch's adaptations start (see :func:`damping_row`)."""
    return len(getattr(opt, "damping_history", [])), len(getattr(opt, "gamma_history", []))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarize(rows: list[dict[str, Any]], cfg: dict[str, Any], rid: str, task: str, loss_name: str, split: Any,
              opt: Any) -> dict[str, Any]:
    """Final / best test accuracy, final train accuracy, epochs to ``train.target_accuracy`` (None if never
    reached), final losses, mean step time, refresh time per step and its share of the step, coverage, divergence."""
    trained = [r for r in rows if r["epoch"] > 0]
    acc = [r["test_accuracy"] for r in trained]
    target = cfg["train"]["target_accuracy"]
    steps = trained[-1]["steps"] if trained else 0
    step_s = sum(r["step_time_ms"] * (r["steps"] - p["steps"]) for p, r in zip(rows, rows[1:])) / 1e3
    refresh_s = sum(r["refresh_time_s"] for r in trained)
    cover = opt.coverage()
    last = trained[-1] if trained else rows[0]
    test_losses = [r["test_loss"] for r in rows if _finite(r["test_loss"])]
    nonfinite = not all(_finite(r["train_loss"]) or r["train_loss"] is None for r in rows) \
        or not _finite(last["test_loss"])
    stopped = rows[-1].get("diverged") or ("a loss evaluated at the end of an epoch is not finite" if nonfinite
                                           else None)
    hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.config.items()}
    return {
        "run_id": rid, "name": cfg["name"], **{k: cfg["optimizer"][k] for k in ("estimator", "rule", "scaling")},
        "dataset": split.name, "model": cfg["model"]["name"], "task": task, "loss": loss_name,
        "num_train": split.num_train, "num_test": split.num_test, "epochs": len(trained), "steps": steps,
        **({"evaluated_on": split.evaluated_on} if split.evaluated_on != "test" else {}),
        "final_test_accuracy": acc[-1] if acc and task == "classification" else None,
        "final_train_accuracy": last.get("train_accuracy"),
        "best_test_accuracy": max((a for a in acc if a is not None), default=None),
        "target_accuracy": target,
        "epochs_to_target": next((r["epoch"] for r in trained if (r["test_accuracy"] or 0.0) >= target), None),
        "final_train_loss": last["train_loss"], "final_test_loss": last["test_loss"],
        "best_test_loss": min(test_losses, default=None),
        "mean_step_ms": 1e3 * step_s / max(steps, 1),
        "refresh_ms_per_step": 1e3 * refresh_s / max(steps, 1),
        "refresh_fraction": refresh_s / step_s if step_s > 0 else None,
        "train_time_s": last["time_s"] or 0.0,
        "skipped_steps": opt.skipped_steps, "numerics_events": len(opt.events),
        "diverged": stopped is not None, "diverged_reason": stopped,
        "num_params": sum(c["numel"] for c in cover),
        "preconditioned_params": sum(c["numel"] for c in cover if c["preconditioned"]),
        "optimizer_config": hyper,
    }
