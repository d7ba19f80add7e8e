"""Runner configurations as the ``run`` of :func:`curvlab.experiments.fair.fair_compare`.

The batch-size figures (``paper_figures/fop.py``, ``paper_figures/sngm.py``) train whole runner configurations
(:func:`curvlab.experiments.runner.run`, in process, nothing written) under the equal-budget protocol.
:func:`runner_trial` turns a base configuration into ``run(method, params, phase, seed) -> metrics``:

* ``params`` (the tuned values merged over ``method.fixed``) go into the ``[optimizer]`` table;
* the data gets a validation split carved from the TRAINING data (``data.val_fraction``, stratified,
  :mod:`curvlab.validation`); phase ``"val"`` evaluates on it (the test set is not read), phase ``"test"``
  trains on the same fitting part and evaluates on the test set;
* the returned metrics are ``<phase>_accuracy`` (final), ``<phase>_best_accuracy``, ``epochs_to_target`` and
  ``seconds_to_target`` (first epoch whose accuracy on that phase's data reaches ``target``; None if never),
  ``diverged``, ``curve`` (accuracy per epoch, epoch 0 first), ``curve_time`` (training seconds at each epoch end), ``batch_loss`` (mean minibatch loss per epoch: the same
  in both phases), ``evaluated_on`` (``"validation"`` or ``"test"``), ``num_eval`` (examples evaluated) and, with ``damping=True``, ``damping``: the
  damping diagnostic (:func:`curvlab.diagnostics.damping_metrics`) after the last step, plus its summary
  ``damping_ratio_mean`` (the largest ``damping / mean eigenvalue`` over the damped factors).

:func:`edge_params` (from :mod:`curvlab.experiments.fair`) flags tuned values that sit on the edge of their search range (the optimum may lie outside).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

from .fair import edge_params  # re-exported: the paper scripts import it from here

__all__ = ["runner_trial", "edge_params", "num_fit"]


def num_fit(data: Mapping[str, Any], val_fraction: float, val_seed: int = 0) -> int:
    """Training examples left for fitting once the validation part is carved out of ``data``."""
    from .runner import load_split

    return load_split({**data, "val_fraction": val_fraction, "val_seed": val_seed}).num_train


def runner_trial(base: Mapping[str, Any], *, val_fraction: float, val_seed: int = 0, target: float | None = None,
                 damping: bool = False) -> Callable[[Any, dict[str, Any], str, int], dict[str, Any]]:
    """``run(method, params, phase, seed)`` for :func:`~curvlab.experiments.fair.fair_compare` (module doc).

    Args:
        base: a runner configuration without the tuned optimizer keys (``train.seed`` is overwritten).
        val_fraction, val_seed: the validation split carved from the training data.
        target: the accuracy of ``epochs_to_target``.
        damping: record the damping diagnostic after the last step (costs one eigendecomposition per factor).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    from .runner import run as run_config

    def run(method: Any, params: dict[str, Any], phase: str, seed: int) -> dict[str, Any]:
        if phase not in ("val", "test"):
            raise ValueError(f"phase must be 'val' or 'test', got {phase!r}")
        cfg = copy.deepcopy(dict(base))
        cfg["data"] = {**cfg["data"], "val_fraction": val_fraction, "val_seed": val_seed,
                       "evaluate_on": "validation" if phase == "val" else "test"}
        cfg["optimizer"] = {**cfg.get("optimizer", {}), **params}
        cfg["train"] = {**cfg.get("train", {}), "seed": seed}
        if damping:
            batch = cfg["train"].get("batch_size")
            n = num_fit(base["data"], val_fraction, val_seed)
            steps = cfg["train"]["epochs"] * math.ceil(n / (n if batch == "full" else batch))
            cfg["train"]["damping_every"] = steps            # the diagnostic once, after the last step
        result = run_config(cfg, out=None, quiet=True)
        rows = result.metrics
        curve = [r["test_accuracy"] for r in rows]
        reached = next((r for r in rows[1:] if target is not None and (r["test_accuracy"] or 0.0) >= target), None)
        out: dict[str, Any] = {
            f"{phase}_accuracy": result.summary["final_test_accuracy"],
            f"{phase}_best_accuracy": result.summary["best_test_accuracy"],
            "epochs_to_target": reached["epoch"] if reached else None,
            "seconds_to_target": reached["time_s"] if reached else None,
            "diverged": bool(result.summary["diverged"]), "steps": result.summary["steps"],
            "train_time_s": result.summary["train_time_s"], "curve": curve,
            "curve_time": [r["time_s"] or 0.0 for r in rows], "batch_loss": [r["batch_loss"] for r in rows[1:]],
            "evaluated_on": result.summary.get("evaluated_on", "test"), "num_eval": result.summary["num_test"]}
        if result.summary["diverged"]:
            out[f"{phase}_accuracy"] = None
        if damping:
            logs = [entry for r in rows for entry in r.get("damping_report", [])]
            layers = logs[-1]["layers"] if logs else {}
            ratios = [v["ratio_mean"] for v in layers.values() if v.get("ratio_mean") is not None]
            out["damping"] = layers
            out["damping_ratio_mean"] = max(ratios) if ratios else None
        return out

    return run
