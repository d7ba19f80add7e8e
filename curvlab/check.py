"""User-facing exactness check: each estimator block against the exact matrix from :mod:`curvlab.exact`.

``check_estimator`` builds the optimizer on a copy of the model, runs ONE plain forward/backward on the
given batch, folds the statistics (``ema_decay=0``) and compares ``opt.blocks()`` with the exact block
of the matrix the ``fisher`` type estimates: ``type2`` -> GGN, ``mc`` -> true Fisher, ``empirical`` ->
empirical Fisher. The relative error is ``||B - E||_F / ||E||_F`` per layer.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import exact
from .optim import optimizer

REFERENCE = {"type2": "ggn", "mc": "fisher", "empirical": "empirical"}
LOSS_FN = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


@dataclass(frozen=True)
class BlockError:
    layer: str
    size: int
    reference: str
    rel_error: float
    max_abs_error: float


def check_estimator(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, estimator: str = "kfac", *,
                    loss: str = "cross_entropy", fisher: str = "type2", reference: str | None = None,
                    **hyper) -> list[BlockError]:
    """Relative error of every block of ``estimator`` against the exact block (see module docstring);
    ``reference`` overrides the exact matrix ("ggn", "fisher", "empirical", "hessian")."""
    model = copy.deepcopy(model)
    opt = optimizer(model, estimator, "natural", loss=loss, fisher=fisher, ema_decay=0.0, **hyper)
    try:
        LOSS_FN[loss](model(inputs), targets).backward()
        opt.update_curvature()
        blocks = opt.blocks()
    finally:
        if opt.capture:
            opt.capture.remove()
    kind = reference or REFERENCE[fisher]
    ref = exact.exact_blocks(kind, model, inputs, targets, loss=loss, modules=list(blocks))
    rows = []
    for name, block in blocks.items():
        e = ref[name].to(block.dtype)
        diff = block - e
        rows.append(BlockError(name, block.shape[0], kind, float(diff.norm() / e.norm().clamp_min(1e-300)),
                               float(diff.abs().max())))
    return rows


def format_report(title: str, rows: list[BlockError]) -> str:
    lines = [title]
    lines += [f"  {r.layer:<10} {r.size:>5} params  vs {r.reference:<9}  rel.err {r.rel_error:9.2e}  "
              f"max|diff| {r.max_abs_error:9.2e}" for r in rows]
    return "\n".join(lines)


def default_cases(seed: int = 0):
    """Small float64 cases covering the exact identities of ALGORITHMS.md 7.2 and two approximate ones."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y_cls = torch.randint(0, 4, (32,), generator=g)
    y_reg = torch.randn(32, 3, generator=g, dtype=torch.float64)
    deep_linear = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)).double()
    tanh_mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    img = torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64)
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)).double()
    return [
        ("deep linear net, MSE, N=32 (exact)", deep_linear, x, y_reg, "mse", "type2"),
        ("tanh MLP, cross-entropy, N=1 (exact)", tanh_mlp, x[:1], y_cls[:1], "cross_entropy", "type2"),
        ("tanh MLP, empirical Fisher, N=1 (exact)", tanh_mlp, x[:1], y_cls[:1], "cross_entropy", "empirical"),
        ("tanh MLP, cross-entropy, N=32 (approximation)", tanh_mlp, x, y_cls, "cross_entropy", "type2"),
        ("tanh MLP, MC Fisher 1 sample, N=32 (approximation)", tanh_mlp, x, y_cls, "cross_entropy", "mc"),
        ("conv net (KFC), cross-entropy, N=8 (approximation)", cnn, img, y_cls[:8], "cross_entropy", "type2"),
    ]


def small_cnn_case(seed: int = 0):
    """A small float64 CNN with cross-entropy (stride and padding included) and a batch of 16 images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(16, 3)).double()
    return model, torch.randn(16, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def estimator_table(estimators: list[str] | None = None) -> str:
    """Every estimator's blocks against the exact TRUE Fisher of a small CNN (empirical Fisher for estimators that
    only estimate that, e.g. MBF). Shampoo's ``dense()`` is ``L^e (x) R^e``, a gradient second moment over time
    and not a Fisher estimate: its error says how far that preconditioner is from the Fisher, nothing more."""
    from .registry import ESTIMATORS

    model, x, y = small_cnn_case()
    lines = ["every estimator vs the exact Fisher, small CNN (conv 2->4 pad 1, conv 4->4 stride 2, linear), N=16:"]
    for name in estimators or ESTIMATORS.names():
        fisher_types = ESTIMATORS.get(name).fisher_types
        fisher = "type2" if "type2" in fisher_types else fisher_types[0]
        kind = "empirical" if fisher == "empirical" else "fisher"
        rows = check_estimator(model, x, y, name, fisher=fisher, reference=kind)
        errs = "  ".join(f"{r.layer}: {r.rel_error:8.2e}" for r in rows)
        lines.append(f"  {name:<10} (fisher={fisher:<9} vs {kind:<9}) rel.err  {errs}")
    return "\n".join(lines)


def damping_table(estimators: list[str] | None = None, threshold: float = 1.0) -> str:
    """Per estimator (its default hyper-parameters), after one statistics step and refresh on the small CNN:
    every layer's damping against its curvature's eigenvalues (:mod:`curvlab.diagnostics`), flagging layers where
    the damping exceeds ``threshold`` times the mean eigenvalue."""
    from .diagnostics import damping_report, format_damping
    from .registry import ESTIMATORS

    model, x, y = small_cnn_case()
    lines = [f"damping vs the curvature's eigenvalues (small CNN, N=16, each estimator's defaults; SWAMPED: damping > "
             f"{threshold:g} x mean eigenvalue):"]
    for name in estimators or ESTIMATORS.names():
        net = copy.deepcopy(model)
        fisher_types = ESTIMATORS.get(name).fisher_types
        opt = optimizer(net, name, "natural", fisher="type2" if "type2" in fisher_types else fisher_types[0])
        try:
            F.cross_entropy(net(x), y).backward()
            opt.update_curvature()
            opt.refresh()
            rows = damping_report(opt)
        finally:
            if opt.capture:
                opt.capture.remove()
        lines.append(f" {name} (damping={opt.param_groups[0]['damping']:g})")
        lines.append(format_damping(rows, threshold))
    return "\n".join(lines)


def run_default_check(estimator: str | None = None) -> str:
    reports = []
    for title, model, xs, ys, loss, fisher in default_cases():
        rows = check_estimator(model, xs, ys, estimator or "kfac", loss=loss, fisher=fisher)
        reports.append(format_report(f"{title}  [estimator={estimator or 'kfac'}, fisher={fisher}]", rows))
    reports.append(estimator_table([estimator] if estimator else None))
    reports.append(damping_table([estimator] if estimator else None))
    return "\n".join(reports)
