"""Sweeps: grid expansion, and a sweep killed in the middle that is started again ends with every run
present exactly once, the runs that had finished untouched, and the same results as an uninterrupted
sweep."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the runs train on scikit-learn's digits")
from curvlab.experiments.config import ConfigError, load_config  # noqa: E402
from curvlab.experiments.io import read_jsonl  # noqa: E402
from curvlab.experiments.runner import TIMING_KEYS  # noqa: E402
from curvlab.experiments.sweep import expand_sweep, run_sweep  # noqa: E402

SWEEP = {
    "model": {"width": 16, "depth": 1},
    "train": {"epochs": 3, "batch_size": 128},
    "sweep": {"grid": {"optimizer.lr": [0.05, 0.1], "train.seed": [0, 1]},
              "variants": [{"name": "kfac", "optimizer": {"estimator": "kfac"}}]},
}


def snapshot(out: Path) -> dict[str, dict[str, bytes]]:
    """Every file of every run directory, by run id."""
    return {d.name: {f.name: f.read_bytes() for f in d.iterdir()} for d in sorted((out / "runs").iterdir())}


def results(out: Path) -> dict[str, list[dict]]:
    """Deterministic metrics of every run, by run id."""
    return {d.name: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(d / "metrics.jsonl")]
            for d in sorted((out / "runs").iterdir())}


def test_expand_sweep_names_dedupes_and_validates() -> None:
    points = expand_sweep({**SWEEP, "sweep": {**SWEEP["sweep"], "variants": [
        {"name": "kfac", "optimizer": {"estimator": "kfac"}},
        {"name": "same", "optimizer.estimator": "kfac"},  # resolves to the same runs: dropped
        {"name": "sgd", "optimizer.estimator": "identity"}]}})
    assert [p.config["name"] for p in points] == ["kfac lr=0.05"] * 2 + ["kfac lr=0.1"] * 2 + \
        ["sgd lr=0.05"] * 2 + ["sgd lr=0.1"] * 2
    assert [p.config["train"]["seed"] for p in points] == [0, 1] * 4
    assert len({p.run_id for p in points}) == 8
    assert points[0].axes == {"optimizer.lr": 0.05, "train.seed": 0}
    with pytest.raises(ConfigError, match="sweep.grid.optimizer.lr must be a non-empty list"):
        expand_sweep({"sweep": {"grid": {"optimizer": {"lr": 0.1}}}})
    with pytest.raises(ConfigError, match="unknown key sweep.axes"):
        expand_sweep({"sweep": {"axes": {}}})
    with pytest.raises(ConfigError, match="sweep point bad.*unknown estimator"):
        expand_sweep({"sweep": {"variants": [{"name": "bad", "optimizer.estimator": "nope"}]}})


def test_interrupted_sweep_resumes_without_redoing_or_losing_work(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    run_sweep(SWEEP, clean, workers=1, quiet=True)
    epochs_seen = []

    def die_in_the_second_run(epoch: int, _row: dict) -> None:
        epochs_seen.append(epoch)
        if len(epochs_seen) == 5:  # run 2, after its epoch 2 (of 3): checkpointed, not finished
            raise KeyboardInterrupt

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SWEEP, out, workers=1, quiet=True, callbacks=[die_in_the_second_run])
    before = snapshot(out)
    finished = [rid for rid, files in before.items() if "DONE" in files]
    assert len(before) == 2 and len(finished) == 1
    time.sleep(0.01)
    epochs_seen.clear()
    result = run_sweep(SWEEP, out, workers=1, quiet=True, callbacks=[lambda e, r: epochs_seen.append(e)])
    assert epochs_seen == [3, 1, 2, 3, 1, 2, 3]  # the rest of run 2, then runs 3 and 4; run 1 not redone
    after = snapshot(out)
    assert sorted(after) == sorted(result.run_ids) and len(after) == 4
    assert all(set(files) == {"DONE", "config.json", "metrics.jsonl", "summary.json"} for files in after.values())
    for rid in finished:
        assert after[rid] == before[rid]  # finished work untouched, byte for byte
    assert results(out) == results(clean)  # and every run equals the uninterrupted sweep's


def test_failing_run_is_recorded_and_retried(tmp_path: Path) -> None:
    def fail_once(epoch: int, _row: dict) -> None:
        if epoch == 1 and not failed:
            failed.append(1)
            raise RuntimeError("injected failure")

    failed: list[int] = []
    result = run_sweep(SWEEP, tmp_path, workers=1, quiet=True, callbacks=[fail_once])
    assert len(result.failed) == 1 and "injected failure" in next(iter(result.failed.values()))
    bad = next(iter(result.failed))
    assert (tmp_path / "runs" / bad / "error.txt").is_file() and len(result.ran) == 3
    again = run_sweep(SWEEP, tmp_path, workers=1, quiet=True)
    assert again.ran == [bad] and not again.failed
    assert not (tmp_path / "runs" / bad / "error.txt").exists()


def test_sweep_killed_with_sigkill_in_parallel_workers(tmp_path: Path) -> None:
    """The real thing: a `curvlab sweep` process group (main + spawned workers) is SIGKILLed as soon as a
    run has finished; then the sweep is started again."""
    config = tmp_path / "sweep.toml"
    config.write_text("""
[model]
width = 16
depth = 1
[train]
epochs = 3
batch_size = 128
[sweep]
workers = 2
[sweep.grid]
"optimizer.estimator" = ["kfac", "identity"]
"train.seed" = [0, 1]
""")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "curvlab.experiments.cli", "sweep", str(config), "--out", str(out), "--quiet",
           "--no-report"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while not list(out.glob("runs/*/DONE")):
            if proc.poll() is not None:
                pytest.fail(f"the sweep exited before it could be killed:\n{proc.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("no run finished within 240 s")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group this test started: main and workers
        proc.wait()
    before = snapshot(out)
    finished = {rid for rid, files in before.items() if "DONE" in files}
    assert 1 <= len(finished) < 4
    again = run_sweep(load_config(config), out, workers=1, quiet=True)  # started again (in this process)
    assert not again.failed and set(again.ran) == set(again.run_ids) - finished
    after = snapshot(out)
    assert len(after) == 4
    assert all(set(files) == {"DONE", "config.json", "metrics.jsonl", "summary.json"} for files in after.values())
    for rid in finished:
        assert after[rid] == before[rid]
    manifest = json.loads((out / "sweep.json").read_text())
    assert sorted(r["run_id"] for r in manifest["runs"]) == sorted(after)
    clean = tmp_path / "clean"
    run_sweep(load_config(config), clean, workers=1, quiet=True)  # uninterrupted, in this process
    assert results(out) == results(clean)
