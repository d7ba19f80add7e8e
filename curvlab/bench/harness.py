"""Step-time measurement: curvlab variants against momentum SGD, side by side in one process.

Absolute times drift from run to run (other processes, frequency scaling, thermal state), so every number
this module reports is a RATIO taken against ``torch.optim.SGD(momentum=0.9)`` on the same model
architecture, the same batch and the same thread settings, measured in the same process and interleaved:
one round runs a block of steps of every variant in turn, and the ratio of a variant is the median over
rounds of ``(its mean step time in the round) / (SGD's mean step time in the same round)``. A block is one
full period of the variant's schedule (``lcm(stat_interval, inv_interval)`` steps), so refresh steps are
charged at their real frequency; the median is over rounds, never over the steps inside a period.

Besides the ratio, each variant reports its median step time, the time per step spent in forward+backward
(the capture hooks and, for ``fisher="mc"``, the sampled backward run inside the user's backward), in
statistics, in refreshes and in preconditioning (:mod:`curvlab.profiling`), the size of its optimizer state,
and on CUDA the peak memory allocated during its steps above what was allocated before them.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics as st
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..profiling import Sections

StepFn = Callable[[], Any]

#: hyper-parameters every benchmarked variant starts from (a variant's own values win). The bench measures cost,
#: not training: a negligible learning rate does every bit of the step's work while the parameters stay put, so
#: repeated steps on one batch of random labels never drift into overflow (a skipped step would cost less and
#: bias the ratio; rows report ``skipped_steps``, and parameters are also restored after every timed block).
#: With lr 1e-3, K-FAC and Shampoo on the small CNN diverged within ~30 steps on one repeated batch.
BENCH_LR = 1e-9
#: no KL clip: the peers (ASDL, curvlinops, ...) do not clip, and the README's ratios were measured without it
BENCH_DEFAULTS: dict[str, Any] = {"lr": BENCH_LR, "momentum": 0.9, "kl_clip": None}


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def interleaved(steps: dict[str, StepFn], *, warmup: int = 2, repeats: int = 10,
                sync: Callable[[], None] | None = None, block: dict[str, int] | int = 1,
                clock: str = "wall", after_block: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per step of each zero-argument ``steps[name]``, measured round-robin.

    Each of ``repeats`` rounds runs ``block`` consecutive calls of every step function in turn (``block`` may
    differ per name) and records the mean time per call of that block; ``warmup`` rounds run first and are
    discarded. ``sync`` (e.g. ``torch.cuda.synchronize``) is called before and after each timed block.
    ``clock="wall"`` (default) measures elapsed time; ``"process"`` the CPU time of this process (all its
    threads), which other processes competing for the cores do not inflate (use it on a busy machine with
    one thread; GPU work is not CPU time, so use "wall" on a GPU). ``after_block(name)``, if given, runs after
    each block, outside the timed region.
    Returns ``{name: [seconds per call, one entry per round]}``.
    """
    if clock not in CLOCKS:
        raise ValueError(f"interleaved: clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    if not steps:
        raise ValueError("interleaved: no step functions given")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"interleaved: need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    blocks = {name: block if isinstance(block, int) else block.get(name, 1) for name in steps}
    bad = {k: v for k, v in blocks.items() if not (isinstance(v, int) and v >= 1)}
    if bad:
        raise ValueError(f"interleaved: block sizes must be integers >= 1, got {bad}")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name, fn in steps.items():
            if sync is not None:
                sync()
            start = now()
            for _ in range(blocks[name]):
                fn()
            if sync is not None:
                sync()
            if r >= warmup:
                times[name].append((now() - start) / blocks[name])
            if after_block is not None:
                after_block(name)
    return times


def paired_ratios(times: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Per-round ratios ``times[name][r] / times[reference][r]`` (rounds paired, as measured)."""
    if reference not in times:
        raise KeyError(f"reference {reference!r} not among the measured steps {sorted(times)}")
    ref = times[reference]
    return {name: [a / b for a, b in zip(ts, ref)] for name, ts in times.items()}


def quantiles(values: list[float]) -> dict[str, float]:
    """Median and the 25/75 % quantiles (inclusive method; exact for small samples)."""
    if len(values) == 1:
        return {"median": values[0], "q25": values[0], "q75": values[0]}
    q = st.quantiles(values, n=4, method="inclusive")
    return {"median": st.median(values), "q25": q[0], "q75": q[2]}


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor reachable through dicts, lists and tuples of ``obj``."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's own state: momentum buffers and (curvlab) curvature factors and inverses."""
    seen: set[int] = set()
    total = sum(tensor_bytes(s, seen) for s in opt.state.values())
    for unit in getattr(opt, "units", []):
        if unit.curvature is not None:
            total += tensor_bytes(unit.curvature.state_dict(), seen)
    return total


@dataclass
class Variant:
    """One optimizer configuration to benchmark: registry names and hyper-parameters."""

    estimator: str = "kfac"
    rule: str = "natural"
    scaling: str = "standard"
    hyper: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            extra = ",".join(f"{k}={v}" for k, v in self.hyper.items())
            self.label = f"{self.estimator}/{self.rule}" + (f"/{self.scaling}" if self.scaling != "standard" else "") \
                + (f" [{extra}]" if extra else "")

    @property
    def period(self) -> int:
        """Steps after which the schedule repeats: ``lcm(stat_interval, inv_interval)``, and ``damping_interval``
        (default 5) when the damping adapts (its re-evaluations are charged at their real frequency too), and
        ``gamma_interval`` (default 20) with ``gamma_adapt`` (:mod:`curvlab.factor_damping`)."""
        period = math.lcm(int(self.hyper.get("stat_interval", 1)), int(self.hyper.get("inv_interval", 10)))
        if self.hyper.get("damping_adapt"):
            period = math.lcm(period, int(self.hyper.get("damping_interval", 5)))
        if self.hyper.get("gamma_adapt"):
            period = math.lcm(period, int(self.hyper.get("gamma_interval", 20)))
        return period

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """``ESTIMATOR[/RULE[/SCALING]][:key=value,key=value]``, e.g. ``kfac/fop:stat_interval=10,inv_interval=10``."""
        from ..experiments.config import parse_value

        names, _, rest = spec.partition(":")
        parts = [p for p in names.split("/") if p]
        if not 1 <= len(parts) <= 3:
            raise ValueError(f"variant {spec!r}: expected ESTIMATOR[/RULE[/SCALING]][:key=value,...]")
        hyper = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"variant {spec!r}: hyper-parameter {item!r} must look like key=value")
            value = value.strip()
            hyper[key.strip()] = {"True": True, "False": False, "None": None}.get(value, parse_value(value))
        return cls(*parts, hyper=hyper)


def _sequence_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every row of ``(N, ..., C)`` logits (classes last: curvlab's convention)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _loss_fn(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if loss == "cross_entropy":
        return _sequence_cross_entropy
    if loss == "mse":
        return F.mse_loss
    raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {loss!r}")


class TimedStep:
    """One training step (zero_grad, forward, loss, backward, ``opt.step()``) on a private model copy.

    Keeps the time spent in forward+backward (``fwd_bwd_s``) separately from the optimizer's step. An optimizer
    with ``damping_adapt`` (:mod:`curvlab.damping`) is stepped with ``opt.step(closure)``, the closure doing the
    zero_grad, forward, loss and backward: its first call is the step's forward+backward, the re-evaluation after
    the update on adaptation steps (inside :func:`curvlab.capture.paused`) is charged to the optimizer's step.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 loss: str, sync: Callable[[], None] | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.model, self.opt, self.x, self.y = model, opt, x, y
        self.loss_fn, self.sync, self.clock = _loss_fn(loss), sync, clock
        self.fwd_bwd_s, self.calls = 0.0, 0
        self._initial = [p.detach().clone() for p in model.parameters()]
        self.use_closure = bool(getattr(opt, "needs_closure", False))

    def restore_parameters(self) -> None:
        """Put the parameters back to their initial values (in place; the optimizer state is kept), so that
        repeated steps on one batch of random labels never drift into overflow (a skipped step costs less)."""
        with torch.no_grad():
            for p, p0 in zip(self.model.parameters(), self._initial):
                p.copy_(p0)

    def __call__(self) -> None:
        if self.use_closure:
            self.opt.step(self.closure)
            return
        self.opt.zero_grad(set_to_none=True)
        start = self.clock()
        self.loss_fn(self.model(self.x), self.y).backward()
        if self.sync is not None:
            self.sync()
        self.fwd_bwd_s += self.clock() - start
        self.calls += 1
        self.opt.step()

    def closure(self) -> torch.Tensor:
        """zero_grad, forward, loss, backward; returns the loss (``opt.step(closure)``)."""
        from ..capture import is_paused

        self.opt.zero_grad(set_to_none=True)
        start = self.clock()
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        if self.sync is not None:
            self.sync()
        if not is_paused():               # not the optimizer's re-evaluation after the update
            self.fwd_bwd_s += self.clock() - start
            self.calls += 1
        return loss

    def reset(self) -> None:
        self.fwd_bwd_s, self.calls = 0.0, 0
        if isinstance(getattr(self.opt, "sections", None), Sections):
            self.opt.sections.reset()


def sgd_reference(model: nn.Module, lr: float = BENCH_LR, momentum: float = 0.9) -> torch.optim.Optimizer:
    """The reference every ratio is taken against: ``torch.optim.SGD`` with momentum (foreach default)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def build_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, variants: list[Variant], *,
                loss: str = "cross_entropy", sync: Callable[[], None] | None = None, clock: str = "wall",
                extra: dict[str, tuple[nn.Module, torch.optim.Optimizer]] | None = None) -> dict[str, TimedStep]:
    """``{"sgd": ..., variant.label: ...}``: a :class:`TimedStep` per configuration, each on its own copy."""
    import curvlab

    steps = {"sgd": None}
    m = copy.deepcopy(model)
    now = CLOCKS[clock]
    steps["sgd"] = TimedStep(m, sgd_reference(m), x, y, loss, sync, now)
    for v in variants:
        if v.label in steps:
            raise ValueError(f"two variants share the label {v.label!r}")
        m = copy.deepcopy(model)
        own = {"momentum": 0.0} if getattr(curvlab.RULES.get(v.rule), "quadratic_model", False) else {}  # mu: its own
        opt = curvlab.optimizer(m, v.estimator, v.rule, v.scaling, **{**BENCH_DEFAULTS, **own, "loss": loss, **v.hyper})
        opt.sections = Sections(sync, now)
        steps[v.label] = TimedStep(m, opt, x, y, loss, sync, now)
    for label, (m, opt) in (extra or {}).items():
        steps[label] = TimedStep(m, opt, x, y, loss, sync, now)
    return steps


def peak_memory(step: TimedStep, calls: int, device: torch.device) -> int | None:
    """CUDA only: peak bytes allocated during ``calls`` steps above what was allocated before (else None)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(calls):
        step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, variants: list[Variant], *,
            loss: str = "cross_entropy", repeats: int = 7, warmup: int = 1, clock: str = "wall",
            extra: dict[str, tuple[nn.Module, torch.optim.Optimizer, int]] | None = None,
            roofline: bool = False) -> list[dict[str, Any]]:
    """Benchmark ``variants`` (and ``extra`` ready-made ``(model, optimizer, period)`` entries) against SGD.

    Returns one row per configuration (SGD first) with ``ratio`` (median paired ratio to SGD), ``ratio_q25`` /
    ``ratio_q75``, ``step_ms``, the per-step ``breakdown_ms`` (forward_backward, statistics, refresh,
    precondition, rule, other), ``state_bytes``, ``peak_bytes`` (CUDA) and ``period``; with ``roofline=True``
    also ``roofline`` (multiply-adds, plain-call time and efficiency per section, and the floor ratio:
    :mod:`curvlab.bench.roofline`).
    """
    device = x.device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    steps = build_steps(model, x, y, variants, loss=loss, sync=sync, clock=clock,
                        extra={k: (m, o) for k, (m, o, _) in (extra or {}).items()})
    periods = {"sgd": 1, **{v.label: v.period for v in variants}, **{k: p for k, (_, _, p) in (extra or {}).items()}}
    def restore(name: str) -> None:
        steps[name].restore_parameters()

    logger = logging.getLogger("curvlab")            # skipped steps are counted per row, not logged per step
    level, logger.level = logger.level, max(logger.level, logging.ERROR)
    try:
        rows = _measure(steps, periods, variants, device, sync, repeats, warmup, clock, restore)
        if roofline:
            from .roofline import roofline as add_roofline
            add_roofline(steps, periods, rows, clock=CLOCKS[clock], sync=sync, after_block=restore)
        return rows
    finally:
        logger.setLevel(level)


def _measure(steps, periods, variants, device, sync, repeats, warmup, clock, restore) -> list[dict[str, Any]]:
    # warm-up: one period of each (first statistics, first inverses, allocator caches), then the timed rounds

    interleaved(steps, warmup=0, repeats=max(warmup, 1), sync=sync, block=periods, clock=clock, after_block=restore)
    for s in steps.values():
        s.reset()
    times = interleaved(steps, warmup=0, repeats=repeats, sync=sync, block=periods, clock=clock,
                        after_block=restore)
    ratios = paired_ratios(times, "sgd")
    by_label = {v.label: v for v in variants}
    rows = []
    for label, step in steps.items():
        calls = step.calls
        sections = getattr(step.opt, "sections", None)
        per = {k: 1e3 * v / calls for k, v in (sections.seconds.items() if isinstance(sections, Sections) else ())}
        total_ms = 1e3 * st.fmean(times[label])
        breakdown = {"forward_backward": 1e3 * step.fwd_bwd_s / calls, **per}
        breakdown["other"] = max(total_ms - sum(breakdown.values()), 0.0)
        q = quantiles(ratios[label])
        rows.append({
            "label": label, "period": periods[label], "ratio": q["median"], "ratio_q25": q["q25"],
            "ratio_q75": q["q75"], "step_ms": quantiles(times[label])["median"] * 1e3,
            "breakdown_ms": breakdown, "state_bytes": optimizer_state_bytes(step.opt),
            "peak_bytes": peak_memory(step, periods[label], device),
            "skipped_steps": getattr(step.opt, "skipped_steps", 0),
            **({"estimator": by_label[label].estimator, "rule": by_label[label].rule,
                "scaling": by_label[label].scaling, "hyper": by_label[label].hyper} if label in by_label else {}),
        })
    return rows
