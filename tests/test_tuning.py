"""curvlab.tuning, curvlab.validation, `curvlab tune` and the equal-budget protocol (curvlab.equal_budget)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import curvlab
from curvlab.data import Split
from curvlab.equal_budget import BudgetError, check_equal_budget, compare_tunes, load_tunes, mean_std
from curvlab.experiments.config import ConfigError, resolve_config
from curvlab.tuning import TuneError, grid_size, parse_space, tune
from curvlab.validation import carve_validation, validation_indices, validation_split

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 240, 60


@curvlab.register_dataset("tune_ids")
def _load_ids(seed: int = 0, dtype: torch.dtype = torch.float32) -> Split:
    """Column 0 holds each example's id / 1000 (train ids < N_TRAIN <= test ids); labels from a linear teacher."""
    g = torch.Generator().manual_seed(seed)
    n = N_TRAIN + N_TEST
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = (x[:, 1:] @ torch.randn(7, 3, generator=g, dtype=torch.float64)).argmax(dim=1)
    x[:, 0] = torch.arange(n, dtype=torch.float64) / 1000
    return Split(x_train=x[:N_TRAIN].to(dtype), y_train=y[:N_TRAIN], x_test=x[N_TRAIN:].to(dtype),
                 y_test=y[N_TRAIN:], num_features=8, num_classes=3, name="tune_ids")


def _ids(x: torch.Tensor) -> set[int]:
    return {int(round(float(v) * 1000)) for v in x[:, 0]}


TINY = {"data": {"name": "digits"}, "model": {"name": "mlp", "width": 16, "depth": 1},
        "optimizer": {"estimator": "kfac"}, "train": {"epochs": 1, "batch_size": 128, "eval_train_examples": 0}}
SPACE = {"optimizer.lr": {"low": 1e-2, "high": 0.5, "log": True}, "optimizer.damping": {"low": 1e-3, "high": 1,
                                                                                          "log": True}}


def _tune_cfg(trials: int = 3, **tune_keys) -> dict:
    return {**json.loads(json.dumps(TINY)), "tune": {"trials": trials, "seeds": 2, "space": SPACE, **tune_keys}}


# ----------------------------------------------------------------------------- search space


def test_parse_space_kinds_and_grid() -> None:
    space = parse_space({"a": {"low": 1e-3, "high": 1, "log": True, "num": 4}, "b": [0.0, 0.9],
                         "c": {"low": 1, "high": 4, "num": 4}, "d": {"low": 0.0, "high": 1.0, "num": 3}})
    assert space["c"].is_int and not space["a"].is_int and space["b"].choices == (0.0, 0.9)
    assert space["a"].grid_values() == [0.001, 0.01, 0.1, 1.0] and space["c"].grid_values() == [1, 2, 3, 4]
    assert space["d"].grid_values() == [0.0, 0.5, 1.0] and grid_size(space) == 4 * 2 * 4 * 3
    with pytest.raises(TuneError, match="'e'.*grid sampler needs discrete values"):
        grid_size({"e": {"low": 0.1, "high": 1.0}})


@pytest.mark.parametrize("spec, match", [
    ({}, "search space is empty"),
    ({"lr": {"low": 1.0}}, "'lr': missing high"),
    ({"lr": {"low": 1.0, "high": 0.1}}, "'lr': low must be below high"),
    ({"lr": {"low": 0.0, "high": 1.0, "log": True}}, "'lr': a log range needs low > 0"),
    ({"lr": {"low": 0.1, "high": 1.0, "lgo": True}}, "'lr': unknown key 'lgo'"),
    ({"m": {"choices": []}}, "'m': choices must be a non-empty list"),
    ({"m": {"choices": [0.1, 0.1]}}, "'m': choices .* repeat a value"),
    ({"m": {"choices": [0.1], "low": 0.0}}, "'m': choices cannot be combined with low"),
    ({"m": {"choices": [[1, 2]]}}, "'m': choice \\[1, 2\\] is not a number"),
    ({"lr": {"low": 0.1, "high": 1.0, "log": True, "step": 0.1}}, "'lr': step and log"),
    ({"lr": "big"}, "'lr': expected a table"),
])
def test_parse_space_errors(spec, match) -> None:
    with pytest.raises(TuneError, match=match):
        parse_space(spec)


def test_tune_in_process_finds_the_optimum_and_records_everything() -> None:
    seen = []

    def objective(params, ctx):
        seen.append(params)
        return -(math.log10(params["lr"]) + 1) ** 2 - (0.5 if params["m"] == 0.0 else 0.0)

    res = tune(objective, {"lr": {"low": 1e-3, "high": 10, "log": True, "num": 5}, "m": [0.0, 0.9]}, 10,
               sampler="grid", metric="score", method={"estimator": "kfac"})
    assert len(seen) == 10 and len({json.dumps(p, sort_keys=True) for p in seen}) == 10  # the whole grid, once
    assert res.best_params == {"lr": pytest.approx(0.1), "m": 0.9} and res.best["value"] == pytest.approx(0.0)
    rec = json.loads(json.dumps(res.record()))
    assert set(rec) >= {"space", "trials", "sampler", "metric", "direction", "best", "history"}
    assert rec["trials"] == 10 and rec["space"]["m"] == {"choices": [0.0, 0.9]} and len(rec["history"]) == 10
    with pytest.raises(TuneError, match="trials=11 exceeds the grid's 10 points"):
        tune(objective, {"lr": {"low": 1e-3, "high": 10, "log": True, "num": 5}, "m": [0.0, 0.9]}, 11, sampler="grid")
    with pytest.raises(TuneError, match="sampler must be one of"):
        tune(objective, {"lr": [0.1]}, 1, sampler="bayes")


def test_tune_nonfinite_is_worst_and_errors_propagate() -> None:
    res = tune(lambda p, ctx: float("nan") if p["lr"] > 0.5 else p["lr"], {"lr": [0.1, 0.9]}, 2, sampler="grid")
    assert res.best_params == {"lr": 0.1} and res.finished == 2
    assert any(h["extras"].get("nonfinite_value") for h in res.history)

    def boom(params, ctx):
        raise RuntimeError("no such thing")
    with pytest.raises(RuntimeError, match="no such thing"):
        tune(boom, {"lr": [0.1]}, 1)


# ----------------------------------------------------------------------------- validation split


def test_validation_indices_partition_seeded_and_stratified() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    fit, val = validation_indices(100, 0.2, seed=3, labels=labels)
    assert sorted(fit.tolist() + val.tolist()) == list(range(100)) and not set(fit.tolist()) & set(val.tolist())
    assert torch.bincount(labels[val]).tolist() == [10, 6, 4]  # stratified: 20% of each class
    again, _ = validation_indices(100, 0.2, seed=3, labels=labels)
    other, _ = validation_indices(100, 0.2, seed=4, labels=labels)
    assert torch.equal(fit, again) and not torch.equal(fit, other)
    x, y = torch.arange(100.0)[:, None], labels
    x_fit, y_fit, x_val, y_val = carve_validation(x, y, 0.25, seed=0)
    assert len(x_val) == 25 and torch.equal(y_fit, labels[x_fit[:, 0].long()])
    with pytest.raises(ValueError, match="val_fraction must be a number in \\(0, 1\\)"):
        validation_indices(10, 1.0)
    with pytest.raises(ValueError, match="leaves no validation examples"):
        validation_indices(3, 0.1)


def test_val_split_never_overlaps_the_test_set() -> None:
    split = _load_ids()
    val = validation_split(split, 0.25, val_seed=1)
    assert val.evaluated_on == "validation" and val.num_train + val.num_test == N_TRAIN
    fit_ids, val_ids = _ids(val.x_train), _ids(val.x_test)
    assert not fit_ids & val_ids and fit_ids | val_ids == set(range(N_TRAIN))  # both inside the training part
    final = validation_split(split, 0.25, val_seed=1, evaluate_on="test")
    assert _ids(final.x_train) == fit_ids and _ids(final.x_test) == set(range(N_TRAIN, N_TRAIN + N_TEST))
    cfg = resolve_config({"data": {"name": "tune_ids", "val_fraction": 0.25}})
    assert cfg["data"]["evaluate_on"] == "validation" and cfg["data"]["val_seed"] == 0
    assert "val_fraction" not in resolve_config({"data": {"name": "tune_ids"}})["data"]  # run ids unchanged
    with pytest.raises(ConfigError, match="data.val_seed needs data.val_fraction"):
        resolve_config({"data": {"name": "digits", "val_seed": 1}})


def test_selection_never_reads_test_metrics(tmp_path, monkeypatch) -> None:
    """Every evaluation during the trials sees training ids only; the test ids appear in the final re-runs."""
    from curvlab.experiments import runner
    from curvlab.experiments.tune import finish_tune, tune_settings, tune_worker

    seen: list[set[int]] = []
    original = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda net, x, *a, **k: (seen.append(_ids(x)), original(net, x, *a, **k))[1])
    runner._SPLITS.clear()
    cfg = {**_tune_cfg(3), "data": {"name": "tune_ids"}, "train": {"epochs": 2, "batch_size": 64}}
    record = tune_worker(cfg, tmp_path)
    during = set().union(*seen)
    assert seen and max(during) < N_TRAIN, "a trial evaluated on test examples"
    assert all(isinstance(h["value"], float) for h in record["history"])
    seen.clear()
    doc = finish_tune(cfg, tmp_path, record, tune_settings(cfg), quiet=True)
    assert set().union(*seen) & set(range(N_TRAIN, N_TRAIN + N_TEST))  # the final re-runs do use the test set
    assert doc["final"]["test_accuracy"]["n"] == 2


# ----------------------------------------------------------------------------- curvlab tune


def _study(out: Path):
    import optuna

    return optuna.load_study(study_name="curvlab-tune", storage=f"sqlite:///{(out / 'study.db').resolve()}")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_cli_tune_writes_best_report_and_records_budget(tmp_path, capsys) -> None:
    from curvlab.cli import main

    cfg = tmp_path / "kfac.toml"
    cfg.write_text('[model]\nname = "mlp"\nwidth = 16\ndepth = 1\n[optimizer]\nestimator = "kfac"\n'
                   '[train]\nepochs = 1\nbatch_size = 128\n[tune]\nseeds = 2\nsampler = "qmc"\n[tune.space]\n'
                   '"optimizer.lr" = {low = 1e-2, high = 0.5, log = true}\n'
                   '"optimizer.damping" = {low = 1e-3, high = 1, log = true}\n')
    out = tmp_path / "t"
    assert main(["tune", str(cfg), "--trials", "3", "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "tune.json").read_text())
    assert doc["budget"]["trials"] == 3 and doc["budget"]["finished"] == 3 and doc["trials"] == 3
    assert set(doc["budget"]["space"]) == {"optimizer.lr", "optimizer.damping"} and doc["budget"]["sampler"] == "qmc"
    assert doc["method"] == {"estimator": "kfac", "rule": "natural", "scaling": "standard", "second_order": True}
    best = json.loads((out / "best.json").read_text())
    assert best["params"] == doc["best"]["params"] and Path(best["run_dir"]).is_dir()
    assert best["config"]["data"]["evaluate_on"] == "test" and len(best["test"]["test_accuracy"]["values"]) == 2
    assert len(list((out / "runs").iterdir())) == 3 and len(list((out / "final").iterdir())) == 2
    for name in ("history.png", "importance.png", "report.txt"):
        assert (out / "report" / name).is_file(), name
    assert isinstance(doc["importance"], dict) and set(doc["importance"]) == set(SPACE)
    trial_cfg = json.loads((Path(best["run_dir"]) / "config.json").read_text())
    assert trial_cfg["data"]["evaluate_on"] == "validation" and trial_cfg["data"]["val_fraction"] == 0.2
    # a different search space in the same folder is refused; a larger budget resumes and adds trials
    cfg2 = tmp_path / "other.toml"
    cfg2.write_text(cfg.read_text().replace("high = 0.5", "high = 0.9"))
    assert main(["tune", str(cfg2), "--trials", "3", "--out", str(out), "--quiet"]) == 2
    assert "another configuration or search space" in capsys.readouterr().err
    assert main(["tune", str(cfg), "--trials", "4", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "tune.json").read_text())["budget"]["finished"] == 4


@pytest.mark.parametrize("tune_table, match", [
    (None, "needs a \\[tune\\] table"),
    ({"space": SPACE}, "tuning budget is missing"),
    ({"trials": 2, "space": SPACE, "metric": "test_accuracy"}, "tune.metric must be one of"),
    ({"trials": 2, "space": {"lr": {"low": 0.1, "high": 1}}}, "'lr' is not a config key"),
    ({"trials": 2, "space": {"train.seed": [0, 1]}}, "train.seed is not a hyper-parameter"),
    ({"trials": 2, "space": SPACE, "val_fraction": 0}, "tune.val_fraction must be a number in \\(0, 1\\)"),
    ({"trials": 2, "space": SPACE, "samples": 3}, "unknown key tune.samples"),
])
def test_tune_settings_errors(tune_table, match) -> None:
    from curvlab.experiments.tune import tune_settings

    cfg = dict(TINY, **({"tune": tune_table} if tune_table is not None else {}))
    with pytest.raises(ConfigError, match=match):
        tune_settings(cfg)


def test_unknown_space_key_fails_before_any_trial(tmp_path) -> None:
    from curvlab.experiments.tune import run_tune

    cfg = _tune_cfg(2)
    cfg["tune"]["space"] = {"optimizer.lrr": {"low": 0.1, "high": 1.0}}
    with pytest.raises(ConfigError, match="unknown hyper-parameter 'lrr'.*Did you mean 'lr'"):
        run_tune(cfg, tmp_path, quiet=True)
    assert not (tmp_path / "runs").exists()


def test_killed_tune_resumes_to_exactly_n_trials(tmp_path) -> None:
    """Kill a tune after >= 1 finished trial, start it again: N finished trials, one run directory each."""
    import optuna

    n = 4
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**_tune_cfg(n, seeds=1, sampler="random"),
                               "train": {"epochs": 4, "batch_size": 64, "eval_train_examples": 0}}))
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "curvlab", "tune", str(cfg), "--out", str(out), "--quiet"]

    def start_and_kill() -> None:
        proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                if (out / "study.db").is_file():
                    try:
                        trials_now = _study(out).get_trials()
                    except Exception:  # noqa: BLE001  (the study may not exist yet)
                        trials_now = []
                    states = [t.state.name for t in trials_now]
                    # kill it in the middle of a trial (its parameters drawn, so there is a configuration to re-run)
                    if "COMPLETE" in states and states[-1] == "RUNNING" and trials_now[-1].params:
                        break
                time.sleep(0.2)
            assert proc.poll() is None, "the tune ended before it could be killed: " + proc.stderr.read().decode()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    # the trial seen RUNNING may finish between that read and the kill (a loaded machine): then kill the resumed
    # tune in its next trial, so that exactly one trial is left RUNNING by a dead worker
    for _ in range(3):
        start_and_kill()
        if any(t.state.name == "RUNNING" for t in _study(out).get_trials()):
            break
    killed = _study(out).get_trials()
    assert sum(t.state.name == "RUNNING" for t in killed) == 1, [t.state.name for t in killed]
    assert 1 <= sum(t.state.name == "COMPLETE" for t in killed) < n
    again = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    trials = _study(out).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].user_attrs["stale"]  # the killed trial, and only it
    retry = [t for t in complete if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retry) == 1 and retry[0].params == failed[0].params  # its configuration ran again (and resumed)
    run_ids = {t.user_attrs["run_id"] for t in complete}
    dirs = sorted(p.name for p in (out / "runs").iterdir())
    assert sorted(run_ids) == dirs, "a run directory that no finished trial owns, or a duplicate"
    assert all((out / "runs" / d / "DONE").is_file() for d in dirs)
    assert json.loads((out / "tune.json").read_text())["budget"]["finished"] == n


def test_two_workers_share_one_study(tmp_path) -> None:
    """Two worker processes on one SQLite storage finish exactly N trials between them."""
    from curvlab.experiments.tune import run_tune

    n = 5
    doc = run_tune(_tune_cfg(n, seeds=1, sampler="random"), tmp_path, workers=2, quiet=True)
    trials = _study(tmp_path).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n and doc["budget"]["finished"] == n
    assert all(t.user_attrs.get("surplus") for t in trials if t.state.name != "COMPLETE")  # never evaluated
    assert len({t.user_attrs["curvlab_worker"] for t in complete}) >= 1
    assert sorted({t.user_attrs["run_id"] for t in complete}) == sorted(p.name for p in (tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------- equal budget


def _record(trials: int, space: list[str], estimator: str, accs: list[float]) -> dict:
    return {"trials": trials, "space": {k: {"low": 0.1, "high": 1.0, "log": True} for k in space},
            "method": {"estimator": estimator, "rule": "natural", "second_order": estimator != "identity"},
            "best": {"params": {k: 0.3 for k in space}, "value": 0.9}, "final": {"test_accuracy": mean_std(accs)}}


def test_equal_budget_refuses_unequal_trials_and_missing_damping() -> None:
    sgd = _record(8, ["optimizer.lr"], "identity", [0.9, 0.92])
    kfac = _record(8, ["optimizer.lr", "optimizer.damping"], "kfac", [0.95, 0.97])
    with pytest.raises(BudgetError, match="unequal tuning budgets: sgd 8 trials, kfac 6 trials"):
        check_equal_budget({"sgd": sgd, "kfac": {**kfac, "trials": 6}})
    with pytest.raises(BudgetError, match="kfac is a second-order method .* has no damping"):
        check_equal_budget({"sgd": sgd, "kfac": _record(8, ["optimizer.lr"], "kfac", [0.9])})
    with pytest.raises(BudgetError, match="unfinished tunes: kfac 5/8"):
        check_equal_budget({"sgd": sgd, "kfac": {**kfac, "budget": {"finished": 5}}})
    result = compare_tunes({"sgd": sgd, "kfac": kfac})
    row = {r["method"]: r for r in result["rows"]}
    assert row["kfac"]["test_mean"] == pytest.approx(0.96) and row["sgd"]["second_order"] is False
    assert row["kfac"]["test_std"] == pytest.approx(math.sqrt(2 * 0.01 ** 2))
    assert "0.9600 +- 0.0141" in result["table"] and "8 trials per method" in result["table"]


def test_report_compares_tune_folders(tmp_path, capsys) -> None:
    from curvlab.cli import main

    for name, rec in (("sgd", _record(4, ["optimizer.lr"], "identity", [0.9])),
                      ("kfac", _record(3, ["optimizer.lr", "optimizer.damping"], "kfac", [0.95]))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tune.json").write_text(json.dumps(rec))
    assert set(load_tunes([tmp_path])) == {"sgd", "kfac"}
    assert main(["report", str(tmp_path), "--quiet"]) == 2
    assert "unequal tuning budgets" in capsys.readouterr().err
    (tmp_path / "kfac" / "tune.json").write_text(json.dumps(_record(4, ["optimizer.lr", "optimizer.damping"], "kfac",
                                                                   [0.95])))
    assert main(["report", str(tmp_path)]) == 0
    assert "4 trials per method" in capsys.readouterr().out
    assert json.loads((tmp_path / "report" / "comparison.json").read_text())["trials"] == 4


def test_a_dead_workers_running_trial_is_failed_and_its_params_rerun(tmp_path) -> None:
    import optuna

    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="curvlab", direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(0.1, 1.0)})
    orphan.set_user_attr("curvlab_worker", f"{__import__('socket').gethostname()}:{dead.pid}")
    seen = []
    res = tune(lambda p, ctx: seen.append(p["lr"]) or p["lr"], {"lr": {"low": 0.1, "high": 1.0}}, 2, storage=storage)
    trials = optuna.load_study(study_name="curvlab", storage=storage).get_trials()
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["stale"]
    assert seen[0] == pytest.approx(orphan.params["lr"]) and res.finished == 2  # re-run first, then one new trial
    assert trials[1].user_attrs["retry_of"] == 0


def test_a_trial_killed_before_recording_its_owner_is_failed_not_rerun(tmp_path, monkeypatch) -> None:
    """Killed between ``ask`` and recording its owner (and before drawing parameters): dead after
    UNOWNED_GRACE_S, closed as FAIL, nothing re-queued; a fresh unowned trial (a live worker's window) is left alone."""
    import optuna

    from curvlab import tuning_workers

    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="curvlab", direction="maximize")
    study.ask()                                            # no owner, no parameters
    fresh = study.get_trials()[0]
    assert not tuning_workers.is_stale(fresh, grace_s=120.0)
    monkeypatch.setattr(tuning_workers, "UNOWNED_GRACE_S", 0.0)
    res = tune(lambda p, ctx: p["lr"], {"lr": {"low": 0.1, "high": 1.0}}, 2, storage=storage)
    trials = optuna.load_study(study_name="curvlab", storage=storage).get_trials()
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["stale"]
    assert res.finished == 2 and not any("retry_of" in t.user_attrs for t in trials)
