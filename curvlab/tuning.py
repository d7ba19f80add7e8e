"""Hyper-parameter tuning of any callable over a declared search space, on Optuna (Akiba et al., KDD 2019).

This is the library behind ``curvlab tune`` and the in-process protocol of the paper-figure scripts::

    from curvlab.tuning import tune

    def objective(params, trial):                 # params: {"lr": 0.03, "damping": 0.1}
        model = train(x_fit, y_fit, **params)     # never sees the test set
        return accuracy(model, x_val, y_val)      # selection metric, on a validation split

    result = tune(objective, {"lr": {"low": 1e-3, "high": 1, "log": True},
                              "damping": {"low": 1e-4, "high": 1, "log": True}},
                  trials=20, sampler="tpe", seed=0, metric="val_accuracy", direction="maximize")
    result.best_params, result.history, result.record()   # record(): JSON-able

Search space (:func:`parse_space`, :mod:`curvlab.tuning_space`; re-exported here): each name maps to
``{low, high}`` (uniform; ``log = true`` for a log-uniform range, ``step`` for a discretized one; integers when
``low`` and ``high`` are integers), ``{choices = [...]}`` (or a bare list) for a categorical, and ``num`` (points
of a range under the ``grid`` sampler, log-spaced with ``log``). Samplers (:data:`SAMPLERS`): ``tpe`` (Bergstra
et al. 2011), ``qmc`` (scrambled Sobol quasi-random points), ``random`` and ``grid`` (every point of the product
once).

Budget and resuming: ``trials`` counts finished trials (completed or pruned) in the study. With a
``storage`` (an Optuna RDB URL such as ``sqlite:///DIR/study.db``) a killed call resumes: trials left
RUNNING by a dead worker (same host: its process is gone; any host: no heartbeat for ``grace_s``) are
marked FAIL and their parameters re-queued, so the same configuration runs again; several processes
calling :func:`tune` on one storage share the budget and finish exactly ``trials`` trials between them
(a trial asked beyond the budget by a race is closed as FAIL with ``surplus`` set, never evaluated).
Failed trials do not count; an exception in the objective marks its trial FAIL and is re-raised.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .tuning_space import Param, TuneError, finite_number, grid_size, parse_space, space_to_json
from .tuning_workers import BEAT as _BEAT, WORKER as _WORKER, Heartbeat, host_pid, recover_stale

__all__ = ["TuneError", "Param", "SAMPLERS", "PRUNERS", "parse_space", "space_to_json", "make_sampler", "tune",
           "TuneResult", "TrialContext", "Pruned", "grid_size"]

#: Sampler names accepted by :func:`make_sampler`.
SAMPLERS = ("tpe", "qmc", "random", "grid")
#: Pruner names: ``none`` (every trial runs to the end) or ``median`` (Optuna's MedianPruner: stop a
#: trial whose intermediate value is worse than the median of earlier trials at the same step).
PRUNERS = ("none", "median")


class Pruned(Exception):
    """Raised by :meth:`TrialContext.report` when the pruner stops the trial (the objective may let it
    propagate; :func:`tune` records the trial as PRUNED)."""


def make_sampler(name: str, space: Mapping[str, Any], seed: int | None = None) -> Any:
    """An Optuna sampler by name (:data:`SAMPLERS`)."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "qmc":
        import warnings

        with warnings.catch_warnings():  # "QMCSampler is experimental": its interface, not its results
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                              warn_asynchronous_seeding=False, warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        class AskTellGrid(optuna.samplers.GridSampler):
            """Optuna's grid sampler without its ``study.stop()`` once the grid is covered: that call is only
            allowed inside ``study.optimize``, and :func:`tune`'s ask/tell loop stops at the budget itself."""

            def after_trial(self, *args: Any, **kwargs: Any) -> None:
                return None

        return AskTellGrid({n: p.grid_values() for n, p in parse_space(space).items()}, seed=seed)
    raise TuneError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")


def _make_pruner(name: str) -> Any:
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    raise TuneError(f"pruner must be one of {', '.join(PRUNERS)}, got {name!r}")


class TrialContext:
    """What the objective gets besides the parameters: the trial ``number`` and :meth:`report` (pruning)."""

    def __init__(self, trial: Any) -> None:
        self._trial = trial
        self.number: int = trial.number

    def report(self, value: float, step: int) -> None:
        """Report an intermediate value (e.g. validation accuracy after epoch ``step``); raises
        :class:`Pruned` when the pruner stops the trial."""
        if finite_number(value):
            self._trial.report(float(value), step)
            if self._trial.should_prune():
                raise Pruned(f"trial {self.number} pruned at step {step}")

    def set(self, key: str, value: Any) -> None:
        """Record ``value`` (JSON-able) with the trial; it appears in the history's ``extras``."""
        self._trial.set_user_attr(key, value)


@dataclass
class TuneResult:
    """What :func:`tune` returns."""

    space: dict[str, Param]
    trials: int
    sampler: str
    seed: int
    metric: str
    direction: str
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    method: dict[str, Any] = field(default_factory=dict)

    @property
    def best_params(self) -> dict[str, Any]:
        if self.best is None:
            raise TuneError("no trial finished: there is no best configuration (see the history's errors)")
        return dict(self.best["params"])

    @property
    def finished(self) -> int:
        """Completed or pruned trials (what the budget counts)."""
        return sum(h["state"] in ("COMPLETE", "PRUNED") for h in self.history)

    def record(self) -> dict[str, Any]:
        """The JSON-able record ``{space, trials, sampler, seed, metric, direction, best, history, method}``."""
        return {"space": space_to_json(self.space), "trials": self.trials, "sampler": self.sampler, "seed": self.seed,
                "metric": self.metric, "direction": self.direction, "best": self.best, "history": self.history,
                "method": dict(self.method)}


_COUNTED = ("COMPLETE", "PRUNED")
_SURPLUS = "surplus"


def _history(study: Any) -> list[dict[str, Any]]:
    out = []
    for t in study.get_trials(deepcopy=False):
        extras = {k: v for k, v in t.user_attrs.items() if k not in (_WORKER, _BEAT)}
        out.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                    "value": t.value if t.value is not None and math.isfinite(t.value) else
                    (None if t.value is None else str(t.value)),
                    "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                    "extras": extras})
    return out


def _best(study: Any, direction: str) -> dict[str, Any] | None:
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None and not math.isnan(t.value)]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    best = pick(done, key=lambda t: (t.value, -t.number) if direction == "maximize" else (t.value, t.number))
    return {"params": dict(best.params), "value": best.value if math.isfinite(best.value) else str(best.value),
            "trial": best.number, "extras": {k: v for k, v in best.user_attrs.items() if k not in (_WORKER, _BEAT)}}


def tune(objective: Callable[[dict[str, Any], TrialContext], float | Mapping[str, Any]],
         space: Mapping[str, Any], trials: int, *, sampler: str = "tpe", seed: int = 0, metric: str = "value",
         direction: str = "maximize", storage: str | None = None, study_name: str = "curvlab",
         pruner: str = "none", method: Mapping[str, Any] | None = None, worker: int = 0,
         heartbeat_s: float = 30.0, grace_s: float = 120.0, quiet: bool = True) -> TuneResult:
    """Tune ``objective`` over ``space`` until the study holds ``trials`` finished trials.

    Args:
        objective: ``objective(params, ctx) -> value``, or a mapping holding ``metric`` plus extras
            recorded with the trial. A non-finite value (a diverged run) is recorded as the worst value
            (``-inf`` when maximizing, ``inf`` when minimizing). It must select on validation data only.
        space: the search space (:func:`parse_space`).
        trials: the budget: finished trials in the study (already finished ones count, see the module
            docstring).
        sampler: one of :data:`SAMPLERS`; ``grid`` needs ``trials <= grid_size(space)``.
        seed: the sampler's seed (worker ``k`` of a shared study, and a resumed call, draw from a seed
            derived from it, so workers never repeat each other's draws).
        metric: the name of the value (recorded; the key read from a mapping result).
        direction: ``"maximize"`` or ``"minimize"``.
        storage: an Optuna RDB URL (``sqlite:///path/study.db``) to persist, resume and share the study;
            None keeps it in memory.
        study_name: the study's name inside the storage.
        pruner: one of :data:`PRUNERS` (intermediate values come from :meth:`TrialContext.report`).
        method: recorded as is (e.g. ``{"estimator": "kfac", "rule": "natural", "second_order": True}``).
        worker: this process's index among workers sharing the storage (seeds only).
        heartbeat_s, grace_s: heartbeat interval of a running trial, and the silence after which another
            host's RUNNING trial counts as dead.
        quiet: silence Optuna's per-trial log lines.

    Returns:
        The :class:`TuneResult` (history of every trial in the study, the best completed one).
    """
    import optuna

    params = parse_space(space)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise TuneError(f"trials must be an integer >= 1, got {trials!r}")
    if direction not in ("maximize", "minimize"):
        raise TuneError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TuneError(f"seed must be an integer, got {seed!r}")
    if sampler not in SAMPLERS:
        raise TuneError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "grid" and trials > grid_size(params):
        raise TuneError(f"trials={trials} exceeds the grid's {grid_size(params)} points; lower trials or add grid "
                        "points (num = ... per range, more choices)")
    pruner_obj = _make_pruner(pruner)
    if quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(5):  # workers started together race to create the storage's tables and the study
        try:
            study = optuna.create_study(storage=storage, study_name=study_name, direction=direction,
                                        load_if_exists=True, pruner=pruner_obj)
            break
        except Exception:  # noqa: BLE001  (the loser of the race sees an integrity error; the next try loads it)
            if attempt == 4:
                raise
            time.sleep(0.5 + 0.5 * attempt)
    if study.direction.name.lower() != direction:
        raise TuneError(f"the stored study {study_name!r} maximizes/minimizes differently ({study.direction.name}); "
                        "use a fresh --out/storage or the same direction")
    existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(sampler, params, seed + 7919 * worker + 104729 * existing)
    worst = -math.inf if direction == "maximize" else math.inf
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    active = (*counted, optuna.trial.TrialState.RUNNING)
    while True:
        recover_stale(study, grace_s)
        if len(study.get_trials(deepcopy=False, states=active)) >= trials:
            break
        trial = study.ask()
        trial.set_user_attr(_WORKER, host_pid())
        trial.set_user_attr(_BEAT, time.time())
        before = [t for t in study.get_trials(deepcopy=False, states=active) if t.number < trial.number]
        if len(before) >= trials:  # another worker asked first: close this one unevaluated
            trial.set_user_attr(_SURPLUS, True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        values = {name: p.suggest(trial) for name, p in params.items()}
        ctx = TrialContext(trial)
        try:
            with Heartbeat(trial, heartbeat_s):
                out = objective(values, ctx)
        except (Pruned, optuna.TrialPruned):
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        except BaseException as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        if isinstance(out, Mapping):
            if metric not in out:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise TuneError(f"the objective returned {sorted(out)} without the metric {metric!r}")
            for key, value in out.items():
                if key != metric:
                    trial.set_user_attr(key, value)
            value = out[metric]
        else:
            value = out
        if not finite_number(value):
            trial.set_user_attr("nonfinite_value", repr(value))
            value = worst
        study.tell(trial, float(value))
    return TuneResult(space=params, trials=trials, sampler=sampler, seed=seed, metric=metric, direction=direction,
                      history=_history(study), best=_best(study, direction), method=dict(method or {}))
