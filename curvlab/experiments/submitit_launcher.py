"""Cluster sweeps: every unfinished sweep point becomes one SLURM job, submitted through ``submitit``.

``submitit`` is an optional dependency (``pip install submitit``; it pulls only ``cloudpickle``). Select
the launcher with ``curvlab sweep CONFIG --launcher submitit --partition gpu --timeout-min 120`` or in the
config::

    [sweep.launcher]
    name = "submitit"          # "local" (default: processes on this machine, sweep.workers), "submitit"
    executor = "slurm"         # "slurm"; "local" runs the jobs as local processes through submitit's
                               # LocalExecutor (for testing; ``--launcher local-submitit`` is a shorthand)
    partition = "gpu"
    timeout_min = 120
    gpus_per_node = 1
    tasks_per_node = 1         # > 1: the run is data parallel over the job's tasks (see .launch)
    [sweep.launcher.slurm_args]   # any further sbatch option, e.g. account, qos, constraint
    account = "my-account"

Resumability is the local sweep's: the run directories are the state. A finished run (``DONE``) is never
resubmitted; an unfinished one restarts from its last epoch checkpoint; a job that hits its time limit or
is preempted is requeued by submitit (:meth:`RunJob.checkpoint`) and resumes the same way. Every job id
is recorded in ``sweep.json`` (``jobs``: run id -> list of submissions), and a re-launched sweep submits
only the runs that are neither finished nor held by a job that is still pending or running (those it
waits for). ``wait = false`` (``--no-wait``) returns right after submitting; run the same command later to
collect the results (nothing finished is redone) and write the report.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError
from .io import atomic_write_json, read_json

__all__ = ["LAUNCHER_DEFAULTS", "resolve_launcher", "RunJob", "submit_sweep", "require_submitit", "make_executor"]

#: ``[sweep.launcher]`` keys and defaults (``None``: left to the cluster's default).
LAUNCHER_DEFAULTS: dict[str, Any] = {
    "name": "local", "executor": "slurm", "folder": None, "partition": None, "timeout_min": 60,
    "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "cpus_per_task": None, "mem_gb": None,
    "slurm_args": {}, "setup": [], "array_parallelism": 256, "wait": True, "poll_s": 1.0,
}
_NAMES = ("local", "submitit", "local-submitit")
_EXECUTORS = ("slurm", "local")
_ACTIVE_SLURM = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED"}


def require_submitit() -> Any:
    """Import ``submitit`` or raise an ImportError saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise ImportError("the submitit launcher needs the optional package submitit: `pip install submitit` "
                          "(it pulls only cloudpickle), or run the sweep with --launcher local") from None
    return submitit


def resolve_launcher(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``sweep.launcher`` (a name or a table) completed with :data:`LAUNCHER_DEFAULTS` and validated;
    ``"local-submitit"`` becomes ``name="submitit", executor="local"``.

    Raises:
        ConfigError: an unknown key or name, or a value of the wrong type (naming ``sweep.launcher.KEY``).
    """
    given = {"name": value} if isinstance(value, str) else dict(value or {})
    if not isinstance(value, (str, Mapping, type(None))):
        raise ConfigError(f"sweep.launcher must be a name ({', '.join(_NAMES)}) or a table, got {value!r}")
    for key in given:
        if key not in LAUNCHER_DEFAULTS:
            raise ConfigError(f"unknown key sweep.launcher.{key}; accepted: {', '.join(LAUNCHER_DEFAULTS)}")
    out = {**LAUNCHER_DEFAULTS, **given}
    if out["name"] not in _NAMES:
        raise ConfigError(f"sweep.launcher.name must be one of {', '.join(_NAMES)}, got {out['name']!r}")
    if out["name"] == "local-submitit":
        out.update(name="submitit", executor="local")
    if out["executor"] not in _EXECUTORS:
        raise ConfigError(f"sweep.launcher.executor must be one of {', '.join(_EXECUTORS)}, got {out['executor']!r}")

    def check(key: str, ok: Callable[[Any], bool], what: str) -> None:
        if out[key] is not None and not ok(out[key]):
            raise ConfigError(f"sweep.launcher.{key} must be {what}, got {out[key]!r}")

    def pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    for key in ("nodes", "tasks_per_node", "cpus_per_task", "array_parallelism"):
        check(key, pos_int, "an integer >= 1")
    check("gpus_per_node", lambda v: pos_int(v) or v == 0, "an integer >= 0")
    for key in ("timeout_min", "mem_gb", "poll_s"):
        check(key, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0")
    check("slurm_args", lambda v: isinstance(v, Mapping), "a table of sbatch options")
    check("setup", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of shell lines")
    check("wait", lambda v: isinstance(v, bool), "true or false")
    for key in ("partition", "folder"):
        check(key, lambda v: isinstance(v, str), "a string")
    if out["executor"] == "local" and out["nodes"] > 1:
        raise ConfigError("sweep.launcher.nodes > 1 needs SLURM; the local executor runs on one node")
    return out


class RunJob:
    """What one job executes: :func:`~curvlab.experiments.runner.run` of one sweep point.

    With several tasks (``tasks_per_node * nodes > 1``) it exports the ``env://`` variables of the job's
    tasks (``submitit.helpers.TorchDistributedEnvironment``) so the run is data parallel over them. On a
    time limit or preemption submitit calls :meth:`checkpoint` and requeues the job; the run then resumes
    from its last epoch checkpoint (``checkpoint.pt``)."""

    def __init__(self, config: dict[str, Any], runs_dir: str) -> None:
        self.config, self.runs_dir = config, runs_dir

    def __call__(self) -> str:
        submitit = require_submitit()
        from .runner import run

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return run(self.config, self.runs_dir, quiet=True).run_id

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue the same run (the run directory holds the state to resume from)."""
        return require_submitit().helpers.DelayedSubmission(RunJob(self.config, self.runs_dir))


def _executor(opts: dict[str, Any], folder: Path) -> Any:
    submitit = require_submitit()
    if opts["executor"] == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("sweep.launcher.executor='slurm' but sbatch is not on PATH (no SLURM here); run on the "
                          "cluster's login node, or test with --launcher local-submitit")
    ex = submitit.AutoExecutor(folder=folder, cluster=opts["executor"])
    params: dict[str, Any] = {"name": "curvlab", "timeout_min": opts["timeout_min"], "nodes": opts["nodes"],
                              "tasks_per_node": opts["tasks_per_node"], "gpus_per_node": opts["gpus_per_node"]}
    for key in ("cpus_per_task", "mem_gb"):
        if opts[key] is not None:
            params[key] = opts[key]
    if opts["executor"] == "slurm":
        params["slurm_array_parallelism"] = opts["array_parallelism"]
        if opts["partition"]:
            params["slurm_partition"] = opts["partition"]
        if opts["slurm_args"]:
            params["slurm_additional_parameters"] = dict(opts["slurm_args"])
        if opts["setup"]:
            params["slurm_setup"] = list(opts["setup"])
    elif opts["setup"]:
        params["local_setup"] = list(opts["setup"])
    ex.update_parameters(**params)
    return ex


#: A configured submitit executor for ``opts`` (a resolved launcher table) logging into ``folder``; used by
#: ``curvlab tune --launcher submitit`` to submit its workers.
make_executor = _executor


def _still_active(entry: Mapping[str, Any], folder: Path) -> bool:
    """Whether a recorded submission may still be working on its run (pending, running or requeued)."""
    job_id = str(entry.get("job_id", ""))
    try:
        if entry.get("executor") == "local":  # the job id is the pid of submitit's local controller
            os.kill(int(job_id), 0)
            cmdline = Path(f"/proc/{job_id}/cmdline")
            return not cmdline.exists() or b"submitit" in cmdline.read_bytes()
        if shutil.which("sacct") is None:
            return False
        import submitit

        return submitit.SlurmJob(folder=folder, job_id=job_id).state.upper() in _ACTIVE_SLURM
    except (OSError, ValueError):
        return False


def submit_sweep(points: Sequence[Any], out: Path, opts: dict[str, Any], *, quiet: bool = False,
                 record: Callable[[Any, BaseException | str | None], None] | None = None) -> dict[str, Any]:
    """Submit every point of ``points`` (the unfinished ones) that no live job holds, one job each (a
    SLURM job array), record the job ids in ``out/sweep.json``, and unless ``opts["wait"]`` is false wait
    for them all, calling ``record(point, None | error)`` as each ends.

    Returns:
        ``{"submitted": {run_id: job_id}, "attached": [run ids held by earlier live jobs], "pending": [run
        ids not finished on return]}``.
    """
    from tqdm.auto import tqdm
    from .runner import is_finished
    from .sweep import MANIFEST

    runs_dir = out / "runs"
    folder = Path(opts["folder"]) if opts["folder"] else out / "submitit"
    manifest = read_json(out / MANIFEST)
    history: dict[str, list[dict[str, Any]]] = manifest.setdefault("jobs", {})
    attached = [p for p in points if history.get(p.run_id) and _still_active(history[p.run_id][-1], folder)]
    fresh = [p for p in points if p not in attached]
    jobs: dict[str, Any] = {}
    if fresh:
        ex = _executor(opts, folder)
        with ex.batch():
            pending_jobs = [(p, ex.submit(RunJob(p.config, str(runs_dir)))) for p in fresh]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        for p, job in pending_jobs:
            jobs[p.run_id] = job
            history.setdefault(p.run_id, []).append({"job_id": str(job.job_id), "executor": opts["executor"],
                                                     "submitted": stamp, "folder": str(folder)})
        atomic_write_json(out / MANIFEST, manifest)
    if not quiet:
        held = f", {len(attached)} run(s) still held by earlier live jobs" if attached else ""
        print(f"submitit ({opts['executor']}): submitted {len(fresh)} job(s) (logs in {folder}){held}")
    result = {"submitted": {rid: str(job.job_id) for rid, job in jobs.items()},
              "attached": [p.run_id for p in attached], "pending": [p.run_id for p in points]}
    if not opts["wait"]:
        return result
    waiting = list(points)
    bar = tqdm(total=len(points), desc="jobs", unit="run", disable=quiet)
    try:
        while waiting:
            for p in list(waiting):
                job = jobs.get(p.run_id)
                done = job.done() if job is not None else not _still_active(history[p.run_id][-1], folder)
                if not done:
                    continue
                waiting.remove(p)
                bar.update(1)
                if record is None:
                    continue
                error = job.exception() if job is not None else None
                if error is None and not is_finished(runs_dir / p.run_id):
                    where = f"{job.paths.stderr}" if job is not None else f"{folder}"
                    error = f"job {history[p.run_id][-1]['job_id']} ended without finishing the run; see {where}"
                record(p, error)
            if waiting:
                time.sleep(opts["poll_s"])
    finally:
        bar.close()
    result["pending"] = [p.run_id for p in points if not is_finished(runs_dir / p.run_id)]
    return result

