"""Width transfer under the equal-budget protocol: tune damping at the base width, then sweep lr across widths.

The claim of Ishikawa & Karakida (ICLR 2024, arXiv 2312.12226, Figure 6; ALGORITHMS.md 5.4) is that under muP the
hyper-parameters found at a small (base) width stay optimal at larger widths. :func:`run_tuned_width_transfer`
gives every (estimator, scaling) the same protocol:

1. **Tuning at the base width** (:func:`curvlab.experiments.fair.fair_compare`): every (estimator, scaling) gets
   the same number of trials, sampler and seed; a second-order method's space is ``lr`` and ``damping`` (K-FAC's
   per-side ridge, Shampoo's relative epsilon), SGD's ``lr``; K-FAC under muP may also tune the G side separately
   (``mup_rho_B0``, with ``damping`` playing ``rho_A0``: the reference code's separate ``damping_A`` /
   ``damping_B``) within the same trial count. A trial trains on the fitting part of the training data and is
   scored on the validation part (:func:`curvlab.validation.validation_split`), by its final MSE there; the best
   configuration is re-run with several seeds and scored on the test set, once (the only time the test set is
   read), with the damping diagnostic (:func:`curvlab.diagnostics.damping_metrics`) of its final state.
2. **Transfer**: the tuned damping (and ``mup_rho_B0``) is frozen and the lr swept over ONE grid shared by all
   methods at every width (:func:`curvlab.width_transfer.lr_width_sweep`; training on the fitting part, held-out
   numbers on the validation part), with the damping diagnostic of every run.
3. **Claims**: per estimator, the best-lr shift under muP against under SP (:func:`transfer_claims`), by the
   final training loss (the paper's Figure 6 quantity) and by the validation loss; plus a coordinate check WITH
   biases (:func:`coord_check_ratios`, :func:`curvlab.coord_check.coord_check`).

SP and muP coincide at the base width (matched SP init, :mod:`curvlab.width_transfer`), so their tunings there see
the same runs except where the spaces differ (K-FAC's separate ``mup_rho_B0``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from . import width_transfer as wt

__all__ = ["tuning_methods", "base_width_runner", "tuned_hyper", "damping_at_best", "coord_check_ratios",
           "transfer_claims", "format_claims", "run_tuned_width_transfer"]


def _log_range(bounds: Sequence[float], name: str) -> dict[str, Any]:
    low, high = bounds
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"{name} must be (low, high) with 0 < low < high, got {tuple(bounds)!r}")
    return {"low": float(low), "high": float(high), "log": True}


def tuning_methods(estimators: Sequence[str], scalings: Sequence[str], lr_range: Sequence[float],
                   damping_range: Sequence[float], separate_rho: bool = True) -> list[Any]:
    """One :class:`curvlab.experiments.fair.Method` per ``"estimator/scaling"`` (module doc, step 1).

    ``lr_range`` / ``damping_range``: ``(low, high)``, searched on a log scale; ``separate_rho``: K-FAC under muP
    tunes ``mup_rho_B0`` over ``damping_range`` too (``damping`` is then its ``rho_A0``)."""
    from .experiments.fair import Method
    from .registry import ESTIMATORS

    lr, damping = _log_range(lr_range, "lr_range"), _log_range(damping_range, "damping_range")
    methods = []
    for est in estimators:
        name = ESTIMATORS.get(est).registry_name
        for scaling in scalings:
            second = name != "identity"
            space: dict[str, Any] = {"lr": dict(lr)}
            if second:
                space["damping"] = dict(damping)
            if name == "kfac" and scaling == "mup" and separate_rho:
                space["mup_rho_B0"] = dict(damping)
            methods.append(Method(f"{est}/{scaling}", space, second_order=second,
                                  fixed={"estimator": est, "scaling": scaling}))
    return methods


def base_width_runner(fit_val: Any, fit_test: Any, settings: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    """``run(method, params, phase, seed)`` for :func:`curvlab.experiments.fair.fair_compare`: one
    :func:`curvlab.width_transfer.train_run` at the base width, trained on the fitting part; ``phase="val"``
    scores on ``fit_val``'s validation part, ``"test"`` on ``fit_test``'s test set (and adds the damping
    diagnostic). ``settings``: ``widths``, ``base_width``, ``epochs``, ``batch_size``, ``loss``, ``sp_init``."""
    widths, base = settings["widths"], settings["base_width"]

    def run(method: Any, params: dict[str, Any], phase: str, seed: int) -> dict[str, Any]:
        hyper = dict(params)
        est, scaling, lr = hyper.pop("estimator"), hyper.pop("scaling"), float(hyper.pop("lr"))
        rec = wt.train_run(fit_val if phase == "val" else fit_test, est, scaling, int(base), lr, seed,
                           hyper=wt.estimator_hyper(est, widths, hyper, settings["loss"]),
                           epochs=settings["epochs"], batch_size=settings["batch_size"], base_width=base,
                           sp_init=settings["sp_init"], loss=settings["loss"], diagnose=phase == "test")
        out = {f"{phase}_loss": rec["eval_loss"], f"{phase}_accuracy": rec["eval_acc"],
               "train_loss": rec["final_loss"], "diverged": rec["diverged"]}
        if phase == "test":
            out["damping"] = rec["damping"]
        return out

    return run


def tuned_hyper(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"estimator/scaling": {tuned setting: value}}`` without ``lr``: what the sweep freezes (step 2)."""
    return {name: {k: v for k, v in rec["best"]["params"].items() if k != "lr"}
            for name, rec in record["methods"].items()}


def damping_at_best(records: Sequence[dict[str, Any]], summary: dict[str, dict[str, Any]]) -> dict[str, list]:
    """Per ``"estimator/scaling"`` and width, at that width's best lr: the largest ``damping / mean eigenvalue``
    over layers, factors and seeds (> 1: the damping swamps the average curvature direction) and where."""
    out: dict[str, list] = {}
    for key, s in summary.items():
        rows = []
        for width, lr in zip(s["widths"], s["best_lr"]):
            worst, where = None, None
            for r in records:
                if (f"{r['estimator']}/{r['scaling']}" != key or r["width"] != width or r["lr"] != lr
                        or not r.get("damping")):
                    continue
                for factor, d in r["damping"].items():
                    if d.get("ratio_mean") is not None and (worst is None or d["ratio_mean"] > worst):
                        worst, where = d["ratio_mean"], factor
            rows.append({"width": width, "lr": lr, "max_damping_over_mean_eig": worst, "factor": where})
        out[key] = rows
    return out


def coord_check_ratios(estimators: Sequence[str], scalings: Sequence[str], widths: Sequence[int],
                       steps: int = 1) -> dict[str, dict[str, dict[str, float]]]:
    """The coordinate check WITH biases (:func:`curvlab.coord_check.coord_check`, ``bias=True``, ``base_width`` =
    the smallest width under muP): per ``"estimator/scaling"`` and layer, the max/min RMS change over ``widths``
    (1 = flat) and its log-log slope."""
    from .coord_check import LAYERS, coord_check

    out = {}
    for est in estimators:
        for scaling in scalings:
            extra = {"base_width": min(widths)} if scaling == "mup" else {}
            res = coord_check(est, scaling, list(widths), steps=steps, bias=True, **extra)
            out[f"{est}/{scaling}"] = {k: {"ratio": res.ratio(k), "slope": res.slope(k)} for k in LAYERS}
    return out


def transfer_claims(summary: dict[str, dict[str, Any]], estimators: Sequence[str], spacing: float,
                    tolerance_steps: float = 1.0) -> dict[str, dict[str, Any]]:
    """Per estimator, "the optimal lr transfers across widths under muP, not under SP", from two
    :func:`curvlab.width_transfer.best_lr_shift` rows: the largest ``|shift|`` of the best lr from the base width
    (in grid steps of ``spacing``) under each scaling, whether SP diverges at muP's best lr at the largest width,
    and a verdict: ``reproduced`` (muP within ``tolerance_steps`` and SP moved further or diverged there),
    ``partly`` (muP within tolerance, SP as stable), ``not reproduced`` (muP moved more), ``untested`` (a row
    missing or every lr diverged at some width)."""
    out = {}
    for est in estimators:
        mup, sp = summary.get(f"{est}/mup"), summary.get(f"{est}/standard")
        if mup is None or sp is None or None in mup["best_lr"] or None in sp["best_lr"]:
            out[est] = {"verdict": "untested"}
            continue
        steps = {k: s["max_abs_shift_log2"] / math.log2(spacing) for k, s in (("mup", mup), ("standard", sp))}
        lr_mup_last = mup["best_lr"][-1]
        sp_curve = sp["curves"][str(sp["widths"][-1])]
        sp_breaks = lr_mup_last in sp["lr_grid"] and math.isnan(sp_curve[sp["lr_grid"].index(lr_mup_last)])
        if steps["mup"] > tolerance_steps:
            verdict = "not reproduced"
        elif steps["standard"] > steps["mup"] or sp_breaks:
            verdict = "reproduced"
        else:
            verdict = "partly"
        out[est] = {"verdict": verdict, "max_abs_shift_steps": steps,
                    "shift_log2": {"mup": mup["shift_log2"], "standard": sp["shift_log2"]},
                    "best_lr": {"mup": mup["best_lr"], "standard": sp["best_lr"]},
                    "best_loss_largest_width": {"mup": mup["best_loss"][-1], "standard": sp["best_loss"][-1]},
                    "sp_diverges_at_mup_best_lr": sp_breaks,
                    "at_edge": {"mup": mup["at_edge"], "standard": sp["at_edge"]}}
    return out


def format_claims(claims: dict[str, dict[str, Any]], label: str) -> str:
    """:func:`transfer_claims` as text, one line per estimator."""
    lines = [f"claim 'the optimal lr transfers across widths under muP, not under SP' ({label}):"]
    for est, c in claims.items():
        if c["verdict"] == "untested":
            lines.append(f"  {est:<10} untested (a row is missing or every lr diverged at some width)")
            continue
        lr, steps = c["best_lr"], c["max_abs_shift_steps"]
        breaks = ", diverges at muP's best lr" if c["sp_diverges_at_mup_best_lr"] else ""
        lines.append(f"  {est:<10} {c['verdict']:<15} muP best lr {lr['mup']} (max |shift| {steps['mup']:.0f} "
                     f"steps), SP {lr['standard']} (max |shift| {steps['standard']:.0f} steps{breaks})")
    return "\n".join(lines)


def run_tuned_width_transfer(settings: dict[str, Any], out: str | Path, stem: str = "width_transfer",
                             title: str = "", progress: bool = True) -> dict[str, Any]:
    """Steps 1-3 of the module doc on MNIST (or the digits fallback); prints the tables and writes
    ``stem.png/.pdf/.json`` into ``out``; returns the numbers.

    ``settings``: ``estimators``, ``scalings``, ``widths``, ``lrs`` (the one grid), ``lr_spacing`` (its ratio),
    ``num_train``, ``num_test``, ``pool``, ``val_fraction``, ``epochs``, ``batch_size``, ``loss``, ``sp_init``,
    ``seeds`` (sweep seeds, a count from ``seed``), ``trials`` (per method), ``sampler``, ``test_seeds`` (count),
    ``damping_range``, ``coord_widths``, ``data_dir``, ``device``, ``seed``."""
    from .experiments.fair import edge_params, fair_compare
    from .figures import mnist_or_fallback, save_figure, write_numbers
    from .validation import validation_split

    split, data_name = mnist_or_fallback(settings.get("data_dir"), num_train=settings["num_train"],
                                         num_test=settings["num_test"])
    split = wt.pool_images(split, settings.get("pool", 1) if data_name == "mnist" else 1)
    split = split.to(device=settings.get("device", "cpu"))
    seed0 = settings.get("seed", 0)
    fit_val = validation_split(split, settings["val_fraction"], seed0, "validation")
    fit_test = validation_split(split, settings["val_fraction"], seed0, "test")
    widths, lrs = sorted(settings["widths"]), sorted(settings["lrs"])
    run_cfg = {"widths": widths, "base_width": float(min(widths)), "epochs": settings["epochs"],
               "batch_size": settings["batch_size"], "loss": settings["loss"], "sp_init": settings["sp_init"]}
    methods = tuning_methods(settings["estimators"], settings["scalings"], (lrs[0], lrs[-1]),
                             settings["damping_range"])
    tuning = fair_compare(methods, base_width_runner(fit_val, fit_test, run_cfg), settings["trials"],
                          metric="val_loss", test_metric="test_loss", direction="minimize",
                          seeds=list(range(seed0, seed0 + settings["test_seeds"])), sampler=settings["sampler"],
                          seed=seed0, tuning_seed=seed0, progress=progress)
    frozen = tuned_hyper(tuning)
    print(f"\ntuned at the base width {min(widths)} ({settings['trials']} trials per method, "
          f"{settings['sampler']}, validation MSE):")
    print(tuning["table"])
    print("frozen for the sweep: " + "; ".join(f"{k} {v}" for k, v in frozen.items()))
    records = wt.lr_width_sweep(
        fit_val, estimators=settings["estimators"], scalings=settings["scalings"], widths=widths, lrs=lrs,
        seeds=list(range(seed0, seed0 + settings["seeds"])), epochs=settings["epochs"],
        batch_size=settings["batch_size"], base_width=float(min(widths)), sp_init=settings["sp_init"],
        hyper=frozen, loss=settings["loss"], diagnose=True, progress=progress)
    summary = wt.best_lr_shift(records)
    summary_val = wt.best_lr_shift([{**r, "final_loss": r["eval_loss"]} for r in records])
    spacing = settings["lr_spacing"]
    claims = {"train_loss": transfer_claims(summary, settings["estimators"], spacing),
              "val_loss": transfer_claims(summary_val, settings["estimators"], spacing)}
    coord = coord_check_ratios(settings["estimators"], settings["scalings"], settings["coord_widths"])
    agree = wt.base_width_agreement(records)
    print(f"\nwidth transfer on {data_name} ({fit_val.num_train} fitting / {fit_val.x_test.shape[0]} validation "
          f"examples, {split.num_features} features), {settings['epochs']} epochs, {settings['seeds']} seed(s), "
          f"loss {settings['loss']}, tuned damping frozen; best lr per width by final TRAIN loss:")
    print(wt.format_table(summary))
    print("by VALIDATION loss:")
    print(wt.format_table(summary_val))
    print(format_claims(claims["train_loss"], "final train loss"))
    print(format_claims(claims["val_loss"], "validation loss"))
    print(f"coordinate check with biases (widths {list(settings['coord_widths'])}, 1 step; max/min RMS change):")
    for key, layers in coord.items():
        print(f"  {key:<20} " + "  ".join(f"{k} {v['ratio']:.2f}" for k, v in layers.items()))
    if agree:
        print("SP vs muP at the base width (max |loss difference|, 0 = same run): "
              + ", ".join(f"{k} {v:.2e}" for k, v in agree.items()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = save_figure(wt.plot_lr_width(summary, title or f"{data_name}: final train loss vs lr, per width"),
                        out, stem)
    config = {k: v for k, v in settings.items()}
    config["hyper"] = {f"{e}/{s}": wt.estimator_hyper(e, widths, frozen.get(f"{e}/{s}"), settings["loss"])
                       for e in settings["estimators"] for s in settings["scalings"]}
    budget = {name: {"trials": rec["budget"]["trials"], "sampler": rec["budget"]["sampler"],
                     "space": rec["budget"]["space"], "best": rec["best"]["params"],
                     "best_at_edge": edge_params(rec["best"]["params"], rec["budget"]["space"]),
                     "test_loss": rec["final"]["test_loss"]} for name, rec in tuning["methods"].items()}
    numbers = {"data": data_name, "config": config, "protocol": tuning["protocol"], "budget": budget,
               "tuning": tuning, "summary": summary, "summary_val": summary_val, "claims": claims,
               "damping_at_best": damping_at_best(records, summary), "coord_check_bias": coord,
               "base_width_agreement": agree, "records": records}
    write_numbers(out, stem, numbers)
    print("wrote " + ", ".join(str(p) for p in paths) + f", {out / (stem + '.json')}")
    return numbers
