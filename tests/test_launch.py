"""Launching: ``curvlab run`` under torchrun (2 CPU processes, gloo) matches a 1-process run, resumes from a
checkpoint and writes one run directory; a sweep through submitit's local executor completes and a
re-launch resubmits only the run that is missing."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the runs train on scikit-learn's digits")
from curvlab.experiments import cli  # noqa: E402
from curvlab.experiments.config import ConfigError  # noqa: E402
from curvlab.experiments.io import read_json, read_jsonl  # noqa: E402
from curvlab.experiments.launch import check_batch_size, shard  # noqa: E402
from curvlab.experiments.runner import TIMING_KEYS, run  # noqa: E402
from curvlab.experiments.submitit_launcher import require_submitit, resolve_launcher  # noqa: E402
from curvlab.experiments.sweep import MANIFEST, run_sweep  # noqa: E402

# float64, so the 2-process run equals the 1-process one up to reduction order (~1e-15). Digits has 1347
# training examples: the last batch of each epoch (67) splits unevenly (34 + 33) over two ranks.
TINY = {"model": {"width": 16, "depth": 1},
        "optimizer": {"estimator": "identity", "lr": 0.1, "momentum": 0.9},
        "train": {"epochs": 3, "batch_size": 128, "dtype": "float64"}}


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "curvlab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)


def assert_metrics_close(got: list[dict], want: list[dict], rtol: float = 1e-9) -> None:
    """Every non-timing metric of every epoch equal up to ``rtol`` (offending entries listed)."""
    assert len(got) == len(want), f"{len(got)} epochs written, expected {len(want)}"
    bad = []
    for g, w in zip(got, want):
        for key in w:
            if key in TIMING_KEYS:
                continue
            a, b = g[key], w[key]
            if isinstance(b, float) and isinstance(a, float):
                if abs(a - b) > rtol * max(1.0, abs(b)):
                    bad.append((w["epoch"], key, a, b))
            elif a != b:
                bad.append((w["epoch"], key, a, b))
    assert not bad, "metrics differ (epoch, key, 2 processes, 1 process):\n" + "\n".join(map(str, bad))


def test_shard_and_batch_checks() -> None:
    for n in range(1, 20):
        for world in (1, 2, 3, 4):
            parts = [shard(n, r, world) for r in range(world)]
            assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
    check_batch_size(128, 1347, 2)
    check_batch_size(130, 1347, 1)
    with pytest.raises(ConfigError, match=r"train.batch_size=130 .*divisible by the world size 4"):
        check_batch_size(130, 1347, 4)
    with pytest.raises(ConfigError, match="last batch of each epoch has 1 example"):
        check_batch_size(128, 1281, 2)


def test_torchrun_two_processes_resume_and_match_one_process(tmp_path: Path) -> None:
    """A 1-process run killed after epoch 1 is finished by `torchrun --nproc_per_node 2 -m curvlab run`:
    epochs 2-3 train data parallel (DDP, half the global batch per rank) and evaluate sharded; the result
    equals an uninterrupted 1-process run, and only rank 0 wrote (one directory, the usual files)."""
    reference = run(TINY, tmp_path / "one", quiet=True)

    def die_after_epoch_1(epoch: int, _row: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(TINY, tmp_path / "two", quiet=True, callbacks=[die_after_epoch_1])
    rdir = tmp_path / "two" / reference.run_id
    assert (rdir / "checkpoint.pt").is_file()
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    proc = torchrun(["run", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "two"), "--quiet"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    finished = [line for line in proc.stdout.splitlines() if line.startswith("run ")]
    assert len(finished) == 1 and reference.run_id in finished[0], proc.stdout  # rank 0 reports, once
    assert [d.name for d in (tmp_path / "two").iterdir()] == [reference.run_id]
    assert sorted(f.name for f in rdir.iterdir()) == ["DONE", "config.json", "metrics.jsonl", "summary.json"]
    assert read_json(rdir / "summary.json")["world_size"] == 2
    assert_metrics_close(read_jsonl(rdir / "metrics.jsonl"), reference.metrics)


def test_torchrun_kfac_fresh_run_matches_one_process(tmp_path: Path) -> None:
    """K-FAC (empirical Fisher: no sampling, so the split batch gives the same statistics) trained from
    scratch by 2 ranks: the optimizer all-reduces the factors (curvlab.distributed, weighted by the local
    batch sizes, also for the uneven last batch), so the run equals the 1-process run."""
    pytest.importorskip("curvlab.distributed", reason="data-parallel optimizer not available")
    cfg = {**TINY, "optimizer": {"estimator": "kfac", "fisher": "empirical"},
           "train": {**TINY["train"], "epochs": 2}}
    reference = run(cfg, tmp_path / "one", quiet=True)
    (tmp_path / "kfac.json").write_text(json.dumps(cfg))
    proc = torchrun(["run", str(tmp_path / "kfac.json"), "--out", str(tmp_path / "two"), "--quiet"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rdir = tmp_path / "two" / reference.run_id
    assert sorted(f.name for f in rdir.iterdir()) == ["DONE", "config.json", "metrics.jsonl", "summary.json"]
    assert_metrics_close(read_jsonl(rdir / "metrics.jsonl"), reference.metrics)


def test_submitit_local_sweep_completes_and_resumes_only_the_missing_run(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = {**TINY, "train": {**TINY["train"], "epochs": 2},
           "sweep": {"grid": {"optimizer.lr": [0.05, 0.1]}, "launcher": {"name": "local-submitit", "poll_s": 0.2}}}
    out = tmp_path / "sweep"
    first = run_sweep(cfg, out, quiet=True)
    assert first.failed == {} and sorted(first.ran) == sorted(first.run_ids) and first.pending == []
    assert sorted(first.submitted) == sorted(first.run_ids)
    keep, redo = first.run_ids
    jobs = read_json(out / MANIFEST)["jobs"]
    assert {rid: [j["job_id"] for j in jobs[rid]] for rid in jobs} == {r: [first.submitted[r]] for r in first.run_ids}
    kept = {f.name: f.read_bytes() for f in (out / "runs" / keep).iterdir()}
    before = read_jsonl(out / "runs" / redo / "metrics.jsonl")
    (out / "runs" / redo / "DONE").unlink()

    second = run_sweep(cfg, out, quiet=True)
    assert second.failed == {} and second.ran == [redo] and list(second.submitted) == [redo]
    assert {f.name: f.read_bytes() for f in (out / "runs" / keep).iterdir()} == kept  # untouched
    assert (out / "runs" / redo / "DONE").is_file()
    assert_metrics_close(read_jsonl(out / "runs" / redo / "metrics.jsonl"), before, rtol=0.0)
    jobs = read_json(out / MANIFEST)["jobs"]
    assert len(jobs[keep]) == 1 and [j["job_id"] for j in jobs[redo]] == [first.submitted[redo],
                                                                          second.submitted[redo]]
    third = run_sweep(cfg, out, quiet=True)
    assert third.submitted == {} and third.ran == []


def test_launcher_options_and_errors(monkeypatch) -> None:
    assert resolve_launcher(None)["name"] == "local"
    opts = resolve_launcher("local-submitit")
    assert (opts["name"], opts["executor"]) == ("submitit", "local")
    with pytest.raises(ConfigError, match="unknown key sweep.launcher.partion"):
        resolve_launcher({"name": "submitit", "partion": "gpu"})
    with pytest.raises(ConfigError, match="sweep.launcher.timeout_min must be a number > 0"):
        resolve_launcher({"name": "submitit", "timeout_min": 0})
    with pytest.raises(ConfigError, match="sweep.launcher.name must be one of"):
        resolve_launcher("slurm")
    args = argparse.Namespace(launcher="submitit", partition="gpu", timeout_min=30.0, nodes=None, tasks_per_node=2,
                              gpus_per_node=2, cpus_per_task=None, mem_gb=None, no_wait=True,
                              slurm_arg=["account=abc", "exclusive=true"])
    cfg = {"sweep": {"launcher": {"name": "local", "slurm_args": {"qos": "high"}}}}
    assert cli._launcher(cfg, args) == {"name": "submitit", "partition": "gpu", "timeout_min": 30.0,
                                        "tasks_per_node": 2, "gpus_per_node": 2, "wait": False,
                                        "slurm_args": {"qos": "high", "account": "abc", "exclusive": True}}
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install submitit"):
        require_submitit()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="does not run under torchrun"):
        run_sweep({"sweep": {"grid": {"optimizer.lr": [0.1]}}}, "unused", quiet=True)
