"""Defaults that train: every estimator x rule built with NO hyper-parameters, on MNIST (and digits).

``curvlab.optimizer(model, estimator, rule, scaling)`` and nothing else (README "Defaults"), trained with the plain
loop; one row per (data, model, estimator, rule, scaling): train and test accuracy after the last epoch, skipped
steps, whether ``curvlab.Diverged`` stopped the run, and the wall time.

    python analysis/defaults.py --quick --out out/defaults     # MNIST 10k, 1 epoch, MLP 784-256-10 and the small CNN
    python analysis/defaults.py --out out/defaults             # the same, 2 epochs
    python analysis/defaults.py --digits --out out/defaults    # digits, 3 epochs: the full cross product that
                                                               # tests/test_defaults_train.py samples, plus muP
    python analysis/defaults.py --digits --set all --plugins   # README "The result": the three digits sets
    python analysis/defaults.py --digits --set all --plugins --estimators miniblock --what-if miniblock:kl_clip=3e-4

On digits, ``--set`` picks the models (README "Defaults", "The result"): ``test`` (the four of
tests/test_defaults_train.py, the default), ``first`` (those four and two more), ``second`` (seven more models and
batch sizes: 32-256, 1-3 hidden layers, the CNN at batch 32 and 256), ``mse`` (three models trained on MSE against
one-hot targets with ``loss="mse"``, the one option the defaults ask for), or ``all`` (first + second + mse).
``--plugins`` adds registered plugin estimators and rules (built-ins only by default); ``--estimators`` /
``--rules`` / ``--scalings`` / ``--models`` (substrings of the model names) restrict the grid; under ``mup`` every
rule is tried and the ones muP refuses are listed as refused, not counted. ``--tiny`` runs two cases on a few
batches (the test suite). Writes ``defaults.json`` (or ``defaults_digits[_SET].json``) in ``--out``. Set
``OMP_NUM_THREADS`` to the cores you have.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import curvlab  # noqa: E402
from curvlab.data import batches, load_digits, load_mnist  # noqa: E402
from curvlab.figures import DEFAULT_MNIST, write_numbers  # noqa: E402
from curvlab.models import mlp, small_cnn  # noqa: E402

BUILTIN = {"estimator": ["identity", "isaac", "kfac", "miniblock", "shampoo"],
           "rule": ["natural", "fop", "sngm", "qmodel"]}
#: (model name, builder(side) -> module, batch size[, loss]) per data set; MLPs take flat inputs, the CNN images;
#: the loss is "cross_entropy" unless a fourth entry says "mse"
Model = tuple  # (str, Callable[[int], torch.nn.Module], int) or (..., str)
MNIST_MODELS: list[Model] = [
    ("mlp 784-256-10", lambda side: mlp(side * side, 256, 1, 10, activation="relu"), 64),
    ("small_cnn 16", lambda side: small_cnn(1, 16, 10, image_size=side), 64),
]


def _relu(*widths: int) -> Callable[[int], torch.nn.Module]:
    return lambda side: mlp(64, widths[0], len(widths), 10, activation="relu")


def _tanh(*widths: int) -> Callable[[int], torch.nn.Module]:
    return lambda side: mlp(64, widths[0], len(widths), 10, activation="tanh")


def _cnn(side: int) -> torch.nn.Module:
    return small_cnn(1, 16, 10, image_size=side)


DIGITS_MODELS: list[Model] = [   # tests/test_defaults_train.py
    ("relu 64-128-128-10", _relu(128, 128), 64),
    ("tanh 64-32-10", _tanh(32), 32),
    ("relu 64-512-10", _relu(512), 256),
    ("small_cnn 16", _cnn, 64),
]
#: the digits model sets of README "Defaults" ("The result")
DIGITS_SETS: dict[str, list[Model]] = {
    "test": DIGITS_MODELS,
    "first": DIGITS_MODELS + [("tanh 64-64-64-64-10", _tanh(64, 64, 64), 128), ("relu 64-256-10", _relu(256), 32)],
    "second": [("relu 64-32-10", _relu(32), 128), ("tanh 64-512-10", _tanh(512), 64),
               ("relu 64-64-64-64-10", _relu(64, 64, 64), 256), ("tanh 64-128-128-10", _tanh(128, 128), 32),
               ("small_cnn 16", _cnn, 256), ("small_cnn 16", _cnn, 32), ("relu 64-256-256-10", _relu(256, 256), 64)],
    "mse": [("relu 64-128-128-10", _relu(128, 128), 64, "mse"), ("tanh 64-32-10", _tanh(32), 32, "mse"),
            ("small_cnn 16", _cnn, 128, "mse")],
}
DIGITS_SETS["all"] = DIGITS_SETS["first"] + DIGITS_SETS["second"] + DIGITS_SETS["mse"]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, shape) -> float:
    with torch.no_grad(), curvlab.capture.paused():
        hits = sum(int((model(shape(x[i:i + 2048])).argmax(1) == y[i:i + 2048]).sum()) for i in range(0, len(x), 2048))
    return hits / len(x)


def run_case(split, side: int, model_name: str, build, batch_size: int, estimator: str, rule: str, scaling: str,
             epochs: int, seed: int = 0, max_steps: int | None = None, loss: str = "cross_entropy") -> dict[str, Any]:
    """One training run with the defaults; a construction refusal or a divergence is a row, not an exception.

    ``loss="mse"`` trains on ``F.mse_loss`` against one-hot targets and passes ``loss="mse"`` (nothing else)."""
    row: dict[str, Any] = {"data": split.name, "model": model_name, "batch": batch_size, "estimator": estimator,
                           "rule": rule, "scaling": scaling, "loss": loss, "epochs": epochs}
    torch.manual_seed(seed)
    model = build(side)
    images = isinstance(model[0], torch.nn.Conv2d)
    shape = (lambda x: x.reshape(-1, 1, side, side)) if images else (lambda x: x)
    if loss == "mse":
        def objective(out, y):
            return F.mse_loss(out, F.one_hot(y, out.shape[1]).to(out.dtype))
    else:
        objective = F.cross_entropy
    try:
        opt = curvlab.optimizer(model, estimator, rule, scaling, **({"loss": loss} if loss != "cross_entropy" else {}))
    except ValueError as err:
        return {**row, "status": "refused", "reason": str(err).splitlines()[0]}
    row["defaults"] = {k: v for k, v in opt.component_defaults.items()}
    gen = torch.Generator().manual_seed(seed)
    start, steps, status, reason = time.perf_counter(), 0, "ok", None
    try:
        for _ in range(epochs):
            for xb, yb in batches(split.x_train, split.y_train, batch_size, generator=gen):
                opt.zero_grad()
                objective(model(shape(xb)), yb).backward()
                opt.step()
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
    except curvlab.Diverged as err:
        status, reason = "diverged", str(err).splitlines()[0]
    wall = time.perf_counter() - start
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {**row, "status": status if finite else "non-finite", "reason": reason, "steps": steps,
            "skipped": opt.skipped_steps, "wall_s": round(wall, 2),
            "train_acc": accuracy(model, split.x_train, split.y_train, shape) if finite else math.nan,
            "test_acc": accuracy(model, split.x_test, split.y_test, shape) if finite else math.nan}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'data':<7} {'model':<19} {'b':>4} {'loss':<4} {'estimator':<10} {'rule':<8} {'scaling':<8} " \
           f"{'train':>6} {'test':>6} {'skip':>4} {'wall s':>7}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "refused":
            acc = f"{'-':>6} {'-':>6} {'-':>4} {'-':>7}"
        else:
            acc = f"{r['train_acc']:>6.3f} {r['test_acc']:>6.3f} {r['skipped']:>4} {r['wall_s']:>7.1f}"
        lines.append(f"{r['data']:<7} {r['model']:<19} {r['batch']:>4} {r.get('loss', 'cross_entropy')[:4]:<4} "
                     f"{r['estimator']:<10} {r['rule']:<8} "
                     f"{r['scaling']:<8} {acc}  {r['status']}")
    ran = [r for r in rows if r["status"] != "refused"]
    if ran:
        bad = [r for r in ran if r["status"] != "ok" or r["skipped"] or not r["train_acc"] >= 0.9]
        lines.append(f"{len(ran) - len(bad)}/{len(ran)} runs reach 90% train accuracy without a skipped step; "
                     f"lowest train accuracy {min(r['train_acc'] for r in ran):.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 epoch instead of 2 (MNIST)")
    p.add_argument("--digits", action="store_true", help="digits, 3 epochs, the test's four models, also muP")
    p.add_argument("--set", default="test", choices=sorted(DIGITS_SETS),
                   help="digits model set (README 'Defaults'): test, first, second, mse or all")
    p.add_argument("--models", default=None, help="comma-separated substrings of model names (e.g. 'cnn,64-32-10')")
    p.add_argument("--tiny", action="store_true", help="two cases, a few steps (for the test suite)")
    p.add_argument("--out", default="defaults_output")
    p.add_argument("--data-dir", default=None, help=f"directory with the four MNIST IDX files (default {DEFAULT_MNIST})")
    p.add_argument("--num-train", type=int, default=10000)
    p.add_argument("--plugins", action="store_true", help="include registered plugin estimators and rules")
    p.add_argument("--estimators", default=None, help="comma-separated subset")
    p.add_argument("--rules", default=None, help="comma-separated subset")
    p.add_argument("--scalings", default=None, help="comma-separated (default: standard; --digits: standard, mup)")
    p.add_argument("--what-if", action="append", default=[], metavar="EST:KEY=VALUE",
                   help="measure a candidate default: set the estimator's declared default KEY to VALUE (JSON) for "
                        "this run, e.g. miniblock:kl_clip=3e-4 (repeatable)")
    args = p.parse_args(argv)
    for spec in args.what_if:
        est, _, assignment = spec.partition(":")
        key, _, value = assignment.partition("=")
        if not key or not value or est not in curvlab.ESTIMATORS.names():
            p.error(f"--what-if {spec!r}: expected ESTIMATOR:KEY=VALUE with a registered estimator "
                    f"({', '.join(curvlab.ESTIMATORS.names())})")
        cls = curvlab.ESTIMATORS.get(est)
        cls.defaults = {**cls.defaults, key: json.loads(value)}     # this process only
    warnings.simplefilter("ignore", UserWarning)
    estimators = curvlab.ESTIMATORS.names() if args.plugins else BUILTIN["estimator"]
    rules = curvlab.RULES.names() if args.plugins else BUILTIN["rule"]
    estimators = args.estimators.split(",") if args.estimators else estimators
    rules = args.rules.split(",") if args.rules else rules
    if args.digits or args.tiny:
        split, side, models, epochs = load_digits(seed=0), 8, DIGITS_SETS[args.set], 3
    else:
        data_dir = args.data_dir or (DEFAULT_MNIST if DEFAULT_MNIST.is_dir() else None)
        if data_dir is None:
            p.error(f"no MNIST directory at {DEFAULT_MNIST}: pass --data-dir (or use --digits)")
        split = load_mnist(data_dir, num_train=args.num_train)
        side, models, epochs = 28, MNIST_MODELS, 1 if args.quick else 2
    scalings = args.scalings.split(",") if args.scalings else (["standard", "mup"] if args.digits else ["standard"])
    if args.models:
        keys = args.models.split(",")
        models = [m for m in models if any(k in f"{m[0]}/{m[2]}" for k in keys)]
    cases = [(m, e, r, s) for m in models for e in estimators for r in rules for s in scalings]
    max_steps = None
    if args.tiny:
        cases, max_steps = [(models[1], "kfac", "natural", "standard"), (models[1], "identity", "sngm", "standard")], 3
    rows = []
    for (name, build, batch, *loss), est, rule, scaling in cases:
        rows.append(run_case(split, side, name, build, batch, est, rule, scaling, epochs, max_steps=max_steps,
                             loss=loss[0] if loss else "cross_entropy"))
        print(table(rows[-1:]).splitlines()[2], flush=True)
    print()
    print(table(rows))
    stem = "defaults" if not (args.digits or args.tiny) else \
        "defaults_digits" + ("" if args.set == "test" or args.tiny else f"_{args.set}")
    path = write_numbers(Path(args.out), stem, {"epochs": epochs, "rows": rows})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
