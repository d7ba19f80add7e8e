"""Shared test helpers: comparisons that print the offending entries on failure, small models."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_FN = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 1e-10, atol: float = 1e-12,
                 what: str = "tensor", show: int = 5) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` entrywise; on failure list the worst entries."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bool(bad.any()):
        flat = diff.flatten()
        worst = flat.argsort(descending=True)[:show]
        lines = [f"{what}: {int(bad.sum())}/{bad.numel()} entries off (rtol={rtol}, atol={atol}); worst:"]
        for k in worst.tolist():
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), diff.shape))
            lines.append(f"  at {idx}: actual {actual[idx].item():.6e}  expected {expected[idx].item():.6e}  "
                         f"|diff| {diff[idx].item():.3e}")
        raise AssertionError("\n".join(lines))


def assert_blocks_close(blocks: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], **kw) -> None:
    assert set(blocks) == set(reference), f"layers {sorted(blocks)} != reference {sorted(reference)}"
    for name in blocks:
        scale = float(reference[name].abs().max())
        assert_close(blocks[name], reference[name], atol=kw.get("atol", 1e-12) * max(scale, 1.0),
                     rtol=kw.get("rtol", 1e-10), what=f"block {name!r}")


def one_step_blocks(model, x, y, loss="cross_entropy", fisher="type2", estimator="kfac", **hyper):
    """Blocks of ``estimator`` after one plain forward/backward on (x, y) with ema_decay=0."""
    import curvlab

    opt = curvlab.optimizer(model, estimator, "natural", loss=loss, fisher=fisher, ema_decay=0.0, **hyper)
    LOSS_FN[loss](model(x), y).backward()
    assert opt.update_curvature()
    blocks = opt.blocks()
    opt.capture.remove()
    model.zero_grad()
    return blocks, opt


DIGITS_MODELS = {   # name -> (builder arguments, input reshape)
    "mlp": (("mlp", (64, 64, 2, 10), {"activation": "tanh"}), lambda x: x),
    "cnn": (("small_cnn", (1, 8, 10), {"image_size": 8}), lambda x: x.reshape(-1, 1, 8, 8)),
}


def train_digits(estimator, epochs, model="mlp", seed=0, rule="natural", batch_size=64, **hyper):
    """Train a digits model with the plain loop; returns (test accuracy, optimizer). Parameters must stay finite."""
    import curvlab
    from curvlab import models
    from curvlab.data import load_digits

    split = load_digits(seed=0)
    (builder, args, kwargs), shape = DIGITS_MODELS[model]
    torch.manual_seed(seed)
    net = getattr(models, builder)(*args, **kwargs)
    opt = curvlab.optimizer(net, estimator, rule, **hyper)
    fit(net, opt, split, batch_size, epochs, shape, seed)
    with torch.no_grad():
        acc = (net(shape(split.x_test)).argmax(1) == split.y_test).float().mean().item()
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    return acc, opt


def fit(net, opt, split, batch_size, epochs, shape=lambda x: x, seed=0, objective=None) -> None:
    """The plain loop (zero_grad, loss backward, step) over ``epochs`` seeded epochs of ``split``.

    ``objective(output, labels)`` is the loss (default: cross-entropy)."""
    from curvlab.data import batches

    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for xb, yb in batches(split.x_train, split.y_train, batch_size, generator=gen):
            opt.zero_grad()
            (objective or F.cross_entropy)(net(shape(xb)), yb).backward()
            opt.step()


def load_paper_script(name: str):
    """The module ``paper_figures/<name>.py`` (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "paper_figures" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"paper_figures_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_tanh_mlp(seed: int = 0) -> torch.nn.Module:
    """A 5-7-3 tanh MLP (the adaptive-damping tests' model)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def random_batches(k: int, n: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``k`` batches of ``n`` Gaussian 5-d inputs with random labels of 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(k)]
