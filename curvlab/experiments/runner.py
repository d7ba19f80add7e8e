"""One run: train a resolved configuration and write its run directory.

A run directory ``<out>/<run_id>/`` holds, each file written atomically (:mod:`.io`):

* ``config.json``    the resolved configuration (``curvlab run <dir>/config.json`` repeats the run);
* ``metrics.jsonl``  one JSON line per epoch (epoch 0 = before training): ``train_loss`` and
  ``train_accuracy`` (evaluated on the first ``train.eval_train_examples`` training examples after the
  epoch), ``batch_loss`` (mean minibatch loss during the epoch), ``test_loss``, ``test_accuracy`` (the
  accuracies are null for regression; per position for targets ``(N, T)``), ``lr`` (at
  the epoch's last step), ``steps`` and ``skipped_steps`` (cumulative), and the timings
  :data:`TIMING_KEYS`: ``step_time_ms`` (mean zero_grad + forward + backward + step), ``refresh_time_s``
  (time inside ``opt.refresh``, i.e. recomputing inverses / roots, summed over the epoch),
  ``epoch_time_s`` and ``time_s`` (cumulative training time); with ``train.damping_every = k > 0`` also
  ``damping_report``: ``[{"step": s, "layers": {"layer/factor": {damping, eig_mean, eig_max, ratio_mean}}}, ...]``
  every ``k`` steps of the epoch (:func:`curvlab.diagnostics.damping_metrics`; not part of the run id); with an
  adaptive damping (``optimizer.damping_adapt = "lm"`` or ``optimizer.gamma_adapt``, :mod:`curvlab.damping`) also
  ``damping`` (at the epoch's end), ``damping_history`` (that epoch's LM adaptations: ``step``, ``rho``,
  ``damping``) and, with ``gamma_adapt``, ``gamma`` and ``gamma_history`` (``step``, ``gamma``). The loop hands
  ``opt.step`` a closure only when the optimizer re-evaluates the loss (``damping_adapt``): its first call returns
  the loss the loop already computed, later calls run a forward and backward on the same batch, so a plain run's
  cost is unchanged;
* ``summary.json``   final numbers (see :func:`.run_metrics.summarize`) and the optimizer's full hyper-parameters;
* ``checkpoint.pt``  model, optimizer (curvature and RNG included), batch-order generator and metrics
  after the last finished epoch, while the run is unfinished: a killed run resumes from it and continues
  bit for bit;
* ``DONE``           the finished marker, written last. A directory without it is unfinished.

Divergence: a run stops at once, mid-epoch, when a minibatch loss is NaN/Inf (single process) or the
optimizer raises :class:`curvlab.Diverged` (``optimizer.max_skipped_steps`` skipped steps in a row); it is
finished (``DONE``) with a last, partial-epoch row whose ``diverged`` key holds the message, and
``summary.json`` says ``diverged: true`` with the message in ``diverged_reason`` (a loss evaluated non-finite
at an epoch end also counts as diverged). A sweep records it and goes on with its next run.

Reproducibility: the same resolved configuration gives the same metrics bit for bit on CPU (every key
except :data:`TIMING_KEYS`): the data loaders use private generators, ``train.seed`` seeds the model
initialization (global torch RNG), the batch order (a private generator) and the optimizer's MC sampler,
and ``train.threads`` fixes the thread count (part of the run id, since reductions depend on it).

Data parallel: under ``torchrun`` (``WORLD_SIZE > 1``) the same call trains with
``DistributedDataParallel``, the global batch ``train.batch_size`` split across the ranks, and only rank 0
writing files; see :mod:`.launch`.
"""
from __future__ import annotations

import math
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, canonical_json, resolve_config, run_id
from .evaluation import StepClosure, evaluate, needs_closure, task_and_loss, training_loss
from .evaluation import training_loss as _loss  # noqa: F401  (the old private name, imported by tests)
from .io import atomic_torch_save, atomic_write_json, load_torch, read_json, read_jsonl, write_jsonl
from .launch import DistContext, check_batch_size, set_share, setup, shard, wrap_model
from .run_metrics import TIMING_KEYS, damping_row, history_marks, summarize
from .sequences import model_options_for

__all__ = ["RunResult", "run", "load_run", "is_finished", "load_split", "evaluate", "lr_factor", "TIMING_KEYS",
           "CONFIG", "METRICS", "SUMMARY", "DONE", "CHECKPOINT"]

CONFIG, METRICS, SUMMARY, DONE, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "DONE", "checkpoint.pt"

EpochCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class RunResult:
    """What :func:`run` returns (``skipped``: the run had finished before and was not repeated)."""

    run_id: str
    run_dir: Path | None
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    skipped: bool = False


def is_finished(run_dir: str | Path) -> bool:
    """True once the run's ``DONE`` marker exists."""
    return (Path(run_dir) / DONE).is_file()


def load_run(run_dir: str | Path) -> RunResult:
    """Read a finished run directory."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG)
    return RunResult(run_id(config), run_dir, config, read_jsonl(run_dir / METRICS), read_json(run_dir / SUMMARY),
                     skipped=True)


_SPLITS: OrderedDict[str, Any] = OrderedDict()


def load_split(data: Mapping[str, Any]):
    """The :class:`curvlab.data.Split` of a resolved ``[data]`` table (the last two are cached in-process,
    so runs of a sweep that share a data set load it once per worker)."""
    import curvlab

    from curvlab.validation import pop_val_keys, validation_split

    key = canonical_json(dict(data))
    if key not in _SPLITS:
        args = dict(data)
        val = pop_val_keys(args)  # data.val_fraction: a validation part carved from the training data
        split = curvlab.DATASETS.get(args.pop("name"))(**args)
        _SPLITS[key] = validation_split(split, **val) if val else split
        while len(_SPLITS) > 2:
            _SPLITS.popitem(last=False)
    _SPLITS.move_to_end(key)
    return _SPLITS[key]


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total``: linear warm-up over ``warmup`` steps
    times ``1`` (constant), ``(1 + cos(pi t / T)) / 2`` (cosine) or ``1 - t / T`` (linear)."""
    frac = step / max(total, 1)
    base = {"constant": 1.0, "cosine": 0.5 * (1.0 + math.cos(math.pi * frac)), "linear": 1.0 - frac}[schedule]
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


class _Timed:
    """Wraps a callable and sums the wall time spent in it (used on ``opt.refresh``)."""

    def __init__(self, fn: Callable[..., Any], sync: Callable[[], None]) -> None:
        self.fn, self.sync, self.total = fn, sync, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.sync()
            self.total += time.perf_counter() - start


def run(config: Mapping[str, Any], out: str | Path | None = "runs", *, run_dir: str | Path | None = None,
        quiet: bool = False, force: bool = False, callbacks: Sequence[EpochCallback] = ()) -> RunResult:
    """Train one configuration and write its run directory (see the module docstring).

    Args:
        config: a raw or resolved configuration (resolved here).
        out: parent folder; the run goes to ``out/<run_id>``. ``None`` (and no ``run_dir``) writes nothing.
        run_dir: an explicit run directory instead.
        quiet: no progress bar.
        force: train again even if the run has finished (its directory is cleared first).
        callbacks: ``callback(epoch, metrics_row)`` after each epoch has been written (and checkpointed).
            Called on rank 0 only under torchrun.

    Returns:
        The :class:`RunResult`; ``skipped=True`` when a finished run was found and not repeated.
    """
    resolved = resolve_config(config)
    rid = run_id(resolved)
    rdir = Path(run_dir) if run_dir is not None else (Path(out) / rid if out is not None else None)
    if rdir is not None and (rdir / CONFIG).is_file() and run_id(read_json(rdir / CONFIG)) != rid:
        raise ConfigError(f"{rdir} holds another run ({run_id(read_json(rdir / CONFIG))}); use a fresh directory")
    ctx = setup(resolved["train"]["device"])  # a process group under torchrun; else a no-op (see .launch)
    ok = False
    try:
        if rdir is not None and force and rdir.exists() and ctx.is_main:
            shutil.rmtree(rdir)
        ctx.barrier()
        if rdir is not None and is_finished(rdir):
            ok = True
            return load_run(rdir)
        if rdir is not None and ctx.is_main:
            for stale in rdir.glob(".*.tmp"):  # temporaries of a write that was killed before its os.replace
                stale.unlink(missing_ok=True)
            atomic_write_json(rdir / CONFIG, resolved)
        threads = resolved["train"]["threads"]
        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            result = _train(resolved, rid, rdir, quiet, callbacks, ctx)
        finally:
            torch.set_num_threads(previous_threads)
        ok = True
        return result
    finally:
        ctx.close(barrier=ok)  # no barrier after an error: the other ranks may be inside a collective


def _train(cfg: dict[str, Any], rid: str, rdir: Path | None, quiet: bool,
           callbacks: Sequence[EpochCallback], ctx: DistContext) -> RunResult:
    import curvlab
    from curvlab.data import batches
    from tqdm.auto import tqdm

    train = cfg["train"]
    dtype = getattr(torch, train["dtype"])
    device = ctx.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if not ctx.is_main:
        ctx.barrier()  # rank 0 loads (and possibly downloads) the data set first
    split = load_split(cfg["data"]).to(dtype, device)
    if ctx.is_main:
        ctx.barrier()
    task, loss_name = task_and_loss(split, train["task"])
    x_tr, x_te = split.x_train, split.x_test
    y_tr, y_te = (x_tr, x_te) if task == "autoencoder" else (split.y_train, split.y_test)
    num_outputs = split.num_features if task == "autoencoder" else split.num_outputs
    hyper = dict(cfg["optimizer"])
    names = {k: hyper.pop(k) for k in ("estimator", "rule", "scaling")}
    hyper.pop("suggested", None)
    if hyper.setdefault("loss", loss_name) != loss_name:
        raise ConfigError(f"optimizer.loss={hyper['loss']!r} but the {task} task trains on {loss_name!r}; "
                          "remove optimizer.loss")
    seed = train["seed"]
    torch.manual_seed(seed)
    margs = dict(cfg["model"])
    builder = curvlab.MODELS.get(margs.pop("name"))
    margs = model_options_for(split, builder, margs)
    net = builder(split.example_shape, num_outputs, **margs).to(device, dtype)
    model = wrap_model(net, ctx)  # DistributedDataParallel under torchrun; `net` is the bare module
    opt = curvlab.optimizer(model, **names, seed=seed, **hyper)
    timer = _Timed(opt.refresh, sync)
    opt.refresh = timer  # instance attribute: the step's self.refresh(...) goes through the timer
    base_lrs = [group["lr"] for group in opt.param_groups]
    generator = torch.Generator().manual_seed(seed)
    batch = split.num_train if train["batch_size"] == "full" else train["batch_size"]
    check_batch_size(batch, split.num_train, ctx.world_size)
    per_epoch = math.ceil(split.num_train / batch)
    total, warmup = train["epochs"] * per_epoch, round(train["warmup_epochs"] * per_epoch)
    n_eval = min(train["eval_train_examples"], split.num_train)

    def measure(epoch: int) -> dict[str, Any]:
        train_loss, train_acc = evaluate(net, x_tr[:n_eval], y_tr[:n_eval], task, train["eval_batch_size"], ctx) \
            if n_eval else (None, None)
        test_loss, test_acc = evaluate(net, x_te, y_te, task, train["eval_batch_size"], ctx)
        return {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss,
                "test_accuracy": test_acc}

    rows: list[dict[str, Any]] = []
    step, elapsed, first = 0, 0.0, 1
    ckpt = rdir / CHECKPOINT if rdir is not None else None
    if ckpt is not None and ckpt.is_file():
        state = load_torch(ckpt)  # our own file, written by this function; a damaged one is refused
        if state.get("run_id") == rid:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            rows, step, elapsed, first = state["metrics"], state["step"], state["elapsed"], state["epoch"] + 1
    if not rows:
        rows.append({**measure(0), "batch_loss": None, "lr": base_lrs[0], "steps": 0, "skipped_steps": 0,
                     **{k: None for k in TIMING_KEYS}})
    label = cfg["name"] or f"{names['estimator']}/{names['rule']}"
    bar = tqdm(total=total, initial=step, desc=label, unit="step", disable=quiet or not ctx.is_main, leave=False,
               dynamic_ncols=True)
    stopped: str | None = None                             # the divergence message that stopped the run
    try:
        for epoch in range(first, train["epochs"] + 1):
            model.train()
            timer.total, step_time, loss_sum, seen, epoch_first = 0.0, 0.0, 0.0, 0, step
            damping_log: list[dict[str, Any]] = []
            marks = history_marks(opt)
            epoch_start = time.perf_counter()
            for xb, yb in batches(x_tr, y_tr, batch, generator=generator):
                factor = lr_factor(step, total, warmup, train["schedule"])
                for group, base in zip(opt.param_groups, base_lrs):
                    group["lr"] = base * factor
                start = time.perf_counter()
                if ctx.distributed:  # this rank's share of the global batch; its gradient weight n_rank / n
                    part = shard(len(xb), ctx.rank, ctx.world_size)
                    set_share(model, part.stop - part.start, len(xb))
                    xb, yb = xb[part], yb[part]
                opt.zero_grad(set_to_none=True)
                loss = training_loss(task, model(xb), yb)
                loss.backward()
                value = float(loss.detach())
                stopped = _nonfinite_loss(value, step, epoch, ctx)
                if stopped is not None:
                    break
                try:
                    opt.step(StepClosure(opt, model, task, xb, yb, loss) if needs_closure(opt) else None)
                except curvlab.Diverged as err:          # max_skipped_steps non-finite steps in a row
                    stopped = str(err)
                sync()
                step_time += time.perf_counter() - start
                step += 1
                if train["damping_every"] and step % train["damping_every"] == 0 and stopped is None:
                    from curvlab.diagnostics import damping_metrics
                    damping_log.append({"step": step, "layers": damping_metrics(opt)})
                loss_sum, seen = loss_sum + value * len(xb), seen + len(xb)
                bar.update(1)
                bar.set_postfix_str(f"epoch {epoch}/{train['epochs']} loss {value:.4f}", refresh=False)
                if stopped is not None:
                    break
            epoch_time = time.perf_counter() - epoch_start
            elapsed += epoch_time
            loss_sum, seen = ctx.all_sum([loss_sum, seen])
            rows.append({**measure(epoch), "batch_loss": loss_sum / seen if seen else None,
                         "lr": opt.param_groups[0]["lr"], "steps": step, "skipped_steps": opt.skipped_steps,
                         "step_time_ms": 1e3 * step_time / max(step - epoch_first, 1), "refresh_time_s": timer.total,
                         "epoch_time_s": epoch_time, "time_s": elapsed, **damping_row(opt, marks),
                         **({"diverged": stopped} if stopped is not None else {}),
                         **({"damping_report": damping_log} if train["damping_every"] else {})})
            if rdir is not None and ctx.is_main:
                write_jsonl(rdir / METRICS, rows)
                if train["checkpoint"] and epoch < train["epochs"] and stopped is None:
                    atomic_torch_save(ckpt, {"run_id": rid, "epoch": epoch, "step": step, "elapsed": elapsed,
                                             "world_size": ctx.world_size,
                                             "metrics": rows, "model": net.state_dict(),
                                             "optimizer": opt.state_dict(), "generator": generator.get_state(),
                                             "torch_rng": torch.get_rng_state()})
            for callback in callbacks if ctx.is_main else ():
                callback(epoch, rows[-1])
            if stopped is not None:
                break
    finally:
        bar.close()
    summary = {**summarize(rows, cfg, rid, task, loss_name, split, opt), "world_size": ctx.world_size}
    if rdir is not None and ctx.is_main:
        write_jsonl(rdir / METRICS, rows)
        atomic_write_json(rdir / SUMMARY, summary)
        atomic_write_json(rdir / DONE, {"run_id": rid, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)
    return RunResult(rid, rdir, cfg, rows, summary)


def _nonfinite_loss(value: float, step: int, epoch: int, ctx: DistContext) -> str | None:
    """The divergence message of a NaN/Inf minibatch loss, else None. Under torchrun each rank sees only its own
    share's loss, so there the stop comes from the optimizer (gradients are all-reduced, so every rank skips the
    same steps and raises :class:`curvlab.Diverged` together)."""
    if math.isfinite(value) or ctx.distributed:
        return None
    return (f"training diverged: the minibatch loss is {value} at step {step + 1} (epoch {epoch}); the run stopped "
            "before that step's update. Lower optimizer.lr, raise optimizer.damping, or set optimizer.kl_clip")
