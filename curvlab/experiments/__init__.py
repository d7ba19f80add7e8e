"""Experiments: runs, resumable sweeps, reports and the ablation behind ``curvlab demo``.

* :func:`run` trains one configuration into a run directory (resolved config, per-epoch metrics as JSON
  lines, a summary, a finished marker); :func:`load_config` / :func:`resolve_config` read and complete a
  configuration; :func:`run_id` is its deterministic id.
* :func:`run_sweep` expands a grid into runs, executes them in parallel processes and skips finished ones.
* :func:`report` aggregates run directories into CSV tables, a terminal table and figures.

Attributes are imported lazily, so ``curvlab.data`` can use the helper modules of this package
(:mod:`.idx`, :mod:`.synthetic`) without importing the training engine.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_config": "config", "resolve_config": "config", "apply_overrides": "config", "run_id": "config",
    "ConfigError": "config", "DEFAULTS": "config",
    "run": "runner", "RunResult": "runner",
    "expand_sweep": "sweep", "run_sweep": "sweep",
    "report": "reporting", "collect_runs": "reporting",
    "run_ablation": "ablation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
