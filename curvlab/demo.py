"""``curvlab demo``: K-FAC natural gradient vs. momentum SGD on the digits data set.

Both methods train the same MLP (64 -> 64 -> tanh -> 64 -> tanh -> 10, same
initialization and batch order by seed) for the same number of epochs with the
plain loop ``zero_grad / loss.backward() / step``.  The demo prints a result
table and writes ``results.json`` and ``curves.png`` into ``--out``.

:func:`run_method` trains one method and is meant to be reused by larger
ablations.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curvlab.data import Split, batches, load_digits
from curvlab.models import mlp

__all__ = ["HYPERPARAMETERS", "TARGET_ACCURACY", "main", "make_demo_model", "run_method"]

#: Test accuracy whose first epoch is reported as "epochs to target".
TARGET_ACCURACY = 0.95

#: Epochs at which the table compares test accuracy side by side (equal epochs for every method).
CHECKPOINTS = (1, 2, 5)

#: Chosen by final validation accuracy (a stratified 25% of the TRAIN part, mean of two
#: split seeds, 20 epochs, batch 64; the test part was not used).  Grids, momentum 0.9 and
#: ema_decay 0.95 fixed: K-FAC lr {0.01,0.02,0.03,0.05,0.1,0.2,0.3} x damping {0.01,0.03,0.1,0.3}
#: at inv_interval 5, then inv_interval {1,5,10}; SGD lr {0.01,0.02,0.03,0.05,0.07,0.1,0.15,0.2,0.3}.
#: K-FAC diverges for lr/damping >~ 1 (the damped natural step is large once the Fisher shrinks).
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "kfac": {
        "estimator": "kfac", "rule": "natural", "lr": 0.01, "damping": 0.03,
        "momentum": 0.9, "ema_decay": 0.95, "stat_interval": 1, "inv_interval": 5,
    },
    "sgd": {"estimator": "identity", "rule": "natural", "lr": 0.05, "momentum": 0.9},
}


def build_optimizer(model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    """Build a curvlab optimizer for ``model`` from a :data:`HYPERPARAMETERS` entry."""
    import curvlab

    return curvlab.optimizer(model, **hparams)


def make_demo_model(split: Split, seed: int) -> nn.Sequential:
    """The demo MLP, initialized deterministically from ``seed``."""
    torch.manual_seed(seed)
    return mlp(split.num_features, 64, 2, split.num_classes, activation="tanh")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, without curvature capture."""
    from curvlab import capture

    was_training = model.training
    model.eval()
    try:
        with capture.paused():
            logits = model(x)
    finally:
        model.train(was_training)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(dim=1) == y).double().mean().item()
    return loss, acc


def run_method(
    name: str,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    split: Split,
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
    make_model: Callable[[Split, int], nn.Module] = make_demo_model,
) -> dict[str, Any]:
    """Train a fresh model with one optimizer and record per-epoch metrics.

    Args:
        name: label of the method (progress bar, results).
        make_optimizer: builds the optimizer for the model it is given.
        split: data to train on (train part) and evaluate on (test part).
        epochs: passes over the training set.
        batch_size: minibatch size.
        seed: seeds the model initialization and the batch order, so methods
            run with the same seed see the same model and the same batches.
        progress: show a tqdm bar (epoch, train loss, test accuracy).
        make_model: ``(split, seed) -> model``; defaults to the demo MLP.

    Returns:
        A JSON-serializable dict with per-epoch ``train_loss``, ``test_loss``,
        ``test_accuracy``, ``epoch_time_s`` lists, the ``mean_step_ms`` of an
        optimization step (zero_grad + forward + backward + step) and a
        ``summary`` (see :func:`summarize`).
    """
    from tqdm.auto import tqdm

    model = make_model(split, seed)
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {
        "train_loss": [], "test_loss": [], "test_accuracy": [], "epoch_time_s": []
    }
    step_times: list[float] = []
    bar = tqdm(range(1, epochs + 1), desc=f"{name:>5}", disable=not progress, leave=True)
    for _epoch in bar:
        model.train()
        start = time.perf_counter()
        for xb, yb in batches(split.x_train, split.y_train, batch_size, generator=generator):
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            step_times.append(time.perf_counter() - t0)
        history["epoch_time_s"].append(time.perf_counter() - start)
        train_loss, _ = evaluate(model, split.x_train, split.y_train)
        test_loss, test_acc = evaluate(model, split.x_test, split.y_test)
        history["train_loss"].append(train_loss)
        history["test_loss"].append(test_loss)
        history["test_accuracy"].append(test_acc)
        bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{test_acc:.3f}")
    bar.close()
    result: dict[str, Any] = {
        "name": name,
        "history": history,
        "mean_step_ms": 1e3 * sum(step_times) / max(len(step_times), 1),
        "steps": len(step_times),
    }
    result["summary"] = summarize(result)
    return result


def summarize(result: dict[str, Any], target: float = TARGET_ACCURACY) -> dict[str, Any]:
    """Final/best test accuracy, first epoch reaching ``target`` (or None), final train loss."""
    acc = result["history"]["test_accuracy"]
    reached = next((i + 1 for i, a in enumerate(acc) if a >= target), None)
    losses = result["history"]["train_loss"]
    return {
        "accuracy_at_epoch": {e: acc[e - 1] for e in CHECKPOINTS if e <= len(acc)},
        "final_test_accuracy": acc[-1] if acc else math.nan,
        "best_test_accuracy": max(acc) if acc else math.nan,
        "epochs_to_target": reached,
        "final_train_loss": losses[-1] if losses else math.nan,
        "mean_step_ms": result["mean_step_ms"],
    }


def format_table(results: dict[str, dict[str, Any]], baseline: str = "sgd") -> str:
    """A plain-text table of the summaries, step time relative to ``baseline``."""
    base_ms = results[baseline]["summary"]["mean_step_ms"] if baseline in results else None
    checkpoints = [e for e in CHECKPOINTS if all(e in r["summary"]["accuracy_at_epoch"] for r in results.values())]
    header = ("method", *(f"acc@ep{e}" for e in checkpoints), "final acc", "best acc",
              f"ep->{TARGET_ACCURACY:.0%}", "train loss", "step ms", f"x {baseline}")
    rows = [header]
    for name, res in results.items():
        s = res["summary"]
        rel = s["mean_step_ms"] / base_ms if base_ms else math.nan
        rows.append((
            name, *(f"{s['accuracy_at_epoch'][e]:.4f}" for e in checkpoints),
            f"{s['final_test_accuracy']:.4f}", f"{s['best_test_accuracy']:.4f}",
            "-" if s["epochs_to_target"] is None else str(s["epochs_to_target"]),
            f"{s['final_train_loss']:.4f}", f"{s['mean_step_ms']:.2f}", f"{rel:.2f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_curves(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Save test accuracy and train loss vs. epoch for every method to ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for name, res in results.items():
        hist = res["history"]
        epochs = range(1, len(hist["test_accuracy"]) + 1)
        ax_acc.plot(epochs, hist["test_accuracy"], marker="o", ms=3, label=name)
        ax_loss.plot(epochs, hist["train_loss"], marker="o", ms=3, label=name)
    ax_acc.axhline(TARGET_ACCURACY, color="gray", ls="--", lw=0.8)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy (digits)")
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title="Train loss (digits)")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.savefig(path, dpi=120)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo."""
    parser = argparse.ArgumentParser(
        prog="curvlab demo",
        description="Train the same MLP on the digits data set with K-FAC and SGD and compare.",
    )
    parser.add_argument("--epochs", type=_positive_int, default=20, help="epochs per method")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="minibatch size")
    parser.add_argument("--seed", type=int, default=0, help="split, init and batch-order seed")
    parser.add_argument("--out", default="demo_output", help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; print the table, write ``results.json``/``curves.png``; return results."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = load_digits(seed=args.seed)
    start = time.perf_counter()
    methods: dict[str, dict[str, Any]] = {}
    for name, hparams in HYPERPARAMETERS.items():
        res = run_method(
            name, lambda model, hp=hparams: build_optimizer(model, **hp), split,
            args.epochs, args.batch_size, args.seed, progress=not args.quiet,
        )
        res["hyperparameters"] = dict(hparams)
        methods[name] = res
    total = time.perf_counter() - start
    results = {
        "dataset": split.name, "num_train": split.num_train, "num_test": split.num_test,
        "model": "mlp(64, width=64, depth=2, 10, tanh)", "epochs": args.epochs,
        "batch_size": args.batch_size, "seed": args.seed, "target_accuracy": TARGET_ACCURACY,
        "total_time_s": total, "methods": methods,
    }
    print(f"digits: {split.num_train} train / {split.num_test} test, {args.epochs} epochs, "
          f"batch size {args.batch_size}, seed {args.seed} ({total:.1f} s)")
    print(format_table(methods))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_curves(methods, out / "curves.png")
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
