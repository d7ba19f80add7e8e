"""The ablation's methods compared under the equal-budget protocol (:mod:`curvlab.equal_budget`).

Each method of :func:`~curvlab.experiments.ablation.ablation_config` (SGD, every estimator with the natural
rule, SNGM, FOP) is tuned with ``curvlab tune`` (:mod:`.tune`) with the same number of trials: over the
learning rate, and for second-order methods also the damping, each log-uniform within a factor ``span`` of the
method's suggested value (the same relative width for every method), selected on a validation split of the
training set. The best configuration of each is re-run with ``seeds`` seeds on the test set, and
:func:`~curvlab.equal_budget.compare_tunes` tabulates test mean +- std. Methods run in parallel processes, one
tune each; every tune resumes, so a killed call continues where it stopped.
"""
from __future__ import annotations

import copy
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .config import resolve_config

__all__ = ["method_tune_configs", "run_tuned_ablation"]


def method_tune_configs(trials: int = 6, seeds: int = 2, span: float = 10.0, sampler: str = "qmc",
                        **options: Any) -> dict[str, dict[str, Any]]:
    """One ``curvlab tune`` config per ablation method (``options`` go to
    :func:`~curvlab.experiments.ablation.ablation_config`)."""
    from .ablation import ablation_config

    cfg = ablation_config(**options)
    base = {k: v for k, v in cfg.items() if k not in ("sweep", "name")}
    out = {}
    for variant in cfg["sweep"]["variants"]:
        method = {**copy.deepcopy(base), "name": variant["name"], "optimizer": dict(variant["optimizer"])}
        opt = resolve_config(method)["optimizer"]
        space = {"optimizer.lr": {"low": opt["lr"] / span, "high": opt["lr"] * span, "log": True}}
        if opt["estimator"] != "identity":
            space["optimizer.damping"] = {"low": opt["damping"] / span, "high": opt["damping"] * span, "log": True}
        method["tune"] = {"trials": trials, "seeds": seeds, "sampler": sampler, "space": space}
        out[variant["name"]] = method
    return out


def _tune_one(cfg: dict[str, Any], out: str) -> str:
    from .tune import run_tune

    run_tune(cfg, out, quiet=True)
    return out


def run_tuned_ablation(out: str | Path, *, trials: int = 6, seeds: int = 2, workers: int = 2, quiet: bool = True,
                       **options: Any) -> dict[str, Any]:
    """Tune every method into ``out/<method>`` (equal budgets) and compare them; returns
    :func:`~curvlab.equal_budget.compare_tunes`' result (also written to ``out/comparison.{json,txt}``)."""
    from curvlab.equal_budget import compare_tunes, load_tunes

    from .io import atomic_write_json, atomic_write_text

    out = Path(out)
    configs = method_tune_configs(trials=trials, seeds=seeds, **options)
    jobs = [(cfg, str(out / name)) for name, cfg in configs.items()]
    if workers == 1:
        for cfg, folder in jobs:
            _tune_one(cfg, folder)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for future in [pool.submit(_tune_one, cfg, folder) for cfg, folder in jobs]:
                future.result()
    tunes = load_tunes([out / name for name in configs])
    result = compare_tunes(tunes)
    atomic_write_json(out / "comparison.json", result)
    atomic_write_text(out / "comparison.txt", result["table"] + "\n")
    if not quiet:
        print(result["table"])
    return result
