"""curvlab.experiments: config parsing and overrides, atomic writes, reproducible runs, checkpoint resume,
reports and the command-line entry points."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the runs train on scikit-learn's digits")
from curvlab.experiments import cli, io  # noqa: E402
from curvlab.experiments.config import (ConfigError, apply_overrides, load_config, parse_value,  # noqa: E402
                                        resolve_config, run_id)
from curvlab.experiments.runner import TIMING_KEYS, run  # noqa: E402

#: A run of about a second: digits, a small MLP, K-FAC with MC Fisher (so the sampler RNG matters).
TINY = {"model": {"width": 16, "depth": 1}, "train": {"epochs": 3, "batch_size": 128},
        "optimizer": {"estimator": "kfac", "inv_interval": 2}}


def deterministic(rows: list[dict]) -> list[dict]:
    """Metric rows without the timing keys."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


# -------------------------------------------------------------------------------------------------- config


def test_public_names_are_the_functions() -> None:
    import curvlab.experiments as ex

    from curvlab.experiments import report, run, run_sweep  # noqa: F811  (a module named report would shadow)
    assert callable(report) and callable(run) and callable(run_sweep) and callable(ex.report)
    assert set(ex.__all__) >= {"run", "run_sweep", "report", "load_config", "resolve_config", "run_id"}


@pytest.mark.parametrize("text, value", [("0.1", 0.1), ("3", 3), ("true", True), ("[1, 2.5]", [1, 2.5]),
                                         ("kfac", "kfac"), ('"3"', "3"), ("null", None), ("none", "none"),
                                         ("1e-3", 1e-3),
                                         ("../shared/data/mnist", "../shared/data/mnist")])
def test_parse_value(text: str, value) -> None:
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_overrides_and_dotted_flags() -> None:
    argv = ["c.toml", "--optimizer.lr", "0.3", "--out", "x.y", "--train.epochs=4", "--model.activation", "relu",
            "--data.normalize", "none", "--train.seed", "-1"]
    rest, overrides = cli.parse_overrides(argv, ["optimizer.damping=0.01", "name=x"])
    assert rest == ["c.toml", "--out", "x.y"]
    cfg = apply_overrides({"optimizer": {"lr": 1.0}}, overrides)
    assert cfg == {"optimizer": {"lr": 0.3, "damping": 0.01}, "train": {"epochs": 4, "seed": -1},
                   "model": {"activation": "relu"}, "data": {"normalize": "none"}, "name": "x"}
    with pytest.raises(ConfigError, match="needs a value"):
        cli.parse_overrides(["--optimizer.lr"])
    with pytest.raises(ConfigError, match="key=value"):
        cli.parse_overrides([], ["optimizer.lr"])
    with pytest.raises(ConfigError, match="is a value, not a table"):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])


def test_load_config_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.toml").write_text('[optimizer]\nlr = 0.2\n[train]\nepochs = 2\n')
    (tmp_path / "a.json").write_text('{"optimizer": {"lr": 0.2}, "train": {"epochs": 2}}')
    assert load_config(tmp_path / "a.toml") == load_config(tmp_path / "a.json")
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(ConfigError, match="bad.toml: cannot parse"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "a.yaml").write_text("optimizer:\n  lr: 0.2\ntrain:\n  epochs: 2\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML absent
    with pytest.raises(ConfigError, match="PyYAML"):
        load_config(tmp_path / "a.yaml")


def test_resolve_fills_suggested_and_defaults_and_is_idempotent() -> None:
    import curvlab

    r = resolve_config({"optimizer": {"estimator": "KFAC", "lr": 0.5}})
    suggested = curvlab.ESTIMATORS.get("kfac").suggested
    assert r["optimizer"]["estimator"] == "kfac" and r["optimizer"]["lr"] == 0.5  # given keys win
    assert all(r["optimizer"][k] == v for k, v in suggested.items() if k != "lr")
    assert r["model"] == {"name": "mlp", "width": 64, "depth": 2, "activation": "tanh", "bias": True}
    assert r["data"]["name"] == "digits" and r["train"]["epochs"] == 10
    assert resolve_config(r) == r and run_id(resolve_config(r)) == run_id(r)
    plain = resolve_config({"optimizer": {"estimator": "kfac", "suggested": False}})
    assert "damping" not in plain["optimizer"]


def test_run_id_ignores_labels_and_follows_results() -> None:
    base = resolve_config(TINY)
    assert run_id(base) == run_id(resolve_config({**TINY, "name": "other"}))
    assert run_id(base) == run_id(resolve_config(apply_overrides(TINY, ["train.checkpoint=false"])))
    assert run_id(base) == run_id(resolve_config(apply_overrides(TINY, ["optimizer.lr=0.1"])))  # = suggested
    assert run_id(base) != run_id(resolve_config(apply_overrides(TINY, ["optimizer.lr=0.2"])))
    assert run_id(base) != run_id(resolve_config(apply_overrides(TINY, ["train.seed=1"])))


@pytest.mark.parametrize("override, message", [
    (["train.epoch=3"], "unknown key train.epoch. Did you mean 'epochs'"),
    (["train.batch_size=0"], "train.batch_size must be an integer >= 1 or 'full'"),
    (["train.schedule=step"], "train.schedule must be one of"),
    (["optimizer.lr=-1"], "lr must be >= 0"),
    (["optimizer.dampin=0.1"], "unknown hyper-parameter 'dampin'.*Did you mean 'damping'"),
    (["optimizer.estimator=kfc"], "unknown estimator 'kfc'"),
    (["model.widht=3"], "model: unknown argument 'widht'.*Did you mean 'width'"),
    (["data.name=cifar"], "data.name: unknown dataset 'cifar'"),
    (["optimzer.lr=3"], "unknown top-level key 'optimzer'. Did you mean 'optimizer'"),
    (["model.input_shape=[1]"], "unknown argument 'input_shape'"),
])
def test_bad_configs_name_the_key(override: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(apply_overrides({}, override))


# -------------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    io.atomic_write_json(target, {"a": 1})

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt  # the process dies between writing the temporary file and the replace

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write_json(target, {"a": 2, "long": "x" * 10000})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left behind
    io.write_jsonl(tmp_path / "m.jsonl", [{"x": float("nan")}, {"x": 1.0}])
    assert io.read_jsonl(tmp_path / "m.jsonl") == [{"x": None}, {"x": 1.0}]  # strict JSON


# ------------------------------------------------------------------------------------------------------ runs


def test_run_directory_and_same_seed_same_metrics(tmp_path: Path) -> None:
    a = run(TINY, tmp_path, quiet=True)
    rdir = tmp_path / a.run_id
    assert sorted(p.name for p in rdir.iterdir()) == ["DONE", "config.json", "metrics.jsonl", "summary.json"]
    assert json.loads((rdir / "config.json").read_text()) == resolve_config(TINY)
    lines = (rdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3]
    row = json.loads(lines[-1])
    assert {"train_loss", "batch_loss", "test_loss", "test_accuracy", "lr", "step_time_ms", "refresh_time_s",
            "epoch_time_s", "steps"} <= set(row)
    assert row["refresh_time_s"] > 0 and row["steps"] == 3 * 11
    assert a.summary["final_test_accuracy"] > 0.8 and a.summary["epochs_to_target"] is not None
    b = run(TINY, None, quiet=True)  # same seed, another run, nothing written
    assert deterministic(a.metrics) == deterministic(b.metrics)
    c = run(apply_overrides(TINY, ["train.seed=1"]), None, quiet=True)
    assert deterministic(a.metrics) != deterministic(c.metrics)
    again = run(TINY, tmp_path, quiet=True)
    assert again.skipped and deterministic(again.metrics) == deterministic(a.metrics)


def test_killed_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    reference = run(TINY, None, quiet=True)

    def die_after_epoch_2(epoch: int, _row: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(TINY, tmp_path, quiet=True, callbacks=[die_after_epoch_2])
    rdir = tmp_path / reference.run_id
    assert not (rdir / "DONE").exists() and (rdir / "checkpoint.pt").is_file()
    assert len((rdir / "metrics.jsonl").read_text().splitlines()) == 3  # epochs 0..2, complete lines
    (rdir / ".metrics.jsonl.x1y2.tmp").write_text('{"epoch": 3, "trunc')  # a write killed before its replace
    seen = []
    resumed = run(TINY, tmp_path, quiet=True, callbacks=[lambda e, _: seen.append(e)])
    assert seen == [3]  # only the missing epoch was trained
    assert deterministic(resumed.metrics) == deterministic(reference.metrics)
    assert sorted(p.name for p in rdir.iterdir()) == ["DONE", "config.json", "metrics.jsonl", "summary.json"]


@pytest.mark.parametrize("cfg", [
    {"data": {"name": "regression", "num_train": 64, "num_test": 32}, "optimizer": {"estimator": "kfac"}},
    {"data": {"name": "digits", "normalize": "none"}, "model": {"name": "autoencoder", "width": 16, "code": 4},
     "train": {"task": "autoencoder"}, "optimizer": {"estimator": "kfac", "lr": 0.05}},
    {"model": {"name": "resnet", "width": 4}, "train": {"batch_size": "full"}},
    {"model": {"name": "cnn", "width": 4}, "train": {"schedule": "cosine", "warmup_epochs": 0.5}},
])
def test_runs_for_other_tasks_models_and_schedules(cfg: dict) -> None:
    cfg = apply_overrides(cfg, ["train.epochs=2"])
    result = run(cfg, None, quiet=True)
    s = result.summary
    assert not s["diverged"] and s["skipped_steps"] == 0
    if s["task"] == "classification":
        assert s["final_test_accuracy"] is not None
    else:
        assert s["loss"] == "mse" and s["final_test_accuracy"] is None
        assert result.metrics[-1]["test_loss"] < result.metrics[0]["test_loss"]
    if cfg["train"].get("schedule") == "cosine":
        assert result.metrics[-1]["lr"] < 0.01 * result.metrics[0]["lr"]


# ---------------------------------------------------------------------------------------- report and CLI


def test_report_on_a_small_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from curvlab.experiments.sweep import run_sweep

    cfg = {**TINY, "train": {**TINY["train"], "epochs": 1},
           "sweep": {"grid": {"train.seed": [0, 1], "optimizer.lr": [0.05, 0.1]},
                     "variants": [{"name": "kfac"}, {"name": "sgd", "optimizer.estimator": "identity"}]}}
    result = run_sweep(cfg, tmp_path, workers=1, quiet=True)
    assert len(result.run_ids) == 8 and not result.failed
    assert cli.report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("kfac lr=0.05", "kfac lr=0.1", "sgd lr=0.05", "sgd lr=0.1", "final acc", "ep->target", "x sgd"):
        assert label in out
    rep = tmp_path / "report"
    for name in ("report.csv", "runs.csv", "report.txt", "curves.png", "best_variant.png", "best_optimizer_lr.png"):
        assert (rep / name).stat().st_size > 0, name
    assert (rep / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((rep / "runs.csv").read_text().splitlines()) == 1 + 8
    assert len((rep / "report.csv").read_text().splitlines()) == 1 + 4
    assert cli.report_main([str(tmp_path / "runs" / result.run_ids[0] / "..")]) == 0
    assert cli.report_main([str(tmp_path / "nothing")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_cli_run_print_config_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[model]\nwidth = 16\ndepth = 1\n[train]\nepochs = 1\nbatch_size = 128\n')
    assert cli.run_main([str(config), "--optimizer.lr", "0.2", "--set", "train.seed=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[:out.rindex("}") + 1])
    assert printed["optimizer"]["lr"] == 0.2 and printed["train"]["seed"] == 3 and "run id:" in out
    assert cli.run_main([str(config), "--quiet", "--out", str(tmp_path / "runs")]) == 0
    assert "finished: final test accuracy" in capsys.readouterr().out
    assert cli.run_main([str(config), "--quiet", "--out", str(tmp_path / "runs")]) == 0
    assert "already finished" in capsys.readouterr().out
    assert cli.run_main([str(config), "--train.epochz", "2"]) == 2
    assert "Did you mean 'epochs'" in capsys.readouterr().err
    config.write_text("[sweep.grid]\n'train.seed' = [0, 1]\n")
    assert cli.run_main([str(config)]) == 2
    assert "curvlab sweep" in capsys.readouterr().err
    assert cli.sweep_main([str(config), "--list", "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.count("todo") == 2


def test_run_with_lm_damping_passes_a_closure_and_records_the_damping(tmp_path: Path) -> None:
    config = tmp_path / "lm.toml"
    config.write_text('[model]\nwidth = 16\ndepth = 1\n[train]\nepochs = 2\nbatch_size = 128\n'
                      '[optimizer]\nestimator = "kfac"\ndamping = 1.0\ndamping_adapt = "lm"\ndamping_interval = 2\n')
    assert cli.run_main([str(config), "--quiet", "--out", str(tmp_path / "runs")]) == 0
    (rdir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (rdir / "metrics.jsonl").read_text().splitlines()]
    assert "damping" not in rows[0] and not json.loads((rdir / "summary.json").read_text())["diverged"]
    history = [h for r in rows[1:] for h in r["damping_history"]]
    assert [h["step"] for h in history] == list(range(0, 2 * 11, 2))        # every adaptation step, none twice
    assert all(h["rho"] is not None for h in history)                         # h(theta + delta) was evaluated
    assert [r["damping"] for r in rows[1:]] == [rows[1]["damping_history"][-1]["damping"], history[-1]["damping"]]
    assert history[-1]["damping"] != 1.0                                       # the damping moved
    # the same run resumed from its checkpoint after epoch 1 records the same history
    cfg = load_config(str(config))

    def die(epoch: int, _row: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "again", quiet=True, callbacks=[die])
    resumed = run(cfg, tmp_path / "again", quiet=True)
    assert deterministic(resumed.metrics) == deterministic(rows)


def test_plain_run_gets_no_closure_and_no_damping_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    import curvlab

    closures = []
    step = curvlab.optim.CurvlabOptimizer.step
    monkeypatch.setattr(curvlab.optim.CurvlabOptimizer, "step",
                        lambda self, closure=None: closures.append(closure) or step(self, closure))
    result = run({**TINY, "train": {**TINY["train"], "epochs": 1}}, None, quiet=True)
    assert closures and all(c is None for c in closures)
    assert not {"damping", "damping_history", "gamma"} & set(result.metrics[-1])


def test_run_with_gamma_adapt_records_gamma_without_a_closure() -> None:
    cfg = apply_overrides({**TINY, "train": {**TINY["train"], "epochs": 1}},
                          ["optimizer.gamma_adapt=true", "optimizer.gamma_interval=5"])
    row = run(cfg, None, quiet=True).metrics[-1]
    assert [h["step"] for h in row["gamma_history"]] == [0, 5, 10] and row["gamma"] == row["gamma_history"][-1]["gamma"]
    assert row["damping_history"] == [] and row["damping"] == resolve_config(cfg)["optimizer"]["damping"]


def test_run_with_held_out_gamma_passes_a_closure_and_resolves_each_choice() -> None:
    cfg = apply_overrides({**TINY, "train": {**TINY["train"], "epochs": 1}},
                          ["optimizer.gamma_adapt=true", "optimizer.gamma_interval=5", 'optimizer.gamma_score="next"'])
    row = run(cfg, None, quiet=True).metrics[-1]
    # 11 steps: the choices of gamma steps 0 and 5 are measured on steps 1 and 6; step 10's waits for a next batch
    assert [(h["step"], h["measured_at"]) for h in row["gamma_history"]] == [(0, 1), (5, 6)]
    assert row["gamma"] == row["gamma_history"][-1]["gamma"]
