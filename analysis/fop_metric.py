"""Ablation of FOP's projection metric (``fop_metric``, curvlab/rules/fop.py; ALGORITHMS.md 2.1 (F.2)).

FOP orthogonalizes the half-batch gradient difference against the mean gradient in a metric F; the paper does not
say whether F is the undamped curvature or the damped matrix M whose inverse preconditions [U]. This trains FOP on
K-FAC (pi-damping, MC Fisher) on scikit-learn's digits (tanh MLP 64-64-64-10, batch 256, the large-batch regime FOP
targets) with both readings and the same small lr grid, at a low and a high damping. The lr is chosen per (metric,
damping) by the mean VALIDATION accuracy (the last 20% of the training split) over the seeds; the test accuracy of
that choice is reported (mean and spread over seeds). Equal budget: same grid, seeds, batches and epochs.

Command: ``python analysis/fop_metric.py`` (about a minute per damping on one CPU thread).
"""
from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

import curvlab
from curvlab import models
from curvlab.data import batches, load_digits

LRS = (0.03, 0.1, 0.3)
DAMPINGS = (1e-3, 1e-1)
SEEDS = (0, 1, 2)
EPOCHS, BATCH = 10, 256


def run(metric: str, lr: float, damping: float, seed: int, data) -> tuple[float, float]:
    """(validation accuracy, test accuracy) after ``EPOCHS`` epochs."""
    x_tr, y_tr, x_val, y_val, x_te, y_te = data
    torch.manual_seed(seed)
    net = models.mlp(64, 64, 2, 10, activation="tanh")
    opt = curvlab.optimizer(net, "kfac", "fop", lr=lr, damping=damping, fop_metric=metric, momentum=0.0,
                            ema_decay=0.95, inv_interval=1, kl_clip=None, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for xb, yb in batches(x_tr, y_tr, BATCH, generator=gen):
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
    opt.capture.remove()
    with torch.no_grad():
        acc = [float((net(x).argmax(1) == y).float().mean()) for x, y in ((x_val, y_val), (x_te, y_te))]
    return acc[0] if all(torch.isfinite(p).all() for p in net.parameters()) else 0.0, acc[1]


def main() -> int:
    torch.set_num_threads(1)
    split = load_digits(seed=0)
    n_val = len(split.x_train) // 5
    data = (split.x_train[:-n_val], split.y_train[:-n_val], split.x_train[-n_val:], split.y_train[-n_val:],
            split.x_test, split.y_test)
    print(f"FOP on K-FAC, digits MLP 64-64-64-10, batch {BATCH}, {EPOCHS} epochs, seeds {SEEDS}, lr grid {LRS}; "
          "lr chosen on validation accuracy")
    for damping in DAMPINGS:
        for metric in ("undamped", "damped"):
            grid = {lr: [run(metric, lr, damping, s, data) for s in SEEDS] for lr in LRS}
            best = max(LRS, key=lambda lr: statistics.mean(v for v, _ in grid[lr]))
            test = [t for _, t in grid[best]]
            vals = "  ".join(f"lr {lr:g}: val {statistics.mean(v for v, _ in grid[lr]):.4f}" for lr in LRS)
            print(f"damping {damping:g}  fop_metric={metric:<9} chosen lr {best:g}: test accuracy "
                  f"{statistics.mean(test):.4f} (min {min(test):.4f}, max {max(test):.4f})   [{vals}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
