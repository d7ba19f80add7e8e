"""``curvlab tune``: tune a run configuration's hyper-parameters on a validation split, then measure the best
configuration on the test set with several seeds.

A tune config is a run config plus a ``[tune]`` table (keys :data:`TUNE_KEYS`)::

    [optimizer]
    estimator = "kfac"
    [train]
    epochs = 10
    [tune]
    trials = 20                 # the budget: finished trials (--trials overrides)
    sampler = "tpe"             # tpe | qmc (quasi-random) | random | grid
    metric = "val_accuracy"     # see METRICS; the direction follows from it unless given
    val_fraction = 0.2          # share of the TRAINING set held out for selection
    seeds = 3                   # re-runs of the best configuration, evaluated on the test set
    pruner = "none"             # or "median" (stop trials whose validation accuracy lags)
    [tune.space]
    "optimizer.lr" = {low = 1e-3, high = 1, log = true}
    "optimizer.damping" = {low = 1e-4, high = 1, log = true}
    "optimizer.momentum" = {choices = [0.0, 0.5, 0.9]}

Each trial is an ordinary run (:func:`~curvlab.experiments.runner.run`) into ``DIR/runs/<run id>`` of the
config with the trial's values and ``data.val_fraction`` set: it trains on the fitting part of the training
set and its "test" metrics are measured on the validation part (the test tensors are dropped before training,
:mod:`curvlab.validation`). The study lives in ``DIR/study.db`` (SQLite; ``--storage`` takes any Optuna RDB
URL), so a killed tune resumes and several workers (``--workers K`` local processes, or ``--launcher submitit``
jobs) share it (:func:`curvlab.tuning.tune`). When the budget is spent, the best trial's configuration is run
again with ``seeds`` training seeds on the same fitting part and evaluated on the test set -- the only time
the test set is touched -- into ``DIR/final/<run id>``. Outputs: ``DIR/tune.json`` (the method, the budget and
search space, every trial, the best one, the test mean +- std; :func:`curvlab.equal_budget.compare_tunes`
compares such files), ``DIR/best.json`` and ``DIR/report/`` (:mod:`.tune_report`).
"""
from __future__ import annotations

import copy
import math
import multiprocessing as mp
import traceback
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from .config import ConfigError, apply_overrides, canonical_json, resolve_config, run_id
from .io import atomic_write_json, read_json
from ..equal_budget import mean_std

__all__ = ["TUNE_KEYS", "METRICS", "tune_settings", "trial_config", "final_config", "tune_worker", "run_tune",
           "TUNE_JSON", "BEST_JSON"]

TUNE_JSON, BEST_JSON, SPEC_JSON = "tune.json", "best.json", "tune_spec.json"
STUDY = "curvlab-tune"  # the study's name inside the storage
#: Selection metrics: name -> (summary key of a validation run, direction).
METRICS: dict[str, tuple[str, str]] = {
    "val_accuracy": ("final_test_accuracy", "maximize"),
    "best_val_accuracy": ("best_test_accuracy", "maximize"),
    "val_loss": ("final_test_loss", "minimize"),
    "best_val_loss": ("best_test_loss", "minimize"),
    "train_loss": ("final_train_loss", "minimize"),
}
#: ``[tune]`` keys and defaults (``trials`` and ``space`` have none).
TUNE_KEYS: dict[str, Any] = {"trials": None, "space": None, "sampler": "tpe", "seed": 0, "metric": "val_accuracy",
                             "direction": None, "val_fraction": 0.2, "val_seed": 0, "seeds": 3, "pruner": "none",
                             "workers": 1, "launcher": None}


def tune_settings(cfg: Mapping[str, Any], trials: int | None = None) -> dict[str, Any]:
    """The validated ``[tune]`` table of ``cfg`` with defaults; ``trials`` overrides ``tune.trials``.

    Raises:
        ConfigError: naming the key (unknown keys, a missing space or budget, bad values).
    """
    from curvlab.tuning import PRUNERS, SAMPLERS, TuneError, grid_size, parse_space

    given = cfg.get("tune")
    if not isinstance(given, Mapping):
        raise ConfigError("a tune config needs a [tune] table with a [tune.space] (see `curvlab tune --help`)")
    unknown = [k for k in given if k not in TUNE_KEYS]
    if unknown:
        raise ConfigError(f"unknown key tune.{unknown[0]}; accepted: {', '.join(TUNE_KEYS)}")
    out = {**TUNE_KEYS, **dict(given)}
    if trials is not None:
        out["trials"] = trials
    t = out["trials"]
    if t is None:
        raise ConfigError("the tuning budget is missing: set tune.trials or pass --trials N")
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ConfigError(f"tune.trials (--trials) must be an integer >= 1, got {t!r}")
    try:
        space = parse_space(out["space"] or {})
    except TuneError as err:
        raise ConfigError(f"tune.space: {err}") from None
    for key in space:
        if "." not in key or key.split(".")[0] not in ("data", "model", "optimizer", "train"):
            raise ConfigError(f"tune.space: {key!r} is not a config key; name it as section.key, e.g. 'optimizer.lr'")
        if key.split(".")[0] == "train" and key.split(".")[1] == "seed":
            raise ConfigError("tune.space: train.seed is not a hyper-parameter; the final re-runs vary it (tune.seeds)")
    if out["metric"] not in METRICS:
        raise ConfigError(f"tune.metric must be one of {', '.join(METRICS)}, got {out['metric']!r}")
    out["direction"] = out["direction"] or METRICS[out["metric"]][1]
    if out["direction"] not in ("maximize", "minimize"):
        raise ConfigError(f"tune.direction must be 'maximize' or 'minimize', got {out['direction']!r}")
    if out["sampler"] not in SAMPLERS:
        raise ConfigError(f"tune.sampler must be one of {', '.join(SAMPLERS)}, got {out['sampler']!r}")
    if out["pruner"] not in PRUNERS:
        raise ConfigError(f"tune.pruner must be one of {', '.join(PRUNERS)}, got {out['pruner']!r}")
    if out["sampler"] == "grid":
        try:
            if t > grid_size(space):
                raise ConfigError(f"tune.trials={t} exceeds the grid's {grid_size(space)} points")
        except TuneError as err:
            raise ConfigError(f"tune.space: {err}") from None
    for key, low in (("seeds", 1), ("workers", 1), ("seed", 0), ("val_seed", 0)):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"tune.{key} must be an integer >= {low}, got {v!r}")
    f = out["val_fraction"]
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
        raise ConfigError(f"tune.val_fraction must be a number in (0, 1), got {f!r} (selection needs a validation "
                          "split carved from the training data)")
    out["space"] = {name: p.to_json() for name, p in space.items()}
    return out


def _base(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in cfg.items() if k != "tune"}


def trial_config(cfg: Mapping[str, Any], params: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config of one trial: ``cfg`` (without ``[tune]``) with ``params`` set, evaluated on the
    validation split."""
    raw = apply_overrides(_base(cfg), {**params, "data.val_fraction": settings["val_fraction"],
                                       "data.val_seed": settings["val_seed"], "data.evaluate_on": "validation"})
    return resolve_config(raw)


def final_config(cfg: Mapping[str, Any], params: Mapping[str, Any], settings: Mapping[str, Any],
                 seed: int) -> dict[str, Any]:
    """The resolved config of a final re-run: the trial's, with ``train.seed = seed``, evaluated on the test set."""
    raw = apply_overrides(_base(cfg), {**params, "data.val_fraction": settings["val_fraction"],
                                       "data.val_seed": settings["val_seed"], "data.evaluate_on": "test",
                                       "train.seed": seed})
    return resolve_config(raw)


def _method(cfg: Mapping[str, Any]) -> dict[str, Any]:
    opt = resolve_config(_base(cfg))["optimizer"]
    return {"estimator": opt["estimator"], "rule": opt["rule"], "scaling": opt["scaling"],
            "second_order": opt["estimator"] != "identity"}


def _storage(out: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(out / 'study.db').resolve()}"


def tune_worker(cfg: Mapping[str, Any], out: str | Path, *, trials: int | None = None, storage: str | None = None,
                worker: int = 0, quiet: bool = True) -> dict[str, Any]:
    """One worker of a tune: run trials into ``out/runs`` until the shared study holds the budget; return the
    tuning record (:meth:`curvlab.tuning.TuneResult.record`)."""
    from curvlab.tuning import tune
    from .runner import run

    out = Path(out)
    settings = tune_settings(cfg, trials)
    key = METRICS[settings["metric"]][0]

    def objective(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        config = trial_config(cfg, params, settings)

        def report(epoch: int, row: dict[str, Any]) -> None:  # validation accuracy per epoch -> pruner
            ctx.report(row.get("test_accuracy") if row.get("test_accuracy") is not None else
                       -(row.get("test_loss") or math.inf), epoch)

        result = run(config, out / "runs", quiet=quiet,
                     callbacks=[report] if settings["pruner"] != "none" else ())
        s = result.summary
        return {"value": s[key], "run_id": result.run_id, "diverged": bool(s.get("diverged")),
                "val_accuracy": s.get("final_test_accuracy"), "val_loss": s.get("final_test_loss")}

    result = tune(objective, settings["space"], settings["trials"], sampler=settings["sampler"],
                  seed=settings["seed"], metric="value", direction=settings["direction"],
                  storage=_storage(out, storage), study_name=STUDY, pruner=settings["pruner"],
                  method=_method(cfg), worker=worker)
    record = result.record()
    record["metric"] = settings["metric"]
    return record


def _worker_entry(cfg: dict[str, Any], out: str, trials: int | None, storage: str | None, worker: int) -> int:
    tune_worker(cfg, out, trials=trials, storage=storage, worker=worker, quiet=True)
    return worker


def _check_spec(cfg: Mapping[str, Any], out: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to resume a folder that holds a tune of another configuration (trials and workers may change)."""
    spec = {"config": _base(cfg), **{k: v for k, v in settings.items() if k not in ("trials", "workers", "launcher")}}
    path = out / SPEC_JSON
    if path.is_file():
        if canonical_json(read_json(path)) != canonical_json(spec):
            raise ConfigError(f"{out} holds a tune of another configuration or search space; use a fresh --out "
                              f"(or delete {out})")
    else:
        atomic_write_json(path, spec)


def run_tune(cfg: Mapping[str, Any], out: str | Path, *, trials: int | None = None, workers: int | None = None,
             storage: str | None = None, launcher: str | Mapping[str, Any] | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Tune ``cfg`` into ``out`` (resuming what is there), re-run the best configuration on the test set, write
    ``tune.json``, ``best.json`` and the report; return the ``tune.json`` content. See the module docstring."""
    from .submitit_launcher import resolve_launcher

    out = Path(out)
    settings = tune_settings(cfg, trials)
    workers = int(workers or settings["workers"])
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    opts = resolve_launcher(launcher if launcher is not None else settings["launcher"])
    out.mkdir(parents=True, exist_ok=True)
    _check_spec(cfg, out, settings)
    first = next(iter(settings["space"]))  # fail now on a space key the config does not accept
    probe = {name: (spec["choices"][0] if "choices" in spec else spec["low"]) for name, spec in settings["space"].items()}
    try:
        trial_config(cfg, probe, settings)
    except ConfigError as err:
        raise ConfigError(f"tune.space ({first}, ...): {err}") from None
    if not quiet:
        print(f"tune {out}: {settings['trials']} trials ({settings['sampler']}), metric {settings['metric']} "
              f"({settings['direction']}), {workers} worker(s), storage {_storage(out, storage)}")
    if workers > 1 or opts["name"] == "submitit":  # create the storage and the study once, before the workers
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.create_study(storage=_storage(out, storage), study_name=STUDY, direction=settings["direction"],
                            load_if_exists=True)
    if opts["name"] == "submitit":
        _submit_workers(cfg, out, trials, storage, workers, opts, quiet)
    elif workers == 1:
        tune_worker(cfg, out, trials=trials, storage=storage, worker=0, quiet=quiet)
    else:
        errors = []
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_worker_entry, dict(cfg), str(out), trials, storage, k) for k in range(workers)]
            for future in as_completed(futures):
                if future.exception() is not None:
                    errors.append("".join(traceback.format_exception(future.exception())))
        if errors:
            raise RuntimeError(f"{len(errors)} tune worker(s) failed; the first:\n{errors[0]}")
    record = tune_worker(cfg, out, trials=trials, storage=storage, worker=0, quiet=True)  # reads the study
    return finish_tune(cfg, out, record, settings, storage=storage, quiet=quiet)


def _submit_workers(cfg: Mapping[str, Any], out: Path, trials: int | None, storage: str | None, workers: int,
                    opts: dict[str, Any], quiet: bool) -> None:
    from .submitit_launcher import make_executor

    folder = Path(opts["folder"]) if opts["folder"] else out / "submitit"
    ex = make_executor(opts, folder)
    with ex.batch():
        jobs = [ex.submit(_worker_entry, dict(cfg), str(out), trials, storage, k) for k in range(workers)]
    if not quiet:
        print(f"submitit ({opts['executor']}): {len(jobs)} tune worker job(s) (logs in {folder})")
    for job in jobs:
        job.result()  # raises the worker's error


def finish_tune(cfg: Mapping[str, Any], out: Path, record: dict[str, Any], settings: Mapping[str, Any], *,
                storage: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Final re-runs of the best configuration on the test set, ``tune.json``, ``best.json``, the report."""
    from .runner import run
    from .tune_report import write_tune_report

    if record["best"] is None:
        raise RuntimeError(f"no trial of {out} finished; see the errors in its history ({out / TUNE_JSON})")
    params = record["best"]["params"]
    base_seed = resolve_config(_base(cfg))["train"]["seed"]
    finals = []
    for i in range(settings["seeds"]):
        result = run(final_config(cfg, params, settings, base_seed + i), out / "final", quiet=quiet)
        finals.append(result)
    method = record["method"]
    budget = {"trials": settings["trials"], "finished": sum(h["state"] in ("COMPLETE", "PRUNED")
                                                             for h in record["history"]),
              "space": settings["space"], "sampler": settings["sampler"], "epochs": finals[0].config["train"]["epochs"],
              "val_fraction": settings["val_fraction"]}
    final = {"seeds": [r.config["train"]["seed"] for r in finals], "run_ids": [r.run_id for r in finals],
             "test_accuracy": mean_std([r.summary["final_test_accuracy"] for r in finals]),
             "test_loss": mean_std([r.summary["final_test_loss"] for r in finals])}
    best_run = out / "runs" / run_id(trial_config(cfg, params, settings))
    doc = {"method": method, "budget": budget, **{k: record[k] for k in ("trials", "sampler", "seed", "metric",
                                                                          "direction", "space", "best", "history")},
           "final": final, "config": _base(cfg), "storage": _storage(out, storage)}
    doc["best"] = {**record["best"], "run_dir": str(best_run)}
    files = write_tune_report(out, doc)  # adds doc["importance"]
    atomic_write_json(out / TUNE_JSON, doc)
    atomic_write_json(out / BEST_JSON, {"method": method, "params": params, "metric": settings["metric"],
                                        "value": record["best"]["value"], "trial": record["best"]["trial"],
                                        "run_dir": str(best_run), "test": final,
                                        "config": final_config(cfg, params, settings, base_seed)})
    if not quiet:
        acc = final["test_accuracy"]
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        value = record["best"]["value"]
        value = f"{value:.4f}" if isinstance(value, float) else value
        print(f"best of {budget['finished']} trials: {shown} ({settings['metric']} {value}); "
              f"test accuracy over {len(finals)} seeds: "
              + (f"{acc['mean']:.4f} +- {acc['std']:.4f}" if acc["mean"] is not None else "n/a"))
        print("wrote " + ", ".join(str(p) for p in [out / TUNE_JSON, out / BEST_JSON, *files]))
    return doc
