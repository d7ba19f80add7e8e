"""Curvature spectra of small digits models: exact GGN / empirical Fisher / Hessian per layer against every
registered estimator's blocks, Lanczos and stochastic-Lanczos-quadrature checks, and K-FAC along training.

Wiring only: every computation is :mod:`curvlab.spectra`. Usage::

    python analysis/spectra.py --quick --out /tmp/spectra     # tiny (seconds), what the test suite runs
    python analysis/spectra.py --out results/spectra          # larger models and batch (minutes on a CPU)

Writes into ``--out``: ``spectra_<model>.{png,pdf}`` (sorted eigenvalues per layer, log scale, exact kinds
and estimators overlaid), ``top_eigs_<model>``, ``table_<model>`` (relative Frobenius error, after the best
scalar fit, relative error of the top eigenvalue and the top-k eigenspace overlap, per estimator and layer),
``density_<model>`` (SLQ density of the whole GGN and Hessian with the dense eigenvalues' histogram),
``training_<model>`` (K-FAC vs exact GGN at checkpoints), and every number in ``spectra.json``.

All estimators are compared with the exact GGN on the same batch (``--kind`` to change it), each with
``fisher="type2"`` where it supports it (else its first Fisher type) and its ``suggested`` hyper-parameters,
``ema_decay=0``. Shampoo's block is ``L^1/4 (x) R^1/4``, not a GGN estimate: only its eigenspace overlap and
the scale-fitted error are meaningful; the identity's eigenspace overlap is basis-dependent (all ties).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import curvlab
from curvlab import exact, spectra
from curvlab.data import batches, load_digits
from curvlab.models import build_cnn, build_mlp

EXACT_KINDS = ("ggn", "empirical", "hessian")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models and batch (seconds)")
    p.add_argument("--out", default="analysis_output/spectra", help="output directory")
    p.add_argument("--kind", default="ggn", choices=exact.KINDS, help="exact matrix the estimators are compared to")
    p.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    p.add_argument("--k", type=int, default=5, help="top-k eigenvalues / eigenspace dimension")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"n": 24, "mlp": {"width": 4, "depth": 1}, "cnn": {"width": 2}, "train_steps": 4,
                "checkpoints": [0, 2, 4], "batch": 32, "probes": 2, "lanczos_steps": 20}
    return {"n": 256, "mlp": {"width": 32, "depth": 2}, "cnn": {"width": 4}, "train_steps": 300,
            "checkpoints": [0, 10, 30, 100, 300], "batch": 64, "probes": 8, "lanczos_steps": 80}


def estimator_setup(cls: type) -> tuple[str, dict[str, Any]]:
    fisher = "type2" if "type2" in cls.fisher_types else cls.fisher_types[0]
    return fisher, dict(cls.suggested)


def analyse(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, split, cfg: dict[str, Any],
            args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()), "examples": int(x.shape[0])}
    mats = {kind: exact.exact_matrix(kind, model, x, y) for kind in EXACT_KINDS + ((args.kind,) if args.kind
                                                                                  not in EXACT_KINDS else ())}
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ref = exact.module_blocks(mats[args.kind], model, layers)
    res["exact"] = {kind: {layer: spectra.eigvals(b).tolist()
                           for layer, b in exact.module_blocks(m, model, layers).items()}
                    for kind, m in mats.items()}
    res["exact_whole"] = {kind: spectra.eigvals(mats[kind]).tolist() for kind in ("ggn", "hessian")}
    res["estimators"], blocks = {}, {}
    for est, cls in tqdm(list(curvlab.ESTIMATORS.items()), desc=f"{name}: estimators", leave=False):
        fisher, hyper = estimator_setup(cls)
        try:
            blocks[est] = spectra.estimator_blocks(model, x, y, est, fisher=fisher, **hyper)
        except Exception as exc:  # a plugin estimator without dense(), say: reported, not fatal
            res["estimators"][est] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        res["estimators"][est] = {"fisher": fisher, "eigvals": {l: spectra.eigvals(b).tolist() for l, b in
                                                                  blocks[est].items()},
                                  "compare": {l: spectra.compare(b, ref[l], args.k) for l, b in blocks[est].items()
                                              if l in ref}}
    # matrix-free checks on the whole matrices: Lanczos top-k and SLQ density
    res["lanczos"], res["density"] = {}, {}
    for kind in ("ggn", "hessian"):
        op = spectra.curvature_operator(kind, model, x, y)
        top = spectra.top_eigenvalues(op, args.k)
        dense_top = spectra.eigvals(mats[kind])[: args.k].numpy()
        res["lanczos"][kind] = {"eigsh": top.tolist(), "dense": dense_top.tolist(),
                                "max_rel_error": float(np.max(np.abs(top - dense_top) / np.abs(dense_top)))}
        dens = spectra.spectral_density(op, cfg["probes"], cfg["lanczos_steps"], seed=args.seed)
        t, rho = dens.density()
        res["density"][kind] = {"grid": t.tolist(), "rho": rho.tolist(), "integral": float(np.trapezoid(rho, t)),
                                "mean": dens.mean(), "trace_over_n": float(torch.trace(mats[kind]) / mats[kind].shape[0])}
    # along training: K-FAC on digits minibatches, exact blocks on the fixed probe batch
    gen = torch.Generator().manual_seed(args.seed)
    train = [b for _, b in zip(range(cfg["train_steps"]),
                               batches(split.x_train, split.y_train, cfg["batch"], generator=gen))]
    kfac_fisher, kfac_hyper = estimator_setup(curvlab.ESTIMATORS.get("kfac"))
    res["training"] = spectra.along_training(model, train, (x, y), cfg["checkpoints"], "kfac", args.kind,
                                             fisher=kfac_fisher, k=args.k, progress=True, **kfac_hyper)
    return res


def _save(fig: Figure, out: Path, stem: str) -> None:
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{stem}.{ext}", dpi=100)


def _positive(vals: list[float]) -> np.ndarray:
    v = np.asarray(vals)
    return v[v > max(v.max(), 0.0) * 1e-12] if v.size and v.max() > 0 else v[:0]


def figures(name: str, res: dict[str, Any], out: Path, kind: str) -> None:
    layers = list(next(iter(res["exact"].values())))
    ests = [e for e, r in res["estimators"].items() if "error" not in r]
    fig = Figure(figsize=(4 * len(layers), 3.4), layout="constrained")
    for ax, layer in zip(fig.subplots(1, len(layers), squeeze=False)[0], layers):
        for k, by_layer in res["exact"].items():
            ax.semilogy(_positive(by_layer[layer]), lw=2.2, label=f"exact {k}")
        for e in ests:
            ax.semilogy(_positive(res["estimators"][e]["eigvals"][layer]), lw=1, ls="--", label=e)
        ax.set(title=f"{name} layer {layer}", xlabel="index (descending)", ylabel="eigenvalue")
    ax.legend(fontsize=7)
    _save(fig, out, f"spectra_{name}")

    fig = Figure(figsize=(4 * len(layers), 3.4), layout="constrained")
    for ax, layer in zip(fig.subplots(1, len(layers), squeeze=False)[0], layers):
        k = len(res["estimators"][ests[0]]["compare"][layer]["top_eig_rel_error"]) if ests else 5
        ax.semilogy(range(1, k + 1), res["exact"][kind][layer][:k], "ko-", label=f"exact {kind}")
        for e in ests:
            ax.semilogy(range(1, k + 1), np.abs(res["estimators"][e]["eigvals"][layer][:k]), ".--", label=e)
        ax.set(title=f"{name} layer {layer}: top {k}", xlabel="rank")
    ax.legend(fontsize=7)
    _save(fig, out, f"top_eigs_{name}")

    rows, cells = [], []
    for e in ests:
        for layer, c in res["estimators"][e]["compare"].items():
            rows.append(f"{e} / {layer}")
            cells.append([f"{c['rel_frobenius']:.3g}", f"{c['rel_frobenius_fitted']:.3g}",
                          f"{c['top_eig_rel_error'][0]:.3g}", f"{c['overlap']:.3f}"])
    fig = Figure(figsize=(7, 0.3 * len(rows) + 1))
    ax = fig.subplots()
    ax.axis("off")
    ax.table(cellText=cells, rowLabels=rows, colLabels=["rel. Frob.", "rel. Frob. (scale fit)", "top-1 rel. err.",
                                                        "top-k overlap"], loc="center")
    ax.set_title(f"{name}: estimator blocks vs exact {kind}")
    _save(fig, out, f"table_{name}")

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    for ax, k in zip(fig.subplots(1, 2), ("ggn", "hessian")):
        d = res["density"][k]
        ax.plot(d["grid"], d["rho"], label="SLQ density")
        ax.hist(res["exact_whole"][k], bins=60, density=True, alpha=0.4, label="dense eigenvalues")
        ax.set(yscale="log", title=f"{name}: whole {k}", xlabel="eigenvalue", ylim=(max(d["rho"]) * 1e-6, None))
        ax.legend(fontsize=7)
    _save(fig, out, f"density_{name}")

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    steps = [r["step"] for r in res["training"]]
    for layer in layers:
        for src, ls in (("fresh", "-"), ("running", "--")):
            pts = [(r["step"], r[src][layer]) for r in res["training"] if src in r]
            ax1.plot([s for s, _ in pts], [c["rel_frobenius"] for _, c in pts], ls, marker=".", label=f"{layer} {src}")
            ax2.plot([s for s, _ in pts], [c["overlap"] for _, c in pts], ls, marker=".", label=f"{layer} {src}")
    ax1.set(title=f"{name}: K-FAC rel. Frobenius error", xlabel="step", xticks=steps)
    ax2.set(title="top-k eigenspace overlap", xlabel="step", xticks=steps, ylim=(0, 1.05))
    ax2.legend(fontsize=6)
    _save(fig, out, f"training_{name}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    cfg = settings(args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    split = load_digits(seed=args.seed, dtype=torch.float64)
    x, y = split.x_train[: cfg["n"]], split.y_train[: cfg["n"]]
    builders = {"mlp": lambda: build_mlp((64,), 10, **cfg["mlp"]), "cnn": lambda: build_cnn((1, 8, 8), 10, **cfg["cnn"])}
    names = [m for m in args.models.split(",") if m]
    bad = [m for m in names if m not in builders]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; choose from {sorted(builders)}")
    results: dict[str, Any] = {"config": {**cfg, "kind": args.kind, "k": args.k, "seed": args.seed}}
    for name in names:
        model = builders[name]().double()
        res = analyse(name, model, x, y, split, cfg, args)
        figures(name, res, out, args.kind)
        results[name] = res
        print(f"== {name}: {res['params']} parameters, {res['examples']} examples, reference: exact {args.kind}")
        for kind, r in res["lanczos"].items():
            print(f"  eigsh top-{args.k} {kind}: {np.round(r['eigsh'], 6).tolist()}  max rel. error vs dense "
                  f"{r['max_rel_error']:.1e}")
        for kind, d in res["density"].items():
            print(f"  SLQ {kind}: integral {d['integral']:.4f}, mean {d['mean']:.4g} (trace/n {d['trace_over_n']:.4g})")
        print(f"  {'estimator':<10} {'layer':<6} {'relFrob':>8} {'fitted':>8} {'top1 err':>9} {'overlap':>8}")
        for est, r in res["estimators"].items():
            if "error" in r:
                print(f"  {est:<10} skipped: {r['error']}")
                continue
            for layer, c in r["compare"].items():
                print(f"  {est:<10} {layer:<6} {c['rel_frobenius']:8.3f} {c['rel_frobenius_fitted']:8.3f} "
                      f"{c['top_eig_rel_error'][0]:9.3f} {c['overlap']:8.3f}")
        for rec in res["training"]:
            summary = " ".join(f"{l}:{c['rel_frobenius']:.3f}/{c['overlap']:.2f}" for l, c in rec["fresh"].items())
            print(f"  K-FAC step {rec['step']:>4} probe loss {rec['probe_loss']:.3f}  fresh relFrob/overlap {summary}")
    with open(out / "spectra.json", "w") as fh:
        json.dump(results, fh)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
