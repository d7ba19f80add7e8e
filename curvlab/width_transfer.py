"""Learning-rate transfer across width (Ishikawa & Karakida, ICLR 2024, "On the Parameterization of Second-Order
Optimization Effective Towards the Infinite Width", arXiv 2312.12226, Figure 6; ALGORITHMS.md 5.4).

:func:`lr_width_sweep` trains ``curvlab.models.build_mlp`` (``depth`` hidden layers of ``width`` units: input,
hidden and output weight layers, as the reference code's 3-layer MLP) once per (estimator, scaling, width, lr,
seed) for a fixed number of epochs and records the final training loss (over the first ``eval_train`` training
examples, after the last step) and the test accuracy. A run whose loss turns non-finite or exceeds
``diverge_factor`` times its initial loss, or whose curvature cannot be factorized (``FactorizationError``) or
whose optimizer raises :class:`curvlab.Diverged` (too many non-finite steps in a row), is
stopped and recorded with ``final_loss = nan`` and ``diverged = True``; nothing raises. :func:`run_width_transfer`
loads the data, sweeps and writes the table, figure and numbers. The reading of the records lives in
:mod:`curvlab.width_transfer_report` (re-exported here): :func:`best_lr_shift` reduces them to the best lr per width
and the shift ``log2(best_lr(M_max) / best_lr(M_min))`` (also in grid steps) per (estimator, scaling), the number
the paper's claim is about (muP: the optimum stays put, shift ~ 0; SP: it drifts); :func:`plot_lr_width` draws the
Figure-6-like panels.

Choices (the paper's exact protocol was not seen, ALGORITHMS.md 5.4 [U]):

* ``sp_init="matched"`` (default): the standard parameterization is the reference code's "SP" (init exponent
  ``b = 1/2`` in every layer, ``c = 0``: no LR multipliers, width-independent damping) with the output layer's
  constant ``sigma_out = sigma / sqrt(M0)``, so that at ``M0 = base_width`` (default: the smallest width) its
  init ``N(0, 1/(M0 fan_in))`` is muP's ``N(0, 1/fan_in^2)`` (eq. P.1, ``b = 1``) draw for draw. With equal
  hyper-parameters (K-FAC: ``damping_style="explicit"`` for both scalings, whose muP multipliers are 1 at M0)
  SP and muP are then the same run at the smallest width, as in muP's definition relative to a base model
  (Yang et al., Tensor Programs V); the curves differ only in how they move with width. ``sp_init="torch"``
  keeps PyTorch's default init for SP (then the two scalings differ at M0 too).
* ``loss``: ``"cross_entropy"`` (library default) or ``"mse"`` on one-hot targets, ``(1/C) ||f - e_y||^2``, the
  loss of the paper's theory and the reference code's default (5.3); the scripts use ``"mse"``: with
  cross-entropy and a few epochs the SP optimum did not move at all in our runs (SGD, widths 32..1024), plausibly
  (not tested) because a too-large output step saturates the softmax instead of diverging (README "Width transfer").
* Per-estimator hyper-parameters start from the estimator's ``suggested`` values (identical for both
  scalings); the lr grid is ``center * spacing**k``, ``k = -(points//2) .. points//2``, centred on the
  suggested lr. Shampoo's ``shampoo_block_size`` is raised to ``max(widths) + 1`` (one block per layer side,
  which muP's Shampoo row requires and which keeps SP comparable).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .width_transfer_report import base_width_agreement, best_lr_shift, format_table, plot_lr_width

SP_INITS = ("matched", "torch")
#: per-estimator overrides of ``suggested`` applied for both scalings. K-FAC: per-side ("explicit") damping for
#: both, so SP and muP coincide at M0; inverses refreshed every step as in the reference code (5.3): with the
#: suggested ``inv_interval=5`` the one-batch statistics of step 0 (rank <= batch < width + 1 for wide layers) are
#: used for 5 steps and wide runs diverged within ~8 steps at lrs that are stable with ``inv_interval=1``
#: (MNIST 14x14, MSE, width 256, muP: lr 0.2 diverged at step 6 with 5, trained to loss 0.0045 with 1).
#: Shampoo keeps its suggested ``inv_interval=5`` (an eigendecomposition per factor and refresh: CPU cost).
ESTIMATOR_DEFAULTS: dict[str, dict[str, Any]] = {"kfac": {"damping_style": "explicit", "inv_interval": 1}}
#: per-(estimator, loss) damping. Cross-entropy: ``0.3 ~ sqrt(0.1)``, the per-side size of K-FAC's suggested
#: pi-damping ``lambda = 0.1`` (sides ``pi sqrt(lambda)``, ``sqrt(lambda) / pi``). MSE: 0.03, from a scan at the
#: base width (MNIST 14x14, width 32, 3 epochs, mup, inv_interval 5): damping 0.3 / 0.1 / 0.03 gave best losses
#: 0.0113 (lr 1.6, the largest tried) / 0.0099 (lr 0.8) / 0.0096 (lr 0.2): larger damping makes MSE K-FAC SGD-like
#: on the G side.
LOSS_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {("kfac", "cross_entropy"): {"damping": 0.3},
                                                         ("kfac", "mse"): {"damping": 0.03}}


def lr_grid(center: float, points: int = 7, spacing: float = 2.0) -> list[float]:
    """``points`` learning rates ``center * spacing**k`` symmetric (in log) around ``center``."""
    if not (isinstance(points, int) and points >= 1):
        raise ValueError(f"points must be an integer >= 1, got {points!r}")
    if not (center > 0 and spacing > 1):
        raise ValueError(f"lr grid needs center > 0 and spacing > 1, got center={center!r}, spacing={spacing!r}")
    lo = -(points // 2)
    return [center * spacing ** (lo + i) for i in range(points)]


def pool_images(split: Any, factor: int) -> Any:
    """``split`` with its images average-pooled by ``factor`` (e.g. MNIST 28x28 -> 14x14 for ``factor=2``): a
    cheaper input layer for CPU runs (K-FAC's ``A`` and Shampoo's ``R`` of the input layer shrink ``factor^4``-fold).
    ``factor=1`` returns ``split`` unchanged."""
    from dataclasses import replace

    if not (isinstance(factor, int) and factor >= 1):
        raise ValueError(f"pool factor must be an integer >= 1, got {factor!r}")
    if factor == 1:
        return split
    shape = split.input_shape
    if not shape or len(shape) != 3 or shape[1] % factor or shape[2] % factor:
        raise ValueError(f"pooling by {factor} needs images (C, H, W) with H, W divisible by it; split "
                         f"{split.name!r} has input_shape {shape!r} (use factor 1)")

    def pool(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.reshape(-1, *shape), factor).flatten(1)

    c, h, w = shape
    new = (c, h // factor, w // factor)
    return replace(split, x_train=pool(split.x_train), x_test=pool(split.x_test), input_shape=new,
                   num_features=new[0] * new[1] * new[2])


def standard_init(model: nn.Module, base_width: float, sigma: float = 1.0) -> None:
    """SP init matched to muP at ``base_width`` (module doc): every Linear ``N(0, sigma^2/fan_in)``, the last one
    ``N(0, sigma^2/(base_width fan_in))``, biases zero; the same RNG calls, in the same order, as muP's init."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("standard_init: the model has no nn.Linear layer")
    with torch.no_grad():
        for i, layer in enumerate(linears):
            fan_in = layer.weight.shape[1]
            scale = sigma / math.sqrt(fan_in * (base_width if i == len(linears) - 1 else 1.0))
            layer.weight.normal_(0.0, scale)
            if layer.bias is not None:
                layer.bias.zero_()


def estimator_hyper(estimator: str, widths: Sequence[int], override: dict[str, Any] | None = None,
                    loss: str = "cross_entropy") -> dict[str, Any]:
    """Hyper-parameters of one estimator for the sweep (without ``lr``): ``suggested``, then
    :data:`ESTIMATOR_DEFAULTS` and :data:`LOSS_DEFAULTS`, then the Shampoo block size (module doc), then
    ``override``."""
    from .registry import ESTIMATORS

    cls = ESTIMATORS.get(estimator)
    hyper = {k: v for k, v in cls.suggested.items() if k != "lr"}
    hyper.update(ESTIMATOR_DEFAULTS.get(cls.registry_name, {}))
    hyper.update(LOSS_DEFAULTS.get((cls.registry_name, loss), {}))
    if "shampoo_block_size" in cls.options:
        hyper["shampoo_block_size"] = max(cls.options["shampoo_block_size"].default, max(widths) + 1)
    hyper.update(override or {})
    return hyper


def _check_sweep_args(estimators, scalings, widths, lrs, seeds, epochs, batch_size, base_width, sp_init) -> None:
    from .registry import ESTIMATORS, SCALINGS

    for name in estimators:
        ESTIMATORS.get(name)                                  # raises naming the registered ones
    for name in scalings:
        SCALINGS.get(name)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty list of positive integers, got {list(widths)!r}")
    if len(set(widths)) != len(widths):
        raise ValueError(f"widths must be distinct, got {list(widths)!r}")
    for est in estimators:
        grid = lrs.get(est) if isinstance(lrs, dict) else lrs
        if not grid or any(not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)) for v in grid):
            raise ValueError(f"lrs for estimator {est!r} must be a non-empty list of positive finite numbers, "
                             f"got {grid!r} (pass lrs={{estimator: [..]}} or one list for all)")
    if not seeds or any(not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, got {list(seeds)!r}")
    if not (epochs > 0) or not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"need epochs > 0 and an integer batch_size >= 1, got epochs={epochs!r}, "
                         f"batch_size={batch_size!r}")
    if base_width is not None and not base_width > 0:
        raise ValueError(f"base_width must be positive (or None: the smallest width), got {base_width!r}")
    if sp_init not in SP_INITS:
        raise ValueError(f"sp_init must be one of {SP_INITS}, got {sp_init!r}")


LOSSES = ("cross_entropy", "mse")


def _loss(loss: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on labels, or ``mse``: ``(1/C) ||f - onehot(y)||^2`` per example (``nn.MSELoss`` on one-hot
    targets, curvlab's ``loss="mse"`` convention; the paper's theory is stated for MSE)."""
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction=reduction)
    per = (out - F.one_hot(y, out.shape[1]).to(out.dtype)).pow(2).mean(1)
    return per.mean() if reduction == "mean" else per.sum()


def _loss_and_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "cross_entropy",
                  chunk: int = 4096) -> tuple[float, float]:
    total, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            out = model(x[s:s + chunk])
            total += float(_loss(loss, out, y[s:s + chunk], reduction="sum"))
            correct += int((out.argmax(1) == y[s:s + chunk]).sum())
    return total / x.shape[0], correct / x.shape[0]


def train_run(split: Any, estimator: str, scaling: str, width: int, lr: float, seed: int, *, hyper: dict[str, Any],
              epochs: float, batch_size: int, base_width: float, depth: int = 2, activation: str = "relu",
              sp_init: str = "matched", eval_train: int = 10_000, diverge_factor: float = 10.0,
              loss: str = "cross_entropy", diagnose: bool = False) -> dict[str, Any]:
    """One run of the sweep (classification with ``loss`` in :data:`LOSSES`); returns its record (module doc).

    The held-out part of ``split`` (its test tensors: the test set, or a validation part carved from the training
    data, ``split.evaluated_on``) gives ``eval_loss`` and ``eval_acc``, with ``eval_on`` naming which it was.
    ``diagnose``: also record :func:`curvlab.diagnostics.damping_metrics` of the final optimizer state
    (``damping``: per layer and factor, the damping against the curvature's eigenvalues; ``{}`` for SGD, ``None``
    for a diverged run)."""
    import curvlab
    from .data import batches
    from .divergence import Diverged
    from .linalg import FactorizationError
    from .models import build_mlp

    device = split.x_train.device
    torch.manual_seed(seed)
    model = build_mlp((split.num_features,), split.num_outputs, width=width, depth=depth,
                      activation=activation).to(device=device, dtype=split.x_train.dtype)
    kw = dict(hyper)
    if scaling == "mup":
        kw.setdefault("base_width", base_width)
    elif sp_init == "matched":
        standard_init(model, base_width)
    opt = curvlab.optimizer(model, estimator, "natural", scaling, lr=lr, loss=loss, seed=seed, **kw)
    x_eval, y_eval = split.x_train[:eval_train], split.y_train[:eval_train]
    initial, _ = _loss_and_acc(model, x_eval, y_eval, loss)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(split.num_train / batch_size)
    total_steps = max(1, round(epochs * steps_per_epoch))
    step, diverged, error, start = 0, False, None, time.perf_counter()
    while step < total_steps and not diverged:
        for xb, yb in batches(split.x_train, split.y_train, batch_size, shuffle=True, generator=gen):
            opt.zero_grad()
            out = model(xb)
            batch_loss = _loss(loss, out, yb)
            batch_loss.backward()
            # work-around: HookCapture's Fisher hook on the output closes over the output itself (a cycle through
            # a C++ tensor that gc does not break): every step's graph leaked (~0.4 MB/step at width 128), so a
            # sweep grew to GBs. Its hooks have fired now; dropping them breaks the cycle (harmless once fixed).
            if getattr(out, "_backward_hooks", None):
                out._backward_hooks.clear()
            value = float(batch_loss.detach())
            if not math.isfinite(value) or value > diverge_factor * max(initial, 1.0):
                diverged = True
                break
            try:
                opt.step()
            except (FactorizationError, Diverged) as err:   # blown-up statistics: a divergence, not a bug
                diverged, error = True, str(err)
                break
            step += 1
            if step >= total_steps:
                break
    if opt.capture is not None:
        opt.capture.remove()
    final = math.nan if diverged else _loss_and_acc(model, x_eval, y_eval, loss)[0]
    if not math.isfinite(final) or final > diverge_factor * max(initial, 1.0):
        diverged, final = True, math.nan
    held_loss, acc = (math.nan, math.nan) if diverged else _loss_and_acc(model, split.x_test, split.y_test, loss)
    record = {"estimator": estimator, "scaling": scaling, "width": width, "lr": lr, "seed": seed,
              "final_loss": final, "eval_loss": held_loss, "eval_acc": acc,
              "eval_on": getattr(split, "evaluated_on", "test"), "diverged": diverged, "initial_loss": initial,
              "steps": step, "skipped_steps": opt.skipped_steps, "error": error,
              "seconds": time.perf_counter() - start}
    if diagnose:                                     # a diverged run's statistics are not worth reading
        from .diagnostics import damping_metrics

        record["damping"] = None if diverged else damping_metrics(opt)
    return record


def lr_width_sweep(split: Any, *, estimators: Sequence[str] = ("kfac", "shampoo", "identity"),
                   scalings: Sequence[str] = ("standard", "mup"), widths: Sequence[int] = (64, 128, 256, 512),
                   lrs: dict[str, Sequence[float]] | Sequence[float] | None = None, lr_points: int = 7,
                   lr_spacing: float = 2.0, seeds: Sequence[int] = (0,), epochs: float = 1.0, batch_size: int = 128,
                   base_width: float | None = None, depth: int = 2, activation: str = "relu",
                   sp_init: str = "matched", hyper: dict[str, dict[str, Any]] | None = None,
                   eval_train: int = 10_000, loss: str = "cross_entropy", diagnose: bool = False,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Train every (estimator, scaling, width, lr, seed) combination on ``split``; one record per run.

    ``lrs``: one grid for all estimators, a dict per estimator, or ``None`` for :func:`lr_grid` around each
    estimator's suggested lr. ``base_width``: muP's ``M0`` and SP's matched init (``None``: ``min(widths)``).
    ``hyper``: per-estimator overrides of :func:`estimator_hyper`, or per ``"estimator/scaling"`` (those win; e.g.
    a damping tuned per scaling). ``diagnose``: :func:`train_run`'s damping diagnostic for every run."""
    from tqdm.auto import tqdm

    from .registry import ESTIMATORS

    if split.task != "classification":
        raise ValueError(f"lr_width_sweep trains classifiers; split {split.name!r} is {split.task}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if lrs is None:
        lrs = {e: lr_grid(ESTIMATORS.get(e).suggested.get("lr", 0.1), lr_points, lr_spacing) for e in estimators}
    _check_sweep_args(estimators, scalings, widths, lrs, seeds, epochs, batch_size, base_width, sp_init)
    base = float(min(widths) if base_width is None else base_width)
    hyper = hyper or {}
    jobs = [(e, s, w, lr, seed) for e in estimators for s in scalings for w in sorted(widths)
            for lr in (lrs[e] if isinstance(lrs, dict) else lrs) for seed in seeds]
    records = []
    for e, s, w, lr, seed in tqdm(jobs, desc="lr x width", disable=not progress):
        override = {**hyper.get(e, {}), **hyper.get(f"{e}/{s}", {})}
        records.append(train_run(split, e, s, w, float(lr), seed, hyper=estimator_hyper(e, widths, override, loss),
                                 epochs=epochs, batch_size=batch_size, base_width=base, depth=depth,
                                 activation=activation, sp_init=sp_init, eval_train=eval_train,
                                 loss=loss, diagnose=diagnose))
    return records


def run_width_transfer(settings: dict[str, Any], out: str | Path, stem: str = "width_transfer", title: str = "",
                       progress: bool = True) -> dict[str, Any]:
    """Load MNIST (or the digits fallback), sweep, print the table, write ``stem.png/.pdf/.json`` into ``out``;
    returns the numbers. ``settings``: the keyword arguments of :func:`lr_width_sweep` (``seeds`` as a count,
    starting at ``seed``, default 0) plus ``num_train``, ``num_test``, ``pool`` (:func:`pool_images`, MNIST only),
    ``data_dir``, ``device``."""
    from .figures import mnist_or_fallback, save_figure, write_numbers

    split, data_name = mnist_or_fallback(settings.get("data_dir"), num_train=settings["num_train"],
                                         num_test=settings["num_test"])
    split = pool_images(split, settings.get("pool", 1) if data_name == "mnist" else 1)
    split = split.to(device=settings.get("device", "cpu"))
    seed0 = settings.get("seed", 0)
    records = lr_width_sweep(
        split, estimators=settings["estimators"], scalings=settings["scalings"], widths=settings["widths"],
        lrs=settings.get("lrs"), lr_points=settings["lr_points"], lr_spacing=settings["lr_spacing"],
        seeds=list(range(seed0, seed0 + settings["seeds"])), epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        base_width=settings.get("base_width"), sp_init=settings.get("sp_init", "matched"),
        hyper=settings.get("hyper"), loss=settings.get("loss", "cross_entropy"), progress=progress)
    summary = best_lr_shift(records)
    agree = base_width_agreement(records)
    print(f"\nwidth transfer on {data_name} ({split.num_train} train examples, {split.num_features} features), "
          f"{settings['epochs']} epochs, {settings['seeds']} seed(s), loss {settings.get('loss', 'cross_entropy')}; "
          "final train loss, best lr per width:")
    print(format_table(summary))
    if agree:
        print("SP vs muP at the smallest width (max |loss difference|, 0 = same run): "
              + ", ".join(f"{k} {v:.2e}" for k, v in agree.items()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_lr_width(summary, title or f"{data_name}: final train loss vs lr, per width")
    paths = save_figure(fig, out, stem)
    config = {k: v for k, v in settings.items() if k != "hyper"}
    config["hyper"] = {e: estimator_hyper(e, settings["widths"], (settings.get("hyper") or {}).get(e),
                                          settings.get("loss", "cross_entropy"))
                       for e in settings["estimators"]}
    numbers = {"data": data_name, "config": config, "summary": summary, "base_width_agreement": agree,
               "records": records}
    write_numbers(out, stem, numbers)
    print("wrote " + ", ".join(str(p) for p in paths) + f", {out / (stem + '.json')}")
    return numbers
