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
* ``summary.json``   final numbers (see :func:`summarize`) and the optimizer's full hyper-parameters;
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
import torch.nn.functional as F

from .config import ConfigError, canonical_json, resolve_config, run_id
from .io import atomic_torch_save, atomic_write_json, load_torch, read_json, read_jsonl, write_jsonl
from .launch import DistContext, check_batch_size, set_share, setup, shard, wrap_model
from .sequences import model_options_for

__all__ = ["RunResult", "run", "load_run", "is_finished", "load_split", "evaluate", "lr_factor", "TIMING_KEYS",
           "CONFIG", "METRICS", "SUMMARY", "DONE", "CHECKPOINT"]

CONFIG, METRICS, SUMMARY, DONE, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "DONE", "checkpoint.pt"
#: Metric keys that measure time (everything else is reproducible bit for bit).
TIMING_KEYS = ("step_time_ms", "refresh_time_s", "epoch_time_s", "time_s")

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


def _loss(task: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training loss (curvlab's ``loss`` option): cross-entropy on logits, or ``MSELoss`` (mean over
    examples AND output entries); ``reduction="sum"`` sums over examples only (for exact evaluation).

    Sequence outputs: logits ``(N, T, C)`` with labels ``(N, T)`` (a language model) take the cross-entropy
    over the last dimension and the mean (or sum) over all ``N * T`` positions."""
    if task == "classification":
        if out.dim() > 2 or y.dim() > 1:
            if out.shape[:-1] != y.shape:
                raise ValueError(f"logits of shape {tuple(out.shape)} do not match labels of shape {tuple(y.shape)}: "
                                 "per-position labels (N, T) need logits (N, T, C), one label per example (N,) "
                                 "needs logits (N, C) (e.g. model.pool = 'last' for transformer_lm)")
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)
        return F.cross_entropy(out, y, reduction=reduction)
    if reduction == "sum":
        return F.mse_loss(out, y, reduction="sum") / out[0].numel()
    return F.mse_loss(out, y)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str,
             batch_size: int = 4096, ctx: DistContext | None = None) -> tuple[float, float | None]:
    """Mean loss and accuracy (None unless classification) in eval mode, without curvature capture.

    Both are means over loss terms: examples, or every position for labels ``(N, T)`` (per-token loss
    and accuracy of a language model). With a distributed ``ctx`` each rank evaluates its contiguous
    share of ``x`` and the sums are all-reduced, so every rank returns the same numbers (all ranks must
    call it)."""
    if len(x) == 0:
        return math.nan, None
    terms = y[0].numel() if task == "classification" else 1  # loss terms (labels) per example
    if ctx is not None and ctx.distributed:
        part = shard(len(x), ctx.rank, ctx.world_size)
        total, correct = _eval_sums(model, x[part], y[part], task, batch_size)
        total, correct = ctx.all_sum([total, correct])
    else:
        total, correct = _eval_sums(model, x, y, task, batch_size)
    count = len(x) * terms
    return total / count, (correct / count if task == "classification" else None)


def _eval_sums(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str,
               batch_size: int) -> tuple[float, int]:
    """Summed loss and number of correct predictions (labels) over ``x`` (eval mode, capture paused)."""
    from curvlab import capture

    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    try:
        with capture.paused():
            for start in range(0, len(x), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                out = model(xb)
                total += float(_loss(task, out, yb, reduction="sum"))
                if task == "classification":
                    correct += int((out.argmax(dim=-1) == yb).sum())
    finally:
        model.train(was_training)
    return total, correct


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


def _task_and_loss(split: Any, task: str) -> tuple[str, str]:
    task = split.task if task == "auto" else task
    if task == "classification" and split.task != "classification":
        raise ConfigError(f"train.task='classification' but data set {split.name!r} has regression targets")
    if task == "regression" and split.task != "regression":
        raise ConfigError(f"train.task='regression' but data set {split.name!r} has class labels; use "
                          "task 'auto' or 'autoencoder'")
    return task, ("cross_entropy" if task == "classification" else "mse")


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
    task, loss_name = _task_and_loss(split, train["task"])
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
            marks = _history_marks(opt)
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
                loss = _loss(task, model(xb), yb)
                loss.backward()
                value = float(loss.detach())
                stopped = _nonfinite_loss(value, step, epoch, ctx)
                if stopped is not None:
                    break
                try:
                    opt.step(_Closure(opt, model, task, xb, yb, loss) if _needs_closure(opt) else None)
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
                         "epoch_time_s": epoch_time, "time_s": elapsed, **_damping_row(opt, marks),
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


def _needs_closure(opt: Any) -> bool:
    """Whether the optimizer re-evaluates the loss (``opt.needs_closure``: ``damping_adapt``, or
    ``gamma_score="next"``); only then does the loop hand ``step`` a closure (the plain loop's cost and results are unchanged)."""
    return bool(getattr(opt, "needs_closure", False))


class _Closure:
    """The closure of ``opt.step(closure)`` for a loop that has already run the forward and backward: the first
    call returns that loss (nothing is recomputed), every later call (the LM damping's ``h(theta + delta)``, made
    inside :func:`curvlab.capture.paused`) runs ``zero_grad``, a forward and a backward on the same batch."""

    def __init__(self, opt: Any, model: torch.nn.Module, task: str, x: torch.Tensor, y: torch.Tensor,
                 loss: torch.Tensor) -> None:
        self.opt, self.model, self.task, self.x, self.y, self.loss = opt, model, task, x, y, loss

    def __call__(self) -> torch.Tensor:
        if self.loss is not None:
            loss, self.loss = self.loss, None
            return loss
        self.opt.zero_grad(set_to_none=True)
        loss = _loss(self.task, self.model(self.x), self.y)
        loss.backward()
        return loss


def _damping_row(opt: Any, start: tuple[int, int]) -> dict[str, Any]:
    """The metrics of an adaptive damping (``damping_adapt`` / ``gamma_adapt``): the damping at the epoch's end and
    the adaptations made in it (``step``, ``rho``, ``damping``; ``gamma`` for the curvature's damping). Empty for a
    fixed damping, so a plain run's metrics keep their keys."""
    if not _needs_closure(opt) and getattr(opt, "gamma", None) is None:
        return {}
    group = opt.param_groups[0]
    row: dict[str, Any] = {"damping": group["damping"]}
    if "gamma" in group:
        row["gamma"] = group["gamma"]
    row["damping_history"] = [{k: h[k] for k in ("step", "rho", "damping")}
                              for h in opt.damping_history[start[0]:]]
    if getattr(opt, "gamma", None) is not None:
        row["gamma_history"] = [{k: h[k] for k in ("step", "gamma", "measured_at") if k in h}
                                for h in opt.gamma_history[start[1]:]]
    return row


def _history_marks(opt: Any) -> tuple[int, int]:
    return len(getattr(opt, "damping_history", [])), len(getattr(opt, "gamma_history", []))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _nonfinite_loss(value: float, step: int, epoch: int, ctx: DistContext) -> str | None:
    """The divergence message of a NaN/Inf minibatch loss, else None. Under torchrun each rank sees only its own
    share's loss, so there the stop comes from the optimizer (gradients are all-reduced, so every rank skips the
    same steps and raises :class:`curvlab.Diverged` together)."""
    if math.isfinite(value) or ctx.distributed:
        return None
    return (f"training diverged: the minibatch loss is {value} at step {step + 1} (epoch {epoch}); the run stopped "
            "before that step's update. Lower optimizer.lr, raise optimizer.damping, or set optimizer.kl_clip")


def summarize(rows: list[dict[str, Any]], cfg: dict[str, Any], rid: str, task: str, loss_name: str, split: Any,
              opt: Any) -> dict[str, Any]:
    """Final / best test accuracy, final train accuracy, epochs to ``train.target_accuracy`` (None if never
    reached), final losses, mean step time, refresh time per step and its share of the step, coverage, divergence."""
    trained = [r for r in rows if r["epoch"] > 0]
    acc = [r["test_accuracy"] for r in trained]
    target = cfg["train"]["target_accuracy"]
    steps = trained[-1]["steps"] if trained else 0
    step_s = sum(r["step_time_ms"] * (r["steps"] - p["steps"]) for p, r in zip(rows, rows[1:])) / 1e3
    refresh_s = sum(r["refresh_time_s"] for r in trained)
    cover = opt.coverage()
    last = trained[-1] if trained else rows[0]
    test_losses = [r["test_loss"] for r in rows if _finite(r["test_loss"])]
    nonfinite = not all(_finite(r["train_loss"]) or r["train_loss"] is None for r in rows) \
        or not _finite(last["test_loss"])
    stopped = rows[-1].get("diverged") or ("a loss evaluated at the end of an epoch is not finite" if nonfinite
                                           else None)
    hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.config.items()}
    return {
        "run_id": rid, "name": cfg["name"], **{k: cfg["optimizer"][k] for k in ("estimator", "rule", "scaling")},
        "dataset": split.name, "model": cfg["model"]["name"], "task": task, "loss": loss_name,
        "num_train": split.num_train, "num_test": split.num_test, "epochs": len(trained), "steps": steps,
        **({"evaluated_on": split.evaluated_on} if split.evaluated_on != "test" else {}),
        "final_test_accuracy": acc[-1] if acc and task == "classification" else None,
        "final_train_accuracy": last.get("train_accuracy"),
        "best_test_accuracy": max((a for a in acc if a is not None), default=None),
        "target_accuracy": target,
        "epochs_to_target": next((r["epoch"] for r in trained if (r["test_accuracy"] or 0.0) >= target), None),
        "final_train_loss": last["train_loss"], "final_test_loss": last["test_loss"],
        "best_test_loss": min(test_losses, default=None),
        "mean_step_ms": 1e3 * step_s / max(steps, 1),
        "refresh_ms_per_step": 1e3 * refresh_s / max(steps, 1),
        "refresh_fraction": refresh_s / step_s if step_s > 0 else None,
        "train_time_s": last["time_s"] or 0.0,
        "skipped_steps": opt.skipped_steps, "numerics_events": len(opt.events),
        "diverged": stopped is not None, "diverged_reason": stopped,
        "num_params": sum(c["numel"] for c in cover),
        "preconditioned_params": sum(c["numel"] for c in cover if c["preconditioned"]),
        "optimizer_config": hyper,
    }
