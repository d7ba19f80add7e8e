"""The muP coordinate check (ALGORITHMS.md sections 5.4 and 8; Ishikawa & Karakida, ICLR 2024, Figure 1).

A 3-layer MLP ``d_in -> M -> M -> d_out`` (ReLU) is trained a few steps on one small fixed batch at every width
``M`` (with biases by default, as the models of the width-transfer figure have them; ``bias=False`` is the
section-8 network); after each step we record the per-coordinate RMS change, against the initial network on the same batch, of

* ``input``: the input layer's pre-activation ``u = W_1 x``,
* ``hidden``: the last hidden activation ``h = relu(W_2 relu(u))``,
* ``output``: the network output ``f = W_3 h``.

Under a correct parameterization the three curves are flat in ``M`` (feature learning at every width); under the
standard parameterization some decay or grow. Defaults follow section 8 (MSE, batch 8, ``x ~ N(0, I_32)``, 4
outputs, ``lr=0.5``, K-FAC damping 1); statistics of the current batch only (``ema_decay=0``), refreshed every
step, no momentum, ``fisher="type2"`` where the estimator supports it (deterministic), float64.

Command: ``curvlab coord-check --estimator kfac --scaling mup standard --widths 64 128 256 --out DIR``.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = ("input", "hidden", "output")
LAYER_LABELS = {"input": "input pre-activation", "hidden": "last hidden activation", "output": "output"}
#: starting hyper-parameters per estimator (section 8: lr 0.5; K-FAC rho_A0 = rho_B0 = 1; Shampoo 1e-6 relative)
DEFAULTS: dict[str, dict[str, Any]] = {
    "": {"lr": 0.5, "damping": 1.0},
    "shampoo": {"damping": 1e-6},
    "miniblock": {"lr": 0.05, "damping": 1e-2},     # per-row empirical Fisher: a much larger step per lr
}


@dataclass
class CoordCheck:
    """Result of :func:`coord_check`. ``rms[layer][i][s]``: RMS change at ``widths[i]`` after step ``s + 1``
    (mean over seeds)."""

    estimator: str
    rule: str
    scaling: str
    widths: list[int]
    steps: int
    hyper: dict[str, Any]
    rms: dict[str, list[list[float]]] = field(default_factory=dict)

    def final(self, layer: str) -> list[float]:
        """RMS change after the last step, one value per width."""
        return [per_step[-1] for per_step in self.rms[layer]]

    def ratio(self, layer: str) -> float:
        """Largest over smallest final RMS change across widths (1 = perfectly flat)."""
        vals = self.final(layer)
        return max(vals) / min(vals) if min(vals) > 0 else math.inf

    def slope(self, layer: str) -> float:
        """Least-squares slope of log(final RMS change) against log(width): 0 flat, -0.5 ~ 1/sqrt(M), ..."""
        xs = [math.log(w) for w in self.widths]
        ys = [math.log(max(v, 1e-300)) for v in self.final(layer)]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den > 0 else 0.0

    def table(self) -> str:
        hyper = ", ".join(f"{k}={v}" for k, v in self.hyper.items())
        lines = [f"coord check: estimator={self.estimator} rule={self.rule} scaling={self.scaling} ({hyper}); "
                 f"RMS change per coordinate after step {self.steps}",
                 f"{'width':>9}" + "".join(f"{LAYER_LABELS[k]:>24}" for k in LAYERS)]
        for i, w in enumerate(self.widths):
            lines.append(f"{w:>9}" + "".join(f"{self.rms[k][i][-1]:>24.4e}" for k in LAYERS))
        lines.append(f"{'max/min':>9}" + "".join(f"{self.ratio(k):>24.2f}" for k in LAYERS))
        lines.append(f"{'slope':>9}" + "".join(f"{self.slope(k):>24.2f}" for k in LAYERS))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mlp3(width: int, d_in: int = 32, d_out: int = 4, bias: bool = True) -> nn.Sequential:
    """The section-8 network ``d_in -> width -> width -> d_out`` with ReLU (with biases unless ``bias=False``)."""
    return nn.Sequential(nn.Linear(d_in, width, bias=bias), nn.ReLU(), nn.Linear(width, width, bias=bias), nn.ReLU(),
                         nn.Linear(width, d_out, bias=bias))


def _features(model: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        u = model[0](x)
        h = model[3](model[2](model[1](u)))
        return {"input": u, "hidden": h, "output": model[4](h)}


def _data(seed: int, batch: int, d_in: int, d_out: int, loss: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=gen, dtype=dtype)
    if loss == "cross_entropy":
        return x, torch.randint(0, d_out, (batch,), generator=gen)
    return x, torch.randn(batch, d_out, generator=gen, dtype=dtype)


def coord_check(estimator: str = "kfac", scaling: str = "mup", widths: Sequence[int] = (64, 128, 256, 512, 1024),
                steps: int = 3, *, rule: str = "natural", d_in: int = 32, d_out: int = 4, batch: int = 8,
                loss: str = "mse", seeds: int = 1, bias: bool = True, dtype: torch.dtype = torch.float64,
                progress: bool = False, **hyper: Any) -> CoordCheck:
    """Train :func:`mlp3` for ``steps`` steps at every width and record the RMS changes (module doc).

    ``hyper`` overrides :data:`DEFAULTS` and is passed to :func:`curvlab.optimizer` (``base_width`` etc. for mup).
    Seeds ``0..seeds-1`` give the data and the initial weights; the RMS values are averaged over seeds."""
    import curvlab
    from .registry import ESTIMATORS, SCALINGS

    if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be positive integers, got {list(widths)!r}")
    if not (isinstance(steps, int) and steps >= 1) or not (isinstance(seeds, int) and seeds >= 1):
        raise ValueError(f"steps and seeds must be integers >= 1, got steps={steps!r}, seeds={seeds!r}")
    est_cls, scaling_cls = ESTIMATORS.get(estimator), SCALINGS.get(scaling)
    config: dict[str, Any] = {**DEFAULTS[""], **DEFAULTS.get(est_cls.registry_name, {})}
    config.update(momentum=0.0, ema_decay=0.0, inv_interval=1, stat_interval=1, loss=loss, kl_clip=None)  # raw step
    if "type2" in est_cls.fisher_types:
        config["fisher"] = "type2"
    config.update(hyper)
    shown = {k: v for k, v in config.items() if k in ("lr", "damping") or k in hyper}
    if "base_width" in scaling_cls.options:
        shown.setdefault("base_width", config.get("base_width", scaling_cls.options["base_width"].default))
    result = CoordCheck(est_cls.registry_name, rule, scaling_cls.registry_name, list(widths), steps, shown,
                        {k: [] for k in LAYERS})
    loss_fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    from tqdm.auto import tqdm

    for width in tqdm(list(widths), desc=f"{estimator}/{scaling}", disable=not progress, leave=False):
        acc = {k: [0.0] * steps for k in LAYERS}
        for seed in range(seeds):
            x, y = _data(seed, batch, d_in, d_out, loss, dtype)
            torch.manual_seed(10_000 + seed)
            model = mlp3(width, d_in, d_out, bias).to(dtype)
            opt = curvlab.optimizer(model, estimator, rule, scaling, **config)
            before = _features(model, x)
            for s in range(steps):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
                after = _features(model, x)
                for k in LAYERS:
                    acc[k][s] += float((after[k] - before[k]).pow(2).mean().sqrt()) / seeds
            if opt.capture is not None:
                opt.capture.remove()
        for k in LAYERS:
            result.rms[k].append(acc[k])
    return result


def plot_coord_check(results: CoordCheck | Sequence[CoordCheck], path: str | Path) -> Path:
    """One row per result, one column per layer: RMS change against width (log-log), one line per step."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

    results = [results] if isinstance(results, CoordCheck) else list(results)
    fig = Figure(figsize=(12, 3.2 * len(results)), layout="constrained")
    axes = fig.subplots(len(results), len(LAYERS), squeeze=False)
    for row, res in zip(axes, results):
        for ax, k in zip(row, LAYERS):
            for s in range(res.steps):
                ax.plot(res.widths, [v[s] for v in res.rms[k]], marker="o", label=f"step {s + 1}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("width M")
            ax.set_ylabel("RMS change per coordinate")
            ax.set_title(f"{res.estimator}/{res.rule}/{res.scaling}: {LAYER_LABELS[k]}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def main(argv: list[str] | None = None) -> int:
    """``curvlab coord-check``: run, print the tables, write ``coord_check.json`` and ``coord_check.png``."""
    p = argparse.ArgumentParser(prog="curvlab coord-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimator", default="kfac")
    p.add_argument("--rule", default="natural")
    p.add_argument("--scaling", nargs="+", default=["mup"], help="one or more scalings, run side by side")
    p.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--loss", default="mse", choices=["mse", "cross_entropy"])
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                   help="give the layers biases (default; --no-bias: none, as in section 8)")
    p.add_argument("--lr", type=float)
    p.add_argument("--damping", type=float)
    p.add_argument("--set", dest="extra", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="any other hyper-parameter, e.g. --set base_width=128 --set mup_damping=\"'trace'\"")
    p.add_argument("--out", default=None, help="directory for coord_check.json and coord_check.png")
    args = p.parse_args(argv)
    hyper = dict(args.extra)
    for key in ("lr", "damping"):
        if getattr(args, key) is not None:
            hyper[key] = getattr(args, key)
    from .registry import SCALINGS

    results = []
    for scaling in args.scaling:
        # options of another listed scaling (e.g. base_width when comparing mup with standard) go only to it
        others = {k for s in args.scaling for k in SCALINGS.get(s).options} - set(SCALINGS.get(scaling).options)
        mine = {k: v for k, v in hyper.items() if k not in others}
        res = coord_check(args.estimator, scaling, args.widths, args.steps, rule=args.rule, batch=args.batch,
                          loss=args.loss, seeds=args.seeds, bias=args.bias, progress=True, **mine)
        print(res.table(), end="\n\n")
        results.append(res)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "coord_check.json").write_text(json.dumps([r.to_dict() for r in results], indent=1))
        png = plot_coord_check(results, out / "coord_check.png")
        print(f"wrote {out / 'coord_check.json'} and {png}")
    return 0
