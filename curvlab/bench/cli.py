"""``curvlab bench``: step time of curvlab configurations over momentum SGD's, as a table and as JSON.

Examples::

    curvlab bench                                    # the target set, MLP 784-512-512-10, CPU, with the roofline
    curvlab bench --variant kfac:stat_interval=1,inv_interval=10 --batch 64,1024,8192
    curvlab bench --suite scaling --hidden 64,512,2048    # ratios against width
    curvlab bench --model cnn --json bench.json           # a small CNN on 1x28x28 inputs
    curvlab bench --model transformer --batch 32          # a causal transformer LM (the transformer set)
    curvlab bench --peers                                 # also ASDL / curvlinops / pytorch-optimizer / SINGD

Inputs are random (timing does not depend on the values); the model is seeded. Every row's ``ratio`` is the
median over interleaved rounds of the variant's step time over SGD's in the same round (with ``--model
transformer`` a ``torch AdamW`` row is timed alongside, and every row also gets its ratio to AdamW's) (see
:mod:`curvlab.bench.harness`). The JSON (``--json``) holds the environment, the settings and every row, with
schema ``curvlab.bench/1``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..experiments.io import atomic_write_json
from .harness import Variant, measure
from .roofline import format_roofline

SCHEMA = "curvlab.bench/1"

#: the target set: (batch sizes it applies to, variant spec, target ratio to SGD or None)
TARGETS: list[tuple[tuple[int, ...], str, float | None]] = [
    ((1024,), "identity/natural", None),
    ((1024,), "kfac:fisher=empirical,stat_interval=10,inv_interval=10", 1.5),
    ((1024,), "kfac:fisher=empirical,stat_interval=1,inv_interval=10", 2.2),
    ((1024,), "kfac/fop:fisher=empirical,stat_interval=10,inv_interval=10", None),
    ((1024,), "miniblock:fisher=empirical,stat_interval=10,inv_interval=10", 4.0),
    ((1024,), "miniblock:fisher=empirical,stat_interval=10,inv_interval=10,miniblock_size=16", 2.0),
    ((1024,), "miniblock:fisher=empirical,stat_interval=10,inv_interval=10,miniblock_size=1", None),
    ((1024,), "shampoo:inv_interval=100", 1.8),
    ((1024,), "shampoo:inv_interval=10", None),
    ((1024,), "identity/sngm", 1.05),
    # robust by default (curvlab.quadratic, curvlab.damping): the exact quadratic model's step and LM damping
    ((1024,), "identity/qmodel", None),
    ((1024,), "kfac/qmodel:fisher=empirical,stat_interval=1,inv_interval=10", None),
    ((1024,), "kfac:fisher=empirical,stat_interval=1,inv_interval=10,damping_adapt=lm", None),
    ((64, 128), "identity/natural", None),
    ((64, 128), "isaac:isaac_fused=True", None),
    ((64, 128), "isaac:stat_interval=1,inv_interval=1", None),
]
ISAAC_TARGETS = {64: 1.2, 128: 1.3}
#: targets relative to another row of the same run: label -> (reference label, factor)
RELATIVE_TARGETS = {"kfac/fop [fisher=empirical,stat_interval=10,inv_interval=10]":
                    ("kfac/natural [fisher=empirical,stat_interval=10,inv_interval=10]", 1.6)}
SCALING_SUITE = ["kfac:fisher=empirical,stat_interval=10,inv_interval=10",
                 "kfac:fisher=empirical,stat_interval=1,inv_interval=10",
                 "shampoo:inv_interval=100", "isaac:isaac_fused=True",
                 "miniblock:fisher=empirical,stat_interval=10,inv_interval=10,miniblock_size=16"]


def build_model(kind: str, hidden: list[int], inputs: int = 784, outputs: int = 10, width: int = 16) -> nn.Module:
    """``mlp``: ``inputs - hidden... - outputs`` with ReLU; ``cnn``: curvlab's small CNN on 1x28x28."""
    if kind == "mlp":
        dims = [inputs, *hidden, outputs]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)
    if kind == "resnet18":                   # ResNet-18's stages (CIFAR stem): 4 stages of 2 BasicBlocks
        from ..models import resnet
        return resnet(3, outputs, width=width, blocks=2, stages=4)
    if kind == "cnn":
        from ..models import build_cnn
        return build_cnn((1, 28, 28), outputs, width=width)
    if kind == "transformer":
        from ..transformer_models import build_transformer_lm
        return build_transformer_lm((TRANSFORMER_CONTEXT,), TRANSFORMER_VOCAB, vocab_size=TRANSFORMER_VOCAB,
                                    d_model=hidden[0], nhead=4, num_layers=len(hidden))
    raise ValueError(f"--model must be 'mlp', 'cnn', 'resnet18' or 'transformer', got {kind!r}")


#: ``--model transformer``: a causal language model (``transformer_lm``, converted attention) on random tokens;
#: ``--hidden`` gives d_model once per layer (default 128,128: two layers of width 128)
TRANSFORMER_CONTEXT, TRANSFORMER_VOCAB = 64, 96
ADAMW = "torch AdamW"
TRANSFORMER_SUITE = ["identity/natural", "kfac:fisher=empirical,stat_interval=10,inv_interval=10",
                     "kfac:fisher=empirical,stat_interval=1,inv_interval=10", "kfac:stat_interval=10,inv_interval=10",
                     "shampoo:inv_interval=10", "miniblock:fisher=empirical,stat_interval=10,inv_interval=10",
                     "isaac:stat_interval=1,inv_interval=1", "identity/sngm"]


#: ``--model resnet18``: the convolutional set (KFC, Shampoo, MBF kernel blocks, identity)
RESNET_SUITE = ["identity/natural", "kfac:fisher=empirical,stat_interval=10,inv_interval=10",
                "kfac:fisher=empirical,stat_interval=1,inv_interval=10", "shampoo:inv_interval=10",
                "miniblock:fisher=empirical,stat_interval=10,inv_interval=10", "identity/sngm"]


def batch_for(kind: str, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and labels for ``build_model(kind, ...)`` (timing does not depend on the values)."""
    if kind == "transformer":
        shape = (batch, TRANSFORMER_CONTEXT)
        return (torch.randint(0, TRANSFORMER_VOCAB, shape, device=device),
                torch.randint(0, TRANSFORMER_VOCAB, shape, device=device))
    if kind == "resnet18":
        return (torch.randn(batch, 3, 32, 32, device=device, dtype=dtype),
                torch.randint(0, 10, (batch,), device=device))
    return (torch.randn(batch, 784, device=device, dtype=dtype), torch.randint(0, 10, (batch,), device=device))


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor(), "threads": torch.get_num_threads(), "device": str(device),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def resolve_device(name: str) -> torch.device:
    """``--device``: a torch device, with a clear error when CUDA is asked for but absent."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"curvlab bench: --device must be 'cpu' or 'cuda[:N]', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("curvlab bench: --device cuda but CUDA is not available on this machine (torch "
                         f"{torch.__version__}); run on a machine with a GPU or use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"curvlab bench: --device must be 'cpu' or 'cuda[:N]', got {name!r}")
    return device


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"curvlab bench: {what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"curvlab bench: {what} must be positive integers, got {text!r}")
    return values


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The main table; ``floor`` and ``eff`` (efficiency of the optimizer's own sections: their products as
    plain calls over their measured time) come from the roofline when it ran."""
    head = (f"{'configuration':<58} {'ratio':>6} {'[q25, q75]':>14} {'floor':>6} {'eff':>5} {'step ms':>8} "
            f"{'fwd+bwd':>8} {'stats':>7} {'refresh':>8} {'precond':>8} {'rule':>6} {'state MB':>9} {'target':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        b = r["breakdown_ms"]
        target = r.get("target")
        mark = "" if target is None else f"{target:.2f}{'' if r['ratio'] <= target else '!'}"
        roof = r.get("roofline")
        floor = f"{roof['floor']:.2f}" if roof else ""
        eff = section_efficiency(r)
        lines.append(
            f"{r['label'][:58]:<58} {r['ratio']:>6.2f} [{r['ratio_q25']:>5.2f}, {r['ratio_q75']:>5.2f}] {floor:>6} "
            f"{'' if eff is None else f'{100 * eff:.0f}%':>5} {r['step_ms']:>8.2f} {b['forward_backward']:>8.2f} "
            f"{b.get('statistics', 0.0):>7.2f} {b.get('refresh', 0.0):>8.2f} {b.get('precondition', 0.0):>8.2f} "
            f"{b.get('rule', 0.0):>6.2f} {r['state_bytes'] / 2**20:>9.1f} {mark:>7}")
    return "\n".join(lines)


OPTIMIZER_SECTIONS = ("statistics", "refresh", "precondition", "rule")


def section_efficiency(row: dict[str, Any]) -> float | None:
    """Plain-call time of the products in the optimizer's sections over their measured time (None: no roofline
    or no such work)."""
    roof = row.get("roofline")
    if not roof:
        return None
    secs = [roof["sections"][k] for k in OPTIMIZER_SECTIONS if k in roof["sections"]]
    measured = sum(row["breakdown_ms"].get(k, 0.0) for k in OPTIMIZER_SECTIONS if k in roof["sections"])
    return sum(s["plain_ms"] for s in secs) / measured if secs and measured > 0 else None


def _cases(args: argparse.Namespace) -> list[tuple[int, list[int], list[Variant], dict[str, float]]]:
    """``(batch, hidden, variants, targets by label)`` for every case to run."""
    batches, hidden_sizes = _ints(args.batch, "--batch") if args.batch else None, args.hidden
    if args.variant:
        variants = [Variant.parse(s) for s in args.variant]
        return [(b, h, variants, {}) for b in (batches or [1024]) for h in hidden_sizes]
    if args.model == "transformer":
        variants = [Variant.parse(s) for s in TRANSFORMER_SUITE]
        return [(b, h, variants, {}) for b in (batches or [32]) for h in hidden_sizes]
    if args.model == "resnet18":
        variants = [Variant.parse(s) for s in RESNET_SUITE]
        return [(b, h, variants, {}) for b in (batches or [128]) for h in hidden_sizes]
    if args.suite == "targets":
        cases: dict[int, tuple[list[Variant], dict[str, float]]] = {}
        for sizes, spec, target in TARGETS:
            for b in batches or sizes:
                v = Variant.parse(spec)
                vs, tg = cases.setdefault(b, ([], {}))
                if any(u.label == v.label for u in vs):     # --batch: a spec listed for several sizes runs once
                    continue
                vs.append(v)
                t = ISAAC_TARGETS.get(b) if v.hyper.get("isaac_fused") else target
                if t is not None and (batches is None or b in sizes):
                    tg[v.label] = t
        return [(b, h, vs, tg) for b, (vs, tg) in sorted(cases.items()) for h in hidden_sizes]
    variants = [Variant.parse(s) for s in SCALING_SUITE]
    return [(b, h, variants, {}) for b in (batches or [64, 1024, 8192]) for h in hidden_sizes]


#: peer comparisons at identical settings (curvlab.bench.peers): (title, peers, settings)
_PEER_BASE = {"lr": 1e-3, "damping": 1e-3, "momentum": 0.9, "fisher": "empirical", "ema_decay": 0.95}
PEER_SUITE: list[tuple[str, list[str], dict[str, Any]]] = [
    ("K-FAC, statistics and inverses every 10", ["asdl-kfac", "curvlinops-kfac", "singd"],
     {**_PEER_BASE, "stat_interval": 10, "inv_interval": 10}),
    ("K-FAC, statistics every step, inverses every 10", ["asdl-kfac", "curvlinops-kfac", "singd"],
     {**_PEER_BASE, "stat_interval": 1, "inv_interval": 10}),
    # momentum 0 and epsilon 1e-4: pytorch_optimizer's Shampoo diverges (SVD of non-finite statistics) with 0.9
    ("Shampoo, roots every 10", ["asdl-shampoo", "pytorch_optimizer-shampoo"],
     {**_PEER_BASE, "momentum": 0.0, "damping": 1e-4, "stat_interval": 1, "inv_interval": 10}),
    ("Shampoo, roots every 100", ["asdl-shampoo", "pytorch_optimizer-shampoo"],
     {**_PEER_BASE, "momentum": 0.0, "damping": 1e-4, "stat_interval": 1, "inv_interval": 100}),
]


def run_peers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, clock: str = "wall"
              ) -> list[dict[str, Any]]:
    """Each peer against its curvlab equivalent, interleaved; prints ``curvlab / peer`` (target <= 0.8 against the
    fastest peer of a suite) and, under each row, the conventions that make that peer's step cheaper or dearer
    (:data:`curvlab.bench.peers.COST_NOTES`)."""
    from .peers import COST_NOTES, compare, peer_status

    status = peer_status()
    missing = {p: s for p, s in status.items() if not s.startswith("ok")}
    if missing:
        print(f"peers not available (install with `make peers`): {missing}")
    results = []
    for title, names, settings in PEER_SUITE:
        names = [n for n in names if n not in missing]
        if not names:
            continue
        try:
            res = compare(model, x, y, names, repeats=repeats, clock=clock, **settings)
        except Exception as exc:                   # a peer that breaks must not lose the other suites' rows
            print(f"\n{title}: failed ({type(exc).__name__}: {exc})")
            results.append({"suite": title, "error": f"{type(exc).__name__}: {exc}"})
            continue
        print(f"\n{title}: step time, curvlab equivalent / peer (target <= 0.8 against the fastest peer)")
        for peer in names:
            ref = res["reference"][peer]
            row = {"suite": title, "peer": peer, "version": status[peer], "curvlab": ref,
                   "peer_ms": 1e3 * res["seconds"][peer], "curvlab_ms": 1e3 * res["seconds"][ref],
                   "curvlab_over_peer": 1.0 / res["ratios"][peer], "finite": res["finite"][peer],
                   "cost_note": COST_NOTES.get(peer, "")}
            results.append(row)
            print(f"  {peer:<28} {row['peer_ms']:>9.2f} ms   curvlab {row['curvlab_ms']:>9.2f} ms   "
                  f"curvlab/peer {row['curvlab_over_peer']:>5.2f}{'' if row['finite'] else '  (peer diverged)'}")
            if row["cost_note"]:
                print(f"    {row['cost_note']}")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="curvlab bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[],
                   help="ESTIMATOR[/RULE[/SCALING]][:key=value,...] (repeatable); default: the --suite")
    p.add_argument("--suite", choices=("targets", "scaling"), default="targets",
                   help="targets: the target set; scaling: a few variants over batch sizes / widths")
    p.add_argument("--model", choices=("mlp", "cnn", "resnet18", "transformer"), default="mlp",
                   help="transformer: a causal LM (transformer_lm) with --hidden d_model per layer (default 128,128); "
                        "resnet18: ResNet-18's 4 stages x 2 BasicBlocks on 3x32x32 inputs")
    p.add_argument("--hidden", default="512,512",
                   help="MLP hidden sizes '512,512'; several models separated by ';'; with --suite scaling a list of "
                        "widths, each used for both hidden layers (default 512,512 there means widths 512)")
    p.add_argument("--cnn-width", type=int, default=None,
                   help="channels of the first stage: --model cnn (default 16), resnet18 (default 64)")
    p.add_argument("--batch", default=None, help="batch size(s), comma-separated (default per suite)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA: synchronized timing, peak memory)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (after one warm-up period)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="wall: elapsed time (default); process: this process's CPU time, robust to other load "
                        "on the machine (use with --threads 1)")
    p.add_argument("--peers", action="store_true", help="also time the peer libraries (curvlab.bench.peers)")
    p.add_argument("--no-roofline", dest="roofline", action="store_false",
                   help="skip the roofline (multiply-adds, plain-GEMM time and efficiency per section, floor ratio)")
    p.add_argument("--json", default=None, help="write every row and the environment to this file")
    args = p.parse_args(argv)
    if args.cnn_width is None:
        args.cnn_width = 64 if args.model == "resnet18" else 16
    if args.model == "transformer" and args.hidden == "512,512":
        args.hidden = "128,128"
    if ";" in args.hidden:
        args.hidden = [_ints(h, "--hidden") for h in args.hidden.split(";")]
    elif args.suite == "scaling" and not args.variant and args.model == "mlp":
        args.hidden = [[w, w] for w in dict.fromkeys(_ints(args.hidden, "--hidden"))]
    else:
        args.hidden = [_ints(args.hidden, "--hidden")]
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda" and args.clock == "process":
        raise SystemExit("curvlab bench: --clock process counts CPU time only; use --clock wall with --device cuda")
    dtype = getattr(torch, args.dtype)
    out: dict[str, Any] = {"schema": SCHEMA, "environment": environment(device),
                           "settings": {k: v for k, v in vars(args).items() if k != "json"}, "cases": []}
    for batch, hidden, variants, targets in _cases(args):
        torch.manual_seed(args.seed)
        model = build_model(args.model, hidden, width=args.cnn_width).to(device, dtype)
        x, y = batch_for(args.model, batch, device, dtype)
        extra = None
        if args.model == "transformer":                   # transformers are trained with AdamW: time it too
            adamw = copy.deepcopy(model)
            extra = {ADAMW: (adamw, torch.optim.AdamW(adamw.parameters(), lr=1e-9), 1)}
        rows = measure(model, x, y, variants, repeats=args.repeats, clock=args.clock, extra=extra,
                       roofline=args.roofline)
        adamw_row = next((r for r in rows if r["label"] == ADAMW), None)
        if adamw_row is not None:
            for r in rows:
                r["ratio_to_adamw"] = r["ratio"] / adamw_row["ratio"]
        by_label = {r["label"]: r for r in rows}
        for r in rows:
            if r["label"] in targets:
                r["target"] = targets[r["label"]]
            ref, factor = RELATIVE_TARGETS.get(r["label"], (None, None))
            if args.suite == "targets" and not args.variant and ref in by_label:
                r["target"] = factor * by_label[ref]["ratio"]
                r["target_note"] = f"{factor}x the ratio of {ref}"
        name = {"mlp": f"mlp {'-'.join(map(str, [784, *hidden, 10]))}", "cnn": f"cnn {args.cnn_width}",
                "resnet18": f"resnet18 (width {args.cnn_width}, 3x32x32)",
                "transformer": f"transformer_lm d_model {hidden[0]}, {len(hidden)} layers, context "
                               f"{TRANSFORMER_CONTEXT}, vocab {TRANSFORMER_VOCAB}"}[args.model]
        print(f"\n{name}, batch {batch}, {device}, {args.dtype}, {torch.get_num_threads()} threads "
              f"(ratios to torch.optim.SGD(momentum=0.9) in the same process; '!' = above target)")
        print(format_rows(rows))
        if args.roofline:
            print("\nroofline: per section GMAC/step, measured ms/step, the same products as plain calls of the same "
                  "shapes (ms/step), efficiency (plain/measured); floor = the ratio those plain products allow")
            print(format_roofline(rows))
        if adamw_row is not None:
            print("step time over torch AdamW's (the same rounds):")
            print("\n".join(f"  {r['label']:<70} {r['ratio_to_adamw']:>6.2f}" for r in rows if r is not adamw_row))
        skipped = {r["label"]: r["skipped_steps"] for r in rows if r.get("skipped_steps")}
        if skipped:
            print(f"WARNING: skipped (non-finite) steps make these rows meaningless: {skipped}")
        case = {"model": args.model, "hidden": hidden, "batch": batch, "rows": rows}
        if args.peers:
            case["peers"] = run_peers(model, x, y, args.repeats, args.clock)
        out["cases"].append(case)
    if args.json:
        atomic_write_json(Path(args.json), out)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
