"""SNGM, Zhao, Xie & Li, "Stochastic Normalized Gradient Descent with Momentum for Large-Batch Training"
(arXiv 2007.13985; Sci. China Inf. Sci. 2024; ALGORITHMS.md 4): test accuracy of SNGM against momentum SGD
(MSGD) as the batch grows, at an equal epoch budget (the paper's large-batch comparison, ALGORITHMS 4.5:
SNGM keeps its accuracy at batch sizes where MSGD degrades; the paper's own tables were not retrieved, so
the shape, not numbers, is what is compared).

Setup: MNIST (a subset in quick mode) and a tanh MLP; MSGD = ``identity`` + ``natural`` and SNGM =
``identity`` + ``sngm`` (one global norm, N.1-N.3), both with momentum 0.9, no weight decay, one warm-up
epoch then a cosine decay, the same number of epochs at every batch size (so the number of steps falls as
the batch grows). Learning rates: per method and batch, the best (by final test accuracy) of a grid of
multipliers {1/4, 1/2, 1, 2, 4} (the same for both methods) around a centre ``c * sqrt(B / 256)``, with
``c = 0.3`` for MSGD and ``0.15`` for SNGM ([U]: SNGM's ``lr`` is a step length that does not scale
linearly with the batch, ALGORITHMS 4.3; MSGD's linear scaling (Goyal et al. 2017) was tried first and its
best learning rate stayed near 0.4 from batch 512 to 8192 at this scale, so both centres follow the
square root and the grid is wide). A best point on the edge of the grid is flagged in the printed table.

What agrees and what does not: see ``paper_figures/README.md`` (SNGM section) and the printed table.

Usage: ``python paper_figures/sngm.py --mode tiny|quick|full [--out DIR]``. Writes ``sngm_accuracy_vs_batch
.{txt,csv,png,pdf}``, ``sngm_best_lr.txt`` (the winning learning rate per method and batch),
``sngm.json`` and the run directories under ``OUT/sweeps`` (re-running skips finished runs).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from curvlab.experiments import run_sweep
from curvlab.experiments.ablation_report import load_configurations, metric_vs_axis
from curvlab.figures import mnist_data_config, paper_mode_parser, write_numbers

METHODS = {"MSGD": {"estimator": "identity", "rule": "natural", "momentum": 0.9},
           "SNGM": {"estimator": "identity", "rule": "sngm", "momentum": 0.9}}
#: Learning-rate centre at batch 256 and its exponent in B / 256 (1: linear scaling, 0.5: square root).
CENTRE = {"MSGD": (0.3, 0.5), "SNGM": (0.15, 0.5)}

SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {"num_train": 512, "num_test": 500, "batches": [64, 256], "epochs": 2, "lr_mult": [1.0], "width": 32},
    "quick": {"num_train": 24576, "num_test": 10000, "batches": [128, 1024, 8192], "epochs": 5,
              "lr_mult": [0.25, 0.5, 1.0, 2.0, 4.0], "width": 128},
    "full": {"num_train": None, "num_test": None, "batches": [128, 512, 2048, 8192, 32768], "epochs": 20,
             "lr_mult": [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0], "width": 256},
}




def learning_rates(method: str, batch: int, mults: list[float]) -> list[float]:
    base, power = CENTRE[method]
    return [round(base * (batch / 256) ** power * m, 6) for m in mults]


def sweeps(mode: str, data: dict[str, Any], seed: int, device: str) -> list[tuple[str, dict]]:
    """One sweep per (method, batch): the learning-rate grid, everything else fixed."""
    s = SETTINGS[mode]
    return [(f"{i}_{method}_B{batch}_s{seed}", {
        "data": data,
        "model": {"name": "mlp", "width": s["width"], "depth": 2},
        "optimizer": dict(opt),
        "train": {"epochs": s["epochs"], "seed": seed, "device": device, "warmup_epochs": 1.0,
                  "schedule": "cosine", "eval_train_examples": 0},
        "sweep": {"grid": {"train.batch_size": [batch], "optimizer.lr": learning_rates(method, batch, s["lr_mult"])},
                  "variants": [{"name": method}]},
    }) for batch in s["batches"] for i, (method, opt) in enumerate(METHODS.items())]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = paper_mode_parser(__doc__.splitlines()[0], "paper_figures_output/sngm")
    args = parser.parse_args(argv)
    s = SETTINGS[args.mode]
    data, name = mnist_data_config(args.data_dir, s["num_train"], s["num_test"])
    out = Path(args.out)
    root = out / "sweeps"
    from tqdm.auto import tqdm

    for folder, cfg in tqdm(sweeps(args.mode, data, args.seed, args.device), desc="SNGM vs MSGD",
                            disable=args.mode == "tiny"):
        result = run_sweep(cfg, root / folder, quiet=True)
        if result.failed:
            print(f"{folder}: {len(result.failed)} run(s) failed, see {root / folder}/runs/<id>/error.txt")
    acc = metric_vs_axis(root, "batch_size", "variant", "final_test_accuracy", out=out, stem="sngm_accuracy_vs_batch",
                         title=f"SNGM vs MSGD, {s['epochs']} epochs at every batch ({name}, MLP width {s['width']})")
    configs, _ = load_configurations(root)
    by_label = {c.label: c for c in configs}
    best_lr: dict[str, dict[str, Any]] = {}
    lines = [f"{'method':6s} {'batch':>6s} {'best lr':>9s}  grid"]
    for method, pts in acc.points.items():
        for batch, _, _, label in pts:
            lr = by_label[label].runs[0].config["optimizer"]["lr"]
            grid = learning_rates(str(method), int(batch), s["lr_mult"])
            edge = len(grid) > 1 and lr in (grid[0], grid[-1])
            best_lr.setdefault(str(method), {})[str(batch)] = {"lr": lr, "grid": grid, "on_edge": edge}
            lines.append(f"{method!s:6s} {batch:>6d} {lr:>9.4g}  {grid}{'  (edge of the grid)' if edge else ''}")
    print(f"\nSNGM vs MSGD on {name} (MLP width {s['width']}, {s['epochs']} epochs at every batch size):")
    print(acc.text())
    print("\n" + "\n".join(lines))
    from curvlab.experiments.io import atomic_write_text

    atomic_write_text(out / "sngm_best_lr.txt", "\n".join(lines) + "\n")
    numbers = {"paper": "Zhao, Xie & Li, arXiv 2007.13985 (SNGM vs MSGD at large batch)", "dataset": name,
               "mode": args.mode, "settings": s, "methods": METHODS, "lr_centre": CENTRE,
               "final_accuracy": {str(k): v for k, v in acc.points.items()}, "best_lr": best_lr}
    write_numbers(out, "sngm", numbers)
    print(f"\nwrote {', '.join(str(p) for p in acc.files)}, {out / 'sngm_best_lr.txt'}, {out / 'sngm.json'}")
    return numbers


if __name__ == "__main__":
    main(sys.argv[1:])
