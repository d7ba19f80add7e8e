"""Estimators on modular arithmetic (the grokking setup of Power et al. 2022): steps to 99% validation accuracy.

A 2-layer causal transformer (``transformer_lm``, ``pool="last"``, attention converted by ``curvlab.nn.convert``)
learns ``(a + b) mod p`` from a fraction of the table, full batch, decoupled weight decay. Every method gets the
SAME budget: the same number of steps and the same 3-point learning-rate grid around its own suggested lr
(x 0.3, 1, 3; AdamW around 1e-3), and every grid point is reported (the figure shows them all): no selection
is made on the validation split, the table's "best" column is the minimum over the grid for every method alike.
Validation here is the held-out part of the table (there is no separate test set in this task).

    OMP_NUM_THREADS=2 python analysis/modular.py --mode quick --out out/modular     # ~10 minutes on 2 cores
    python analysis/modular.py --mode tiny --out /tmp/modular                       # seconds (the test suite)

Writes ``modular.png``/``.pdf`` (validation accuracy over steps, one panel per method) and ``modular.json``;
``modular_runs.json`` keeps every finished run, so a killed script resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import curvlab  # noqa: E402
from curvlab.experiments.sequences import load_modular  # noqa: E402
from curvlab.experiments.traces import time_to_threshold, train_traced  # noqa: E402
from curvlab.figures import paper_mode_parser, save_figure, write_numbers  # noqa: E402
from curvlab.transformer_models import build_transformer_lm  # noqa: E402

PRESETS = {
    "tiny": {"p": 7, "steps": 6, "eval_every": 3, "scales": [1.0], "d_model": 16, "methods": ["identity", "kfac"]},
    "quick": {"p": 23, "steps": 800, "eval_every": 20, "scales": [0.3, 1.0, 3.0], "d_model": 64,
              "methods": ["adamw", "identity", "kfac", "shampoo", "miniblock", "isaac"]},
    "full": {"p": 97, "steps": 5000, "eval_every": 50, "scales": [0.3, 1.0, 3.0], "d_model": 128,
             "methods": ["adamw", "identity", "kfac", "shampoo", "miniblock", "isaac"]},
}
WEIGHT_DECAY = 0.03
TARGET = 0.99


def make_optimizer(method: str, model: torch.nn.Module, scale: float, seed: int):
    if method == "adamw":
        lr = 1e-3 * scale
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1.0, betas=(0.9, 0.98)), lr
    hyper = dict(curvlab.ESTIMATORS.get(method).suggested)
    hyper["lr"] = lr = hyper["lr"] * scale
    return curvlab.optimizer(model, method, "natural", weight_decay=WEIGHT_DECAY, weight_decay_style="decoupled",
                             seed=seed, **hyper), lr


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad(), curvlab.capture.paused():
        return float((model(x).argmax(-1) == y).float().mean())


def run(method: str, scale: float, split, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_transformer_lm(tuple(split.x_train.shape[1:]), split.num_classes, vocab_size=split.vocab_size,
                                 d_model=cfg["d_model"], nhead=4, num_layers=2, pool="last")
    opt, lr = make_optimizer(method, model, scale, seed)

    def evaluate(m):
        return {"train_accuracy": accuracy(m, split.x_train, split.y_train),
                "val_accuracy": accuracy(m, split.x_test, split.y_test)}

    trace = train_traced(model, opt, split.x_train, split.y_train, loss_fn=F.cross_entropy,
                         batch_size=len(split.x_train), steps=cfg["steps"], eval_every=cfg["eval_every"],
                         evaluate=evaluate, seed=seed, progress=True, desc=f"{method} lr {lr:.3g}")
    steps = [r["step"] for r in trace.rows]
    val = [r["val_accuracy"] for r in trace.rows]
    return {"method": method, "lr": lr, "diverged": trace.diverged, "steps": steps, "val_accuracy": val,
            "train_accuracy": [r["train_accuracy"] for r in trace.rows],
            "steps_to_99": time_to_threshold(steps, val, TARGET, below=False),
            "train_steps_to_99": time_to_threshold(steps, [r["train_accuracy"] for r in trace.rows], TARGET,
                                                   below=False),
            "step_ms": 1e3 * trace.median_step_s if trace.step_times else math.nan,
            "final_val_accuracy": val[-1]}


def plot(runs: list[dict[str, Any]], methods: list[str], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.0), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for r in (r for r in runs if r["method"] == method):
            line, = ax.plot(r["steps"], r["val_accuracy"], label=f"lr {r['lr']:.2g}")
            ax.plot(r["steps"], r["train_accuracy"], ls=":", color=line.get_color(), lw=1)
        ax.axhline(TARGET, color="grey", lw=0.5)
        ax.set_title(method)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("accuracy (solid: validation, dotted: train)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out, "modular")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = paper_mode_parser(__doc__.split("\n\n")[0], "out/modular")
    p.add_argument("--methods", default=None, help="comma-separated (default by mode)")
    args = p.parse_args(argv)
    cfg = dict(PRESETS[args.mode])
    methods = args.methods.split(",") if args.methods else cfg["methods"]
    split = load_modular(p=cfg["p"], train_fraction=0.5, seed=args.seed)
    out = Path(args.out)
    partial = out / "modular_runs.json"                  # one entry per finished run: a killed script resumes
    done = {(r["method"], r["scale"]): r for r in (json.loads(partial.read_text()) if partial.exists() else [])
            if r.get("mode") == args.mode}
    runs = []
    for m in methods:
        for s in cfg["scales"]:
            r = done.get((m, s)) or {**run(m, s, split, cfg, args.seed), "scale": s, "mode": args.mode}
            runs.append(r)
            write_numbers(out, "modular_runs", list({(x["method"], x["scale"]): x
                                                     for x in [*done.values(), *runs]}.values()))
    print(f"\n(a + b) mod {cfg['p']}, train on {len(split.x_train)} of {len(split.x_train) + len(split.x_test)} "
          f"equations, full batch, {cfg['steps']} steps, lr grid x {cfg['scales']}")
    print(f"{'method':<10} {'lr':>8} {'train->99%':>11} {'val->99%':>9} {'final val':>9} {'step ms':>8}")
    for r in runs:
        fmt = lambda v: "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.0f}"
        print(f"{r['method']:<10} {r['lr']:>8.3g} {fmt(r['train_steps_to_99']):>11} {fmt(r['steps_to_99']):>9} "
              f"{r['final_val_accuracy']:>9.3f} {r['step_ms']:>8.1f}{'  diverged' if r['diverged'] else ''}")
    plot(runs, methods, out, f"(a+b) mod {cfg['p']}, 2-layer transformer, {cfg['steps']} full-batch steps")
    numbers = {"mode": args.mode, "config": {**cfg, "weight_decay": WEIGHT_DECAY, "target": TARGET,
                                             "seed": args.seed, "methods": methods}, "runs": runs}
    write_numbers(out, "modular", numbers)
    print(f"wrote {out}/modular.png, .pdf, .json")
    return numbers


if __name__ == "__main__":
    main()
