"""ISAAC (Petersen, Sutter, Borgelt, Huh, Kuehne, Sun, Deussen, "ISAAC Newton: Input-based Approximate
Curvature for Newton's Method", ICLR 2023, arXiv 2305.00604): small-batch MNIST MLP, ISAAC (zeta*,
eq. I.6) against SGD and K-FAC, test accuracy and training loss per step and per second, every method tuned with
the same budget; and the paper's E1 (lambda_g, lambda_a) heat map (``--figure e1``).

What it reproduces (ALGORITHMS.md 6.4-6.5): the setting of the paper's experiment E1 (5-layer ReLU MLP on MNIST,
batch 60, widths 100/400/1600) and its runtime table (batch 60, GPU time per epoch: gradient 8.22 s, zeta*
10.24 s, K-FAC via BackPACK 1320.81 s for the 6400-wide MLP), read as the claims "zeta* ~ K-FAC per step, much
faster per second; a plain gradient step only ~10-25% faster than zeta*", and E1's "accuracy does not degrade as
lambda_g -> inf" (so zeta*, which needs no G statistics, loses nothing).

Protocol of the curves (:mod:`curvlab.experiments.fair`, :mod:`curvlab.experiments.fair_traces`): a stratified
validation split (``val_fraction``) is carved from the TRAINING images; every method gets the same number of
trials (``trials``: quick 8, full 24) of the same scrambled-Sobol sampler and seed, each trial trained ``steps``
steps on the fitting part and scored by its validation accuracy; the best configuration is re-run on ``seeds`` seeds
and evaluated on the test set once per seed. Spaces (log-uniform): lr [1e-3, 3] for all; ISAAC's lambda_a
(``damping``) [1e-3, 1e3]; K-FAC's pi-damped damping [1e-4, 10]. Fixed: vanilla SGD updates (momentum 0, as the
official MNIST example and E4) for all three; K-FAC is curvlab's amortized one (MC Fisher, EMA 0.95, inverses
every 10 steps), a stronger and far cheaper baseline than the paper's BackPACK K-FAC recomputed every step. The
JSON records every trial, spaces and budgets, edge flags and the damping diagnostic
(:func:`curvlab.diagnostics.damping_metrics`) of the tuned ISAAC and K-FAC. Time to accuracy: the steps and
optimizer seconds (evaluation excluded) at which the seed-mean test accuracy first reaches SGD's final one.
``bench_ms_per_step`` is the mean step time over ``bench_steps`` steps timed ROUND-ROBIN across the tuned methods
on the same batches (the fairer cost ratio on a shared machine).

``quick`` mode (CPU): 8k fitting / 2k validation / 2k test images, width 100 (the paper's smallest), 500 steps
(3.75 epochs) instead of 60k images and 40 epochs; ``full`` (GPU): full MNIST, width 400, 20k steps, 3 seeds, not
run.

``--figure e1`` (the paper's E1 heat map): final test accuracy of the two-parameter zeta (eq. I.2,
``isaac_lambda_g``; the ``inf`` column is zeta*) over a (lambda_g, lambda_a) grid, vanilla SGD updates, MC Fisher
for ``G``. Per cell every lr of ``e1_lrs`` is trained on the fitting split and scored on the validation split; the
test accuracy of the best one is shown (the test set is read once per cell). Grids: full the paper's [1e-6, 1e6]
in decades at width 400 and 20k steps; quick REDUCED to lambda_g in {1e-2, 1, 100, inf} x lambda_a in
{0.1, 1, 10, 100}, width 100, 300 steps (2.25 epochs), lrs {0.1, 0.3, 1} (about 11 CPU-seconds per cell on one
thread; the JSON records each cell's CPU time). Writes ``isaac_e1_heatmap.png/.pdf/.json``.

Claims (quick mode, 2026-12-03, one CPU thread on a heavily shared 2-core machine; curves: tuning seed 0, test
re-runs seeds 0 and 1, mean +- std; E1: seed 0; times are optimizer wall-clock under that load):

| claim (paper) | setting here | result | evidence |
|---|---|---|---|
| zeta* ~ K-FAC per step | width-100 MLP, 500 steps, 8 trials each | not reproduced | test acc. SGD 0.9032 +- 0.0138, ISAAC 0.9115 +- 0.0078, K-FAC 0.9258 +- 0.0032; steps to SGD's final acc. (0.903): SGD 425, ISAAC 425, K-FAC 225; final train loss 0.142 / 0.083 / 0.049 (ISAAC between SGD and K-FAC) |
| zeta* much faster per second than K-FAC | curvlab's amortized K-FAC, not BackPACK's per-step one | partly | seconds to SGD's final acc.: SGD 8.9, ISAAC 23.2, K-FAC 29.3; round-robin step cost vs SGD: ISAAC 1.85x, K-FAC 4.85x (paper: K-FAC 130x zeta*) |
| a gradient step is only ~10-25% faster than zeta* | CPU, one thread, width 100 | not reproduced | ISAAC step = 1.85x SGD's (round-robin, 30 steps); the claim is for batched GPU work |
| E1: accuracy does not degrade as lambda_g -> inf | 4 x 4 grid, width 100, 300 steps, lr per cell on validation | reproduced (one seed) | zeta* (inf) vs best finite lambda_g per lambda_a = 0.1 / 1 / 10 / 100: 0.878 vs 0.8785, 0.905 vs 0.9075, 0.8965 vs 0.9075, 0.908 vs 0.915 (within SGD's seed std 0.014); only lambda_g = 0.01 at lambda_a = 0.1 is worse (0.817) |
| damping vs curvature at the tuned values (diagnostic) | tuned ISAAC lambda_a 18.5, K-FAC damping 0.36 | swamps the mean, not the top | damping / mean eigenvalue: ISAAC 6.4..17.1 (all 5 layers), K-FAC 5.5..20.8 (all 10 factors); damping < largest eigenvalue everywhere (e.g. ISAAC layer 0: 18.5 vs 312): the top directions are still preconditioned, the bulk is a scaled gradient step |

Tuned (8 trials each, none on an edge of its range): SGD lr 0.40; ISAAC lr 0.20, lambda_a 18.5; K-FAC lr 0.20,
damping 0.36. E1 cost: 152 CPU-s for the 16 cells (~10 CPU-s per finite-lambda_g cell, ~6 for zeta*). Changed from
the previous (untuned) run: lr-only grids with ISAAC's lambda_a = 10 and K-FAC's damping 0.1 fixed, width 400, one
seed, selection on the test accuracy; now lr and damping tuned with equal budgets on a validation split, width 100
to fit the CPU budget, test accuracy only from the re-runs. E1's previous quick grid (width 100, 300 steps, lr by
training loss) is kept in size; its lr is now selected on validation data.

Outputs (``--out``): ``isaac_mnist_mlp.png/.pdf`` (test accuracy and train loss vs step and vs optimizer
wall-clock, seed means of the test re-runs), ``isaac_mnist_mlp.json`` (setup, tuning record, table, traces,
damping diagnostic) and the printed tables.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from curvlab import capture
from curvlab.experiments.fair import Method, fair_compare
from curvlab.experiments.fair_traces import TracedRuns, publish_fair, results_of, tuned_methods
from curvlab.experiments.runner import evaluate
from curvlab.experiments.traces import bench_chosen, plot_curves, summary_rows, train_fn
from curvlab.figures import mnist_or_fallback, paper_mode_parser
from curvlab.models import mlp
from curvlab.validation import carve_validation

#: ``trials``: the tuning budget of EVERY method; ``steps``: the budget of every run (trials and test re-runs);
#: ``val_fraction`` of the ``num_train`` training images is carved off (stratified) for selection; ``bench_steps``:
#: round-robin timing steps (a multiple of K-FAC's ``inv_interval``). ``e1_*``: the heat-map (``--figure e1``),
#: one run per (lambda_g, lambda_a, lr) cell, the lr chosen per cell on the validation split.
MODES: dict[str, dict[str, Any]] = {
    "tiny": dict(num_train=320, val_fraction=0.2, num_eval=256, num_test=64, width=16, depth=4, batch=32, steps=8,
                 eval_every=4, trials=2, seeds=1, bench_steps=2,
                 e1_width=16, e1_steps=8, e1_lambda_g=(1.0, None), e1_lambda_a=(1.0, 10.0), e1_lrs=(0.3,)),
    "quick": dict(num_train=10000, val_fraction=0.2, num_eval=2000, num_test=2000, width=100, depth=4, batch=60,
                  steps=500, eval_every=25, trials=8, seeds=2, bench_steps=30,
                  e1_width=100, e1_steps=300, e1_lambda_g=(1e-2, 1.0, 100.0, None), e1_lambda_a=(0.1, 1.0, 10.0, 100.0),
                  e1_lrs=(0.1, 0.3, 1.0)),
    "full": dict(num_train=None, val_fraction=1 / 6, num_eval=10000, num_test=None, width=400, depth=4, batch=60,
                 steps=20000, eval_every=500, trials=24, seeds=3, bench_steps=100, e1_width=400, e1_steps=20000,
                 e1_lambda_g=tuple(10.0 ** k for k in range(-6, 7)) + (None,),
                 e1_lambda_a=tuple(10.0 ** k for k in range(-6, 7)), e1_lrs=(0.1, 0.3, 1.0)),
}

LR = {"low": 1e-3, "high": 3.0, "log": True}
#: Vanilla SGD updates for all three (momentum 0, as the paper's MNIST example and E4); ISAAC's damping is its
#: lambda_a (zeta*: lambda_g = inf), K-FAC's its pi-damped Tikhonov term.
METHODS: list[Method] = [
    Method("SGD", {"lr": LR}, fixed={"optimizer": "identity", "momentum": 0.0}),
    Method("ISAAC", {"lr": LR, "damping": {"low": 1e-3, "high": 1e3, "log": True}}, second_order=True,
           fixed={"optimizer": "isaac", "momentum": 0.0}),
    Method("K-FAC", {"lr": LR, "damping": {"low": 1e-4, "high": 10.0, "log": True}}, second_order=True,
           fixed={"optimizer": "kfac", "momentum": 0.0, "ema_decay": 0.95, "inv_interval": 10, "kl_clip": None}),
]
COLUMNS = ("method", "lr", "final_test_accuracy", "final_train_loss", "ms_per_step", "step_time_vs_SGD",
           "bench_ms_per_step", "bench_vs_SGD", "steps_to_threshold", "s_to_threshold", "diverged_seeds")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = paper_mode_parser(__doc__.splitlines()[0], "paper_figures/out/isaac")
    parser.add_argument("--width", type=int, default=None,
                        help="hidden width (default: the mode's; paper 100/400/1600)")
    parser.add_argument("--trials", type=int, default=None, help="tuning trials per method (default: the mode's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    parser.add_argument("--figure", choices=("curves", "e1"), default="curves",
                        help="curves: ISAAC vs SGD vs K-FAC; e1: the (lambda_g, lambda_a) heat-map of the paper's E1")
    args = parser.parse_args(argv)
    cfg = dict(MODES[args.mode])
    if args.width:
        cfg["width"] = args.width
    if args.trials is not None:
        cfg["trials"] = args.trials
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    split, name = mnist_or_fallback(args.data_dir, num_train=cfg["num_train"], num_test=cfg["num_test"])
    # selection data: a stratified validation split carved from the TRAINING images
    x_fit, y_fit, x_val, y_val = carve_validation(split.x_train, split.y_train, cfg["val_fraction"], seed=0,
                                                  stratify=True)
    x_fit, y_fit, x_val, y_val = x_fit.to(device), y_fit.to(device), x_val.to(device), y_val.to(device)
    x_test, y_test = split.x_test.to(device), split.y_test.to(device)
    if args.mode != "full":
        width = cfg["e1_width"] if args.figure == "e1" else cfg["width"]
        steps = cfg["e1_steps"] if args.figure == "e1" else cfg["steps"]
        print(f"[{args.mode} mode] REDUCED budget: {len(x_fit)} fitting / {len(x_val)} validation / {len(x_test)} "
              f"test images, {cfg['depth'] + 1}-layer ReLU MLP of width {width}, {steps} steps of batch "
              f"{cfg['batch']} (paper E1: 60k images, 40 epochs)")

    def make_model(seed: int, width: int | None = None) -> torch.nn.Module:
        torch.manual_seed(seed)
        return mlp(x_fit.shape[1], width or cfg["width"], cfg["depth"], split.num_classes,
                   activation="relu").to(device)

    x_eval, y_eval = x_fit[:cfg["num_eval"]], y_fit[:cfg["num_eval"]]

    def evaluate_fn(model: torch.nn.Module, phase: str) -> dict[str, float]:
        xh, yh = (x_val, y_val) if phase == "val" else (x_test, y_test)   # the test set only in the final re-runs
        with capture.paused():
            loss, acc = evaluate(model, xh, yh, "classification")
            return {"train_loss": evaluate(model, x_eval, y_eval, "classification")[0], f"{phase}_loss": loss,
                    f"{phase}_accuracy": acc}

    if args.figure == "e1":
        return e1_heatmap(args, cfg, name, make_model, x_fit, y_fit, evaluate_fn)
    runs = TracedRuns(make_model, x_fit, y_fit, evaluate_fn, loss="cross_entropy", loss_fn=F.cross_entropy,
                      batch_size=cfg["batch"], steps=cfg["steps"], eval_every=cfg["eval_every"],
                      progress=args.mode != "tiny")
    seeds = [args.seed + k for k in range(cfg["seeds"])]
    record = fair_compare(METHODS, runs, cfg["trials"], metric="val_accuracy", direction="maximize", seeds=seeds,
                          sampler="qmc", seed=args.seed, tuning_seed=args.seed, progress=args.mode != "tiny")
    results = results_of(record, runs)
    bench = bench_chosen(tuned_methods(record), results, make_model, x_fit, y_fit, loss="cross_entropy",
                         loss_fn=F.cross_entropy, batch_size=cfg["batch"], steps=cfg["bench_steps"], seed=seeds[0])
    sgd = [t.rows[-1]["test_accuracy"] for t in results["SGD"]["traces"] if not t.diverged]
    threshold = sum(sgd) / len(sgd) if sgd else None      # the accuracy SGD reaches at the end of the budget
    rows = summary_rows(results, "SGD", "test_accuracy", False, threshold, bench)
    for row, res in zip(rows, results.values()):
        losses = [t.rows[-1]["train_loss"] for t in res["traces"]]
        row["final_train_loss"] = sum(losses) / len(losses)
    setup = {**cfg, "paper": "Petersen et al., ICLR 2023 (arXiv 2305.00604)", "mode": args.mode, "data": name,
             "num_fit": len(x_fit), "num_val": len(x_val), "num_test": len(x_test), "device": str(device),
             "threads": torch.get_num_threads(), "seeds": seeds, "threshold_test_accuracy": threshold,
             "methods": {m.name: {"space": m.space, "fixed": m.fixed} for m in METHODS}}
    fig = plot_curves(results, [("step", "test_accuracy", "test accuracy", False),
                                ("time_s", "test_accuracy", "test accuracy", False),
                                ("step", "train_loss", "train loss", True),
                                ("time_s", "train_loss", "train loss", True)],
                      f"MNIST {cfg['depth'] + 1}-layer ReLU MLP, width {cfg['width']}, batch {cfg['batch']} "
                      f"({args.mode} mode): ISAAC vs SGD vs K-FAC, each tuned with {cfg['trials']} trials", ncols=2)
    return publish_fair(args.out, "isaac_mnist_mlp", fig, record, results, rows, setup, runs, bench, COLUMNS,
                        threshold_note=f"threshold = SGD's final test accuracy = {threshold}",
                        bench_steps=cfg["bench_steps"])


def e1_heatmap(args: Any, cfg: dict[str, Any], data_name: str, make_model: Any, x_fit: torch.Tensor,
               y_fit: torch.Tensor, evaluate_fn: Any) -> dict[str, Any]:
    """E1: the two-parameter zeta over the (lambda_g, lambda_a) grid (module doc); returns the numbers.

    Per cell every lr of ``e1_lrs`` is trained on the fitting split and scored on the validation split; the best
    one is then evaluated once on the test set (the number shown)."""
    import curvlab
    from curvlab.figures import save_figure, write_numbers
    from matplotlib.figure import Figure

    steps = cfg["e1_steps"]
    train = train_fn(x_fit, y_fit, F.cross_entropy, cfg["batch"], steps, steps, lambda m: evaluate_fn(m, "val"),
                     progress=False)
    lam_gs, lam_as = list(cfg["e1_lambda_g"]), list(cfg["e1_lambda_a"])
    cells = []
    for lam_g in lam_gs:
        for lam_a in lam_as:
            start = time.process_time()
            runs = []
            for lr in cfg["e1_lrs"]:
                model = make_model(args.seed, cfg["e1_width"])
                opt = curvlab.optimizer(model, "isaac", lr=lr, damping=lam_a, isaac_lambda_g=lam_g, momentum=0.0,
                                        fisher="mc", seed=args.seed)
                trace = train(model, opt, args.seed)
                acc = trace.rows[-1]["val_accuracy"]
                runs.append({"lr": lr, "val_accuracy": -1.0 if trace.diverged or acc != acc else acc,
                             "diverged": trace.diverged, "model": model})
            best = max(runs, key=lambda r: r["val_accuracy"])
            test = evaluate_fn(best["model"], "test")
            cpu = time.process_time() - start
            cells.append({"lambda_g": lam_g, "lambda_a": lam_a, "lr": best["lr"], "val_accuracy": best["val_accuracy"],
                          "test_accuracy": test["test_accuracy"], "cpu_s": round(cpu, 2),
                          "grid": [{k: v for k, v in r.items() if k != "model"} for r in runs]})
            print(f"lambda_g={'inf' if lam_g is None else f'{lam_g:g}':>6} lambda_a={lam_a:<6g} lr={best['lr']:<5g} "
                  f"val accuracy {best['val_accuracy']:.4f}  test accuracy {test['test_accuracy']:.4f}  "
                  f"({cpu:.1f} CPU-s)", flush=True)
    acc = [[next(c["test_accuracy"] for c in cells if c["lambda_g"] == g and c["lambda_a"] == a) for g in lam_gs]
           for a in lam_as]
    fig = Figure(figsize=(1.2 * len(lam_gs) + 2.5, 0.9 * len(lam_as) + 1.8), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(acc, origin="lower", cmap="viridis", aspect="auto")
    for i, row in enumerate(acc):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(lam_gs)), ["inf (zeta*)" if g is None else f"{g:g}" for g in lam_gs], fontsize=7)
    ax.set_yticks(range(len(lam_as)), [f"{a:g}" for a in lam_as], fontsize=7)
    ax.set_xlabel("lambda_g")
    ax.set_ylabel("lambda_a")
    fig.colorbar(im, label="final test accuracy")
    ax.set_title(f"E1: zeta (eq. I.2), {cfg['depth'] + 1}-layer ReLU MLP width {cfg['e1_width']}, {steps} "
                 f"steps ({args.mode} mode)", fontsize=8)
    save_figure(fig, args.out, "isaac_e1_heatmap")
    data = {"setup": {"paper": "Petersen et al., ICLR 2023, E1", "mode": args.mode, "data": data_name,
                      "width": cfg["e1_width"], "steps": steps, "batch": cfg["batch"], "seed": args.seed,
                      "num_fit": len(x_fit), "lrs": list(cfg["e1_lrs"]),
                      "selection": "per cell, the lr with the best accuracy on the validation split carved from "
                                   "the training set; the test set is evaluated once, for that lr",
                      "cpu_s": round(sum(c["cpu_s"] for c in cells), 1)},
            "lambda_g": lam_gs, "lambda_a": lam_as, "cells": cells}
    write_numbers(args.out, "isaac_e1_heatmap", data)
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
