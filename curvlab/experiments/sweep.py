"""Sweeps: a grid of configurations run in parallel local processes, resumable after a kill.

A sweep config is a run config plus a ``[sweep]`` table::

    [sweep]
    workers = 2                                  # parallel processes (1 = in this process)
    [sweep.grid]                                 # every list is an axis; the product is taken
    "optimizer.lr" = [0.03, 0.1, 0.3]
    train.seed = [0, 1, 2]                       # TOML dotted keys work too
    "train.batch_size" = [64, 256]
    "model.width" = [32, 64, 128]
    [[sweep.variants]]                           # optional named overrides, crossed with the grid
    name = "kfac"
    optimizer = { estimator = "kfac" }
    [[sweep.variants]]
    name = "sgd"
    "optimizer.estimator" = "identity"

Each point (variant x grid) is resolved (:func:`~curvlab.experiments.config.resolve_config`: the
estimator's ``suggested`` hyper-parameters fill what the point leaves open) and named by its variant
and non-seed axis values. Its run id is the hash of the resolved config, so points that resolve to the
same configuration run once. Runs go to ``OUT/runs/<run_id>/``; ``OUT/sweep.json`` lists them.

Resuming: a finished run (``DONE`` marker) is never redone; an unfinished one restarts from its last
epoch checkpoint; every file is written atomically. So a sweep killed at any moment and started again
ends with every run present exactly once, the finished ones untouched. Parallel runs use the ``spawn``
start method (safe with torch's threads); each run sets ``torch.set_num_threads(train.threads)``, 1 by
default. Two sweeps writing the same folder at the same time are not supported.

Launchers: ``[sweep.launcher]`` (or ``curvlab sweep --launcher ...``) chooses where the runs execute:
``"local"`` (default; the processes above) or ``"submitit"`` (one SLURM job per point, or submitit's
local executor with ``executor = "local"`` / ``--launcher local-submitit``), with the same resumability;
see :mod:`.submitit_launcher`.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, apply_overrides, flatten, resolve_config, run_id
from .io import atomic_write_json, atomic_write_text, read_json
from .launch import env_world_size
from .submitit_launcher import resolve_launcher, submit_sweep
from .runner import EpochCallback, is_finished, run

__all__ = ["expand_sweep", "run_sweep", "SweepResult", "SWEEP_KEYS", "MANIFEST"]

SWEEP_KEYS = ("grid", "variants", "workers", "launcher")
MANIFEST = "sweep.json"


@dataclass
class SweepPoint:
    """One run of a sweep: its resolved config, id, variant name and axis values."""

    config: dict[str, Any]
    run_id: str
    variant: str | None
    axes: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepResult:
    """``run_ids`` in sweep order; ``ran``: executed now; ``failed``: run id -> traceback text;
    ``submitted``: run id -> job id (submitit launcher); ``pending``: runs still unfinished on return
    (submitit without waiting)."""

    out: Path
    run_ids: list[str]
    ran: list[str]
    failed: dict[str, str]
    submitted: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


def _short(key: str, keys: Sequence[str]) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expand_sweep(cfg: Mapping[str, Any]) -> list[SweepPoint]:
    """The sweep's points, resolved, in a deterministic order (variants outer, grid axes in file order),
    duplicates (same run id) removed.

    Raises:
        ConfigError: unknown ``[sweep]`` keys, an axis that is not a non-empty list, a variant that is not
            a table, or any invalid resolved configuration (naming the point).
    """
    base = {k: v for k, v in cfg.items() if k != "sweep"}
    sweep = dict(cfg.get("sweep", {}) or {})
    for key in sweep:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"unknown key sweep.{key}; accepted: {', '.join(SWEEP_KEYS)}")
    grid = flatten(sweep.get("grid", {}) or {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key} must be a non-empty list of values (an axis), got {values!r}; "
                              "put fixed values in the base config")
    variants = sweep.get("variants") or [{}]
    if not isinstance(variants, list) or not all(isinstance(v, Mapping) for v in variants):
        raise ConfigError("sweep.variants must be a list of tables ([[sweep.variants]] in TOML)")
    points: list[SweepPoint] = []
    seen: set[str] = set()
    named = [k for k in grid if k != "train.seed"]
    for variant in variants:
        vname = variant.get("name")
        overrides = flatten({k: v for k, v in variant.items() if k != "name"})
        for combo in itertools.product(*grid.values()):
            axes = dict(zip(grid, combo))
            point = apply_overrides(base, {**overrides, **axes})
            parts = ([str(vname)] if vname else []) + [f"{_short(k, list(grid))}={_fmt(axes[k])}" for k in named]
            point["name"] = " ".join(parts) or base.get("name", "") or ""
            try:
                resolved = resolve_config(point)
            except ConfigError as err:
                raise ConfigError(f"sweep point {point['name'] or axes}: {err}") from None
            rid = run_id(resolved)
            if rid not in seen:
                seen.add(rid)
                points.append(SweepPoint(resolved, rid, vname, axes))
    return points


def _worker(config: dict[str, Any], runs_dir: str) -> str:
    """Run one configuration in a worker process (quietly); return its run id."""
    return run(config, runs_dir, quiet=True).run_id


def run_sweep(cfg: Mapping[str, Any], out: str | Path, *, workers: int | None = None, quiet: bool = False,
              callbacks: Sequence[EpochCallback] = (), launcher: str | Mapping[str, Any] | None = None
              ) -> SweepResult:
    """Expand ``cfg`` (:func:`expand_sweep`) and run every unfinished point into ``out/runs``.

    Args:
        cfg: a config with a ``[sweep]`` table (without one it is a sweep of one run).
        out: the sweep folder (``sweep.json``, ``runs/``).
        workers: parallel processes; default ``sweep.workers`` or 1 (1 runs in this process).
        quiet: no progress bars.
        callbacks: passed to :func:`~curvlab.experiments.runner.run` (in-process runs only, ``workers=1``).
        launcher: overrides ``sweep.launcher`` (a name or a table, see
            :func:`~curvlab.experiments.submitit_launcher.resolve_launcher`).

    A run that raises is recorded (``runs/<id>/error.txt``, ``SweepResult.failed``) and the sweep goes
    on; it is retried, from its checkpoint, the next time. A run that diverges is not an error: it stops at
    once, is finished with ``diverged: true`` in its summary (:mod:`.runner`) and is not retried.
    KeyboardInterrupt stops the sweep.
    """
    from tqdm.auto import tqdm

    points = expand_sweep(cfg)
    out = Path(out)
    runs_dir = out / "runs"
    sweep = dict(cfg.get("sweep", {}) or {})
    workers = int(workers or sweep.get("workers") or 1)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    opts = resolve_launcher(launcher if launcher is not None else sweep.get("launcher"))
    if env_world_size() > 1:
        raise ConfigError("curvlab sweep does not run under torchrun: run each point with `torchrun ... -m curvlab "
                          "run`, or give the sweep multi-task jobs (--launcher submitit --tasks-per-node N)")
    previous = read_json(out / MANIFEST) if (out / MANIFEST).is_file() else {}
    atomic_write_json(out / MANIFEST, {
        "axes": list(flatten(sweep.get("grid", {}) or {})),
        "variants": [v.get("name") for v in sweep.get("variants") or []],
        "runs": [{"run_id": p.run_id, "name": p.config["name"], "variant": p.variant, "axes": p.axes}
                 for p in points],
        "config": dict(cfg),
        "launcher": opts,
        "jobs": previous.get("jobs", {}),  # submitit job ids of every submission, by run id
    })
    todo = [p for p in points if not is_finished(runs_dir / p.run_id)]
    if not quiet:
        where = f"{workers} worker{'s' if workers > 1 else ''}" if opts["name"] == "local" else \
            f"submitit {opts['executor']} jobs"
        print(f"sweep {out}: {len(points)} runs, {len(points) - len(todo)} already finished, {len(todo)} to run"
              f" ({where})")
    ran, failed = [], {}
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc="sweep", unit="run",
               disable=quiet or opts["name"] != "local")  # submitit: submit_sweep shows its own progress

    def record(point: SweepPoint, error: BaseException | str | None) -> None:
        if error is None:
            ran.append(point.run_id)
            (runs_dir / point.run_id / "error.txt").unlink(missing_ok=True)
            summary = runs_dir / point.run_id / "summary.json"
            if summary.is_file() and (why := read_json(summary).get("diverged_reason")):
                bar.write(f"run {point.run_id} ({point.config['name']}) diverged (recorded; the sweep goes on): "
                          f"{why.split('. ')[0]}")
        else:
            text = error if isinstance(error, str) else "".join(traceback.format_exception(error))
            failed[point.run_id] = text
            atomic_write_text(runs_dir / point.run_id / "error.txt", text)
            brief = error.strip().splitlines()[-1] if isinstance(error, str) else f"{type(error).__name__}: {error}"
            bar.write(f"run {point.run_id} ({point.config['name']}) failed: {brief}")
        bar.update(1)

    if opts["name"] == "submitit":
        if not todo:
            return SweepResult(out, [p.run_id for p in points], ran, failed)
        jobs = submit_sweep(todo, out, opts, quiet=quiet, record=record)
        return SweepResult(out, [p.run_id for p in points], ran, failed, jobs["submitted"], jobs["pending"])
    try:
        if workers == 1:
            for point in todo:
                try:
                    run(point.config, runs_dir, quiet=quiet, callbacks=callbacks)
                except Exception as err:  # noqa: BLE001  (recorded; the sweep goes on)
                    record(point, err)
                else:
                    record(point, None)
        else:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
            try:
                futures = {pool.submit(_worker, p.config, str(runs_dir)): p for p in todo}
                for future in as_completed(futures):
                    record(futures[future], future.exception())
            except BaseException:
                # Ctrl-C (or any error here): stop now. Running runs are killed, which is safe: they resume
                # from their last epoch checkpoint next time (pool._processes: no public handle exists).
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.terminate()
                raise
            pool.shutdown()
    finally:
        bar.close()
    return SweepResult(out, [p.run_id for p in points], ran, failed)
