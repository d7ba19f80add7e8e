"""Adaptive (Levenberg-Marquardt) vs fixed damping: does ``damping_adapt="lm"`` reach the best fixed damping's loss?

Claim under test ("robust by default"): started from a damping far too small (1e-4) or too large (1.0), K-FAC,
Shampoo and MBF (estimators ``kfac``, ``shampoo``, ``miniblock``; rule ``natural``) with ``damping_adapt="lm"``
reach, within 1.5x the steps, the training loss that the best damping of a FIXED grid reaches.

Protocol (every run of an estimator alike): an MLP (784-256-256-10 ReLU in quick mode) on a subset of the MNIST
training set, cross-entropy, batch 128, the same initialisation, optimizer seed and batch order (one
``batch_stream`` seed), the closure loop ``opt.step(closure)`` for every run (fixed ones too), and the
estimator's ``suggested`` hyper-parameters (lr, momentum, ema_decay, inv_interval) chosen once, not tuned on
the outcome; only the damping differs (MBF: ``miniblock_mode="woodbury"``, window 1, as paper_figures/mbf.py; the
auto mode would store 256 dense 257x257 blocks and costs 10x more per step here). The adaptive runs use the
library defaults (``damping_interval`` 5, ``omega = (19/20)^5 = 0.774``, ``damping_min`` 1e-8, ``damping_max``
1e6). Every ``eval_every`` steps (untimed) the mean loss on a FIXED evaluation subset of the training set (its
first ``num_eval`` examples) is recorded; the smoothed loss ``S`` is the trailing mean of the last 3 evaluations.

* fixed runs: ``steps`` steps (the budget ``B``); ``L* = min over the grid of S(B)`` (a diverged run scores inf),
  the best fixed damping is its argmin and ``T* = `` the first evaluation step where that run's ``S <= L*``
  (``<= B``; ``= B`` for a curve still going down);
* adaptive runs (start 1e-4 and 1.0): ``budget_factor x B`` steps (2x, so ratios up to 2 are measured);
  ``T = `` the first evaluation step with ``S <= L*``, ``ratio = T / T*``; the claim holds for a run when
  ``ratio <= 1.5``. The table also gives the final loss (a run may reach L* and blow up later) and damping.
* a run that raises :class:`curvlab.Diverged` (NaN/Inf loss, or 10 skipped steps in a row) or
  :class:`~curvlab.linalg.FactorizationError` stops there (``diverged``); its curve ends.
* ``steps_to_travel``: the fewest steps in which the LM rule can move the damping from the start to the best fixed
  value (one factor omega per ``damping_interval`` steps), e.g. 1e-4 -> 1: 36 adaptations = 180 steps; the
  curvature sees a new damping at its next refresh (``inv_interval`` steps later at most).

    OMP_NUM_THREADS=1 python analysis/damping.py --mode quick --out out/damping      # ~12 min on 1 CPU thread
    python analysis/damping.py --mode tiny --out /tmp/damping                        # seconds (the test suite)
    OMP_NUM_THREADS=1 python analysis/damping.py --mode quick --rule qmodel --out out/damping_qmodel   # ~40 min

``--rule qmodel`` (lr 1.0, the rule's default; momentum is the rule's own) runs the same protocol with the rule the
LM adaptation was designed for (Martens & Grosse 2015 sec. 6.5-7). ``--mechanism`` adds to the adaptive runs
(only): ``lm+gamma`` the curvature's own damping gamma (``gamma_adapt``, sec. 6.6), ``lm+refresh``
(``damping_refresh``), or both; ``--rho next`` gives the adaptive runs ``damping_rho="next"`` (rho's actual
change measured on the next step's batch, a held-out ratio; :mod:`curvlab.damping`); ``--kl-clip default|<number>`` gives EVERY run (fixed ones too) a trust region
(default: the estimators' suggested ``kl_clip``, None). ``--mode small`` (MNIST 4096, width 64, 300 steps) is a
screen of ~5 min; ``--reuse-fixed old/damping.json`` takes the fixed runs from an earlier output of the same
settings. The paper's full method, which reaches L* in 5 of 6 cases of the small screen::

    OMP_NUM_THREADS=1 python analysis/damping.py --mode quick --rule qmodel --kl-clip default --mechanism lm+gamma
 Writes ``damping.png``/``.pdf`` (per
estimator: loss over steps, fixed grid thin and adaptive thick; damping and rho of the adaptive runs) and
``damping.json`` (config, every run's curve and damping history, the table). Measured numbers: analysis/README.md.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import curvlab  # noqa: E402
from curvlab.divergence import Diverged  # noqa: E402
from curvlab.experiments.traces import batch_stream, format_table, time_to_threshold  # noqa: E402
from curvlab.figures import mnist_or_fallback, paper_mode_parser, save_figure, write_numbers  # noqa: E402
from curvlab.linalg import FactorizationError  # noqa: E402
from curvlab.models import mlp  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"num_train": 512, "num_eval": 256, "width": 32, "batch": 64, "steps": 20, "eval_every": 5,
             "grid": [1e-4, 1e-2, 1.0], "starts": [1e-4, 1.0], "estimators": ["kfac", "shampoo", "miniblock"]},
    "small": {"num_train": 4096, "num_eval": 2048, "width": 64, "batch": 64, "steps": 300, "eval_every": 10,
              "grid": [1e-4, 1e-3, 1e-2, 1e-1, 1.0], "starts": [1e-4, 1.0],
              "estimators": ["kfac", "shampoo", "miniblock"]},
    "quick": {"num_train": 15000, "num_eval": 5000, "width": 256, "batch": 128, "steps": 800, "eval_every": 20,
              "grid": [1e-4, 1e-3, 1e-2, 1e-1, 1.0], "starts": [1e-4, 1.0],
              "estimators": ["kfac", "shampoo", "miniblock"]},
    "full": {"num_train": 60000, "num_eval": 10000, "width": 512, "batch": 256, "steps": 3000, "eval_every": 50,
             "grid": [1e-4, 1e-3, 1e-2, 1e-1, 1.0], "starts": [1e-4, 1.0],
             "estimators": ["kfac", "shampoo", "miniblock"]},
}
BUDGET_FACTOR = 2.0      # adaptive runs get this many times the fixed budget (ratios up to 2 are measurable)
CLAIM_RATIO = 1.5        # the claim: adaptive reaches L* within 1.5x the best fixed run's steps
SMOOTH = 3               # trailing window (in evaluations) of the smoothed loss
RHO_CLIP = 30.0          # the rho panel shows values clipped to [-30, 30] (-inf: a non-finite loss after the step)
EXTRA = {"miniblock": {"miniblock_mode": "woodbury", "miniblock_window": 1, "ema_decay": 0.0}}   # one batch: no EMA
#: ``--mechanism``: what the adaptive runs add to ``damping_adapt="lm"`` (the fixed grid never changes)
MECHANISMS: dict[str, dict[str, Any]] = {
    "lm": {},
    # Martens & Grosse sec. 6.6: the curvature's own damping gamma, chosen greedily by M every T2 = 20 steps
    "lm+gamma": {"gamma_adapt": True},
    # the curvature refreshed at once when the LM damping moved (the curvature sees a new damping the next step)
    "lm+refresh": {"damping_refresh": True},
    "lm+gamma+refresh": {"gamma_adapt": True, "damping_refresh": True},
    # no LM: the curvature's gamma chosen by the NEXT batch's loss at the three candidate updates (a held-out,
    # paired comparison; curvlab.factor_damping gamma_score="next"), every 20 steps (omega2 0.599) or every 5 (0.774)
    "gamma-next": {"damping_adapt": None, "gamma_adapt": True, "gamma_score": "next"},
    "gamma-next-5": {"damping_adapt": None, "gamma_adapt": True, "gamma_score": "next", "gamma_interval": 5},
    "lm+gamma-next": {"gamma_adapt": True, "gamma_score": "next"},
}


def smooth(values: list[float], window: int = SMOOTH) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def hyper_for(estimator: str, rule: str, kl_clip: str = "suggested") -> dict[str, Any]:
    """The estimator's suggested hyper-parameters without its damping (the rule qmodel: lr 1.0, no momentum);
    ``kl_clip``: ``"suggested"`` (the estimator's, None for the three here), ``"default"`` (the library default of
    the triple: 1e-3 under natural, qmodel's 1e-2) or a number."""
    hyper = {k: v for k, v in curvlab.ESTIMATORS.get(estimator).suggested.items() if k != "damping"}
    if kl_clip == "default":
        hyper.pop("kl_clip", None)
    elif kl_clip != "suggested":
        hyper["kl_clip"] = float(kl_clip)
    if rule == "qmodel":
        hyper["lr"] = 1.0
        hyper.pop("momentum", None)
    return {**hyper, **EXTRA.get(estimator, {})}


def train(estimator: str, rule: str, damping: float, adaptive: bool, data: dict[str, Any], cfg: dict[str, Any],
          steps: int, seed: int, mechanism: str = "lm", rho: str = "same") -> dict[str, Any]:
    """One run in the closure loop; returns its evaluated curve and (adaptive) damping history."""
    x, y, x_eval, y_eval = data["x"], data["y"], data["x_eval"], data["y_eval"]
    torch.manual_seed(seed)
    model = mlp(x.shape[1], cfg["width"], 2, data["classes"], "relu").to(x.device)
    hyper = hyper_for(estimator, rule, cfg.get("kl_clip", "suggested"))
    adapt = {"damping_adapt": "lm", "damping_rho": rho, **MECHANISMS[mechanism]} if adaptive else {}
    opt = curvlab.optimizer(model, estimator, rule, seed=seed, damping=damping, **adapt, **hyper)

    def evaluate() -> float:
        with torch.no_grad(), curvlab.capture.paused():
            return float(F.cross_entropy(model(x_eval), y_eval))

    stream = batch_stream(x, y, cfg["batch"], seed)
    curve_steps, losses, error = [0], [evaluate()], None
    for step in range(1, steps + 1):
        xb, yb = next(stream)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        try:
            loss = opt.step(closure)
        except (Diverged, FactorizationError) as err:
            error = f"step {step}: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            break
        if not math.isfinite(float(loss.detach())):
            error = f"step {step}: non-finite training loss"
            break
        if step % cfg["eval_every"] == 0 or step == steps:
            curve_steps.append(step)
            losses.append(evaluate())
            if not math.isfinite(losses[-1]):
                error = f"step {step}: non-finite evaluation loss"
                break
    history = [{k: h[k] for k in ("step", "rho", "damping", "damping_before", "h_before", "h_after", "predicted")}
               for h in opt.damping_history]
    return {"estimator": estimator, "rule": rule, "adaptive": adaptive, "start_damping": damping,
            "lr": hyper["lr"], "steps": curve_steps, "loss": losses, "smoothed": smooth(losses),
            "diverged": error is not None, "error": error, "steps_run": steps, "optimizer_steps": opt.step_count,
            "skipped_steps": opt.skipped_steps, "final_damping": opt.param_groups[0]["damping"],
            "final_gamma": opt.param_groups[0].get("gamma"), "damping_history": history,
            "gamma_history": [{k: h[k] for k in ("step", "gamma", "choice")} for h in opt.gamma_history]}


def final_smoothed(run: dict[str, Any]) -> float:
    return math.inf if run["diverged"] or not run["smoothed"] else run["smoothed"][-1]


def steps_to_travel(start: float, target: float, interval: int, omega: float) -> int:
    """Fewest steps for the LM rule to move the damping from ``start`` to ``target`` (one factor per adaptation;
    the adaptations are at steps 0, T1, 2 T1, ... and a change is seen by the next curvature refresh)."""
    n = math.ceil(abs(math.log(target / start)) / -math.log(omega) - 1e-9)
    return n * interval


def summarize(estimator: str, fixed: list[dict[str, Any]], adaptive: list[dict[str, Any]], interval: int,
              omega: float) -> dict[str, Any]:
    """L*, the best fixed damping, T*, and per adaptive run its steps to L* and ratio."""
    finals = [final_smoothed(r) for r in fixed]
    best = min(range(len(fixed)), key=lambda i: finals[i])
    target = finals[best]
    result: dict[str, Any] = {"estimator": estimator, "target_loss": target if math.isfinite(target) else None,
                              "best_damping": fixed[best]["start_damping"] if math.isfinite(target) else None,
                              "fixed_final": {str(r["start_damping"]): f if math.isfinite(f) else None
                                              for r, f in zip(fixed, finals)},
                              "fixed_diverged": {str(r["start_damping"]): r["error"] for r in fixed if r["diverged"]},
                              "rows": []}
    best_steps = (time_to_threshold(fixed[best]["steps"], fixed[best]["smoothed"], target)
                  if math.isfinite(target) else None)
    result["best_steps"] = best_steps
    for run in adaptive:
        reached = (time_to_threshold(run["steps"], run["smoothed"], target)
                   if math.isfinite(target) else None)
        ratio = reached / best_steps if reached is not None and best_steps else None
        rhos = [h["rho"] for h in run["damping_history"]]
        moves = [h["damping"] / h["damping_before"] if h["damping_before"] else 1.0 for h in run["damping_history"]]
        result["rows"].append({
            "estimator": estimator, "start": run["start_damping"], "steps_to_L*": reached, "best_fixed_steps": best_steps,
            "ratio": ratio, "within_1.5x": ratio is not None and ratio <= CLAIM_RATIO,
            "final_loss": final_smoothed(run) if math.isfinite(final_smoothed(run)) else None,
            "final_damping": run["final_damping"], "final_gamma": run.get("final_gamma"),
            "min_damping": min([run["start_damping"]] + [h["damping"] for h in run["damping_history"]]),
            "max_damping": max([run["start_damping"]] + [h["damping"] for h in run["damping_history"]]),
            "best_fixed_damping": result["best_damping"],
            "steps_to_travel": (steps_to_travel(run["start_damping"], result["best_damping"], interval, omega)
                                if result["best_damping"] else None),
            "adaptations": len(rhos), "down": sum(m < 1 for m in moves), "up": sum(m > 1 for m in moves),
            "rho_nan": sum(1 for r in rhos if math.isnan(r)),
            "median_rho": _median([r for r in rhos if math.isfinite(r)]),
            "diverged_at": run["error"].split(":")[0] if run["diverged"] else None})
    return result


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def plot(results: dict[str, dict[str, Any]], summaries: dict[str, dict[str, Any]], cfg: dict[str, Any],
         out: Path, title: str) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    names = list(results)
    fig = Figure(figsize=(4.3 * len(names), 8.4), layout="constrained")
    axes = fig.subplots(3, len(names), squeeze=False)
    cmap = colormaps["viridis"]
    thick = {cfg["starts"][0]: "tab:red", cfg["starts"][-1]: "tab:blue"}
    budget = cfg["steps"]
    for j, est in enumerate(names):
        res, summ = results[est], summaries[est]
        ax_loss, ax_damp, ax_rho = axes[0][j], axes[1][j], axes[2][j]
        for k, run in enumerate(res["fixed"]):
            color = cmap(k / max(1, len(res["fixed"]) - 1))
            label = f"fixed {run['start_damping']:g}" + (" (div.)" if run["diverged"] else "")
            ax_loss.plot(run["steps"], run["smoothed"], lw=0.9, color=color, label=label)
            ax_damp.axhline(run["start_damping"], lw=0.6, ls=":", color=color)
        for run in res["adaptive"]:
            color = thick.get(run["start_damping"], "black")
            label = f"LM from {run['start_damping']:g}" + (" (div.)" if run["diverged"] else "")
            ax_loss.plot(run["steps"], run["smoothed"], lw=2.4, color=color, label=label, alpha=0.85)
            hist = run["damping_history"]
            ax_damp.plot([0] + [h["step"] + 1 for h in hist], [run["start_damping"]] + [h["damping"] for h in hist],
                         lw=2, color=color, label=label)
            if run.get("gamma_history"):
                ax_damp.plot([0] + [h["step"] + 1 for h in run["gamma_history"]],
                             [run["start_damping"]] + [h["gamma"] for h in run["gamma_history"]], lw=1.2, ls="--",
                             color=color, label=f"gamma from {run['start_damping']:g}")
            ax_rho.plot([h["step"] + 1 for h in hist], [min(max(h["rho"], -RHO_CLIP), RHO_CLIP) for h in hist], ".",
                        ms=3, color=color, label=label)
        if summ["target_loss"] is not None:
            ax_loss.axhline(summ["target_loss"], color="grey", lw=0.6, ls="--")
            ax_loss.axvline(CLAIM_RATIO * (summ["best_steps"] or budget), color="grey", lw=0.6, ls=":")
        ax_loss.axvline(budget, color="grey", lw=0.6)
        ax_loss.set_yscale("log")
        start = res["fixed"][0]["loss"][0]                 # every run starts from the same initialisation
        finite = [v for run in res["fixed"] + res["adaptive"] for v in run["smoothed"] if math.isfinite(v)]
        ax_loss.set_ylim(0.8 * min(finite), 3 * start)     # blown-up runs leave the panel at the top
        ax_loss.set_title(f"{est} ({res['rule']}, lr {res['lr']:g})"
                          + (f"\nL* = {summ['target_loss']:.4f} (fixed {summ['best_damping']:g} at {summ['best_steps']})"
                             if summ["target_loss"] is not None else "\nevery fixed run diverged"), fontsize=9)
        ax_loss.set_ylabel("train loss (eval subset, smoothed)")
        ax_loss.legend(fontsize=6)
        ax_damp.set_yscale("log")
        ax_damp.set_ylabel("damping lambda (dotted: fixed grid;\ndashed: curvature's gamma)", fontsize=8)
        ax_damp.legend(fontsize=6)
        ax_rho.set_yscale("symlog", linthresh=0.1)
        for level in (0.25, 0.75, 1.0):
            ax_rho.axhline(level, color="grey", lw=0.5, ls="--" if level != 1.0 else "-")
        ax_rho.set_ylim(-1.2 * RHO_CLIP, 1.2 * RHO_CLIP)
        ax_rho.set_ylabel(f"rho (symlog, clipped at +-{RHO_CLIP:g}; NaN not shown)", fontsize=8)
        for ax in (ax_loss, ax_damp, ax_rho):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, out, "damping")


def reusable_fixed(path: str, cfg: dict[str, Any], args: Any, dataset: str) -> dict[str, dict[str, Any]]:
    """``{estimator: {str(damping): run}}`` of the fixed runs in an earlier ``damping.json``; ValueError naming the
    first setting that differs (mode, rule, seed, data set or any preset value)."""
    import json

    old = json.loads(Path(path).read_text())
    mine = {"mode": args.mode, "rule": args.rule, "seed": args.seed, "dataset": dataset,
            **{k: v for k, v in cfg.items() if k not in ("starts", "estimators")}}
    theirs = {"mode": old["mode"], "dataset": old["dataset"], **old["config"]}
    for key, value in mine.items():
        if theirs.get(key) != value:
            raise ValueError(f"--reuse-fixed {path}: its {key} is {theirs.get(key)!r}, this run's {value!r}")
    return {est: {str(r["start_damping"]): r for r in res["fixed"]} for est, res in old["estimators"].items()
            if all(str(d) in {str(r["start_damping"]) for r in res["fixed"]} for d in cfg["grid"])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = paper_mode_parser(__doc__.split("\n\n")[0], "out/damping")
    next(a for a in p._actions if a.dest == "mode").choices = tuple(PRESETS)     # + small: a screen of minutes
    p.add_argument("--estimators", default=None, help="comma-separated (default: kfac,shampoo,miniblock)")
    p.add_argument("--rule", default="natural", choices=("natural", "qmodel"))
    p.add_argument("--steps", type=int, default=None, help="fixed budget B (default by mode)")
    p.add_argument("--reuse-fixed", default=None, metavar="JSON",
                   help="take the fixed-grid runs from an earlier damping.json of the same mode, rule, data and seed "
                        "(they do not depend on --mechanism)")
    p.add_argument("--kl-clip", default="suggested",
                   help="trust region of EVERY run (fixed and adaptive): 'suggested' (the estimators' suggested "
                        "kl_clip, None; the default), 'default' (the library default: natural 1e-3, qmodel 1e-2) "
                        "or a number")
    p.add_argument("--mechanism", default="lm", choices=tuple(MECHANISMS),
                   help="what the adaptive runs add to damping_adapt='lm' (lm+gamma: Martens & Grosse's gamma rule)")
    p.add_argument("--rho", default="same", choices=("same", "next"),
                   help="the adaptive runs' damping_rho: rho's actual loss change on the step's own batch ('same') or "
                        "on the next step's batch ('next', a held-out ratio)")
    args = p.parse_args(argv)
    cfg = dict(PRESETS[args.mode])
    if args.estimators:
        cfg["estimators"] = args.estimators.split(",")
    if args.steps:
        cfg["steps"] = args.steps
    if args.kl_clip != "suggested":
        cfg["kl_clip"] = args.kl_clip
    device = torch.device(args.device)
    split, name = mnist_or_fallback(args.data_dir, num_train=cfg["num_train"], num_test=1)
    x, y = split.x_train.flatten(1).to(device), split.y_train.to(device)
    data = {"x": x, "y": y, "x_eval": x[:cfg["num_eval"]], "y_eval": y[:cfg["num_eval"]],
            "classes": split.num_classes}
    defaults = curvlab.hyper.COMMON
    interval = defaults["damping_interval"].default
    omega = (19 / 20) ** interval
    adaptive_steps = int(BUDGET_FACTOR * cfg["steps"])
    print(f"[{args.mode}] {name}: {len(x)} training examples (eval subset {len(data['x_eval'])}), MLP "
          f"{x.shape[1]}-{cfg['width']}-{cfg['width']}-{split.num_classes} ReLU, batch {cfg['batch']}, rule "
          f"{args.rule}; fixed grid {cfg['grid']} for {cfg['steps']} steps, LM from {cfg['starts']} for "
          f"{adaptive_steps} steps (interval {interval}, omega {omega:.4f}, mechanism {args.mechanism}, rho {args.rho})")
    results, summaries = {}, {}
    reused = reusable_fixed(args.reuse_fixed, cfg, args, name) if args.reuse_fixed else {}
    for est in cfg["estimators"]:
        fixed = []
        for d in cfg["grid"]:
            fixed.append(reused[est][str(d)] if est in reused else
                         train(est, args.rule, d, False, data, cfg, cfg["steps"], args.seed))
            print(f"  {est} fixed {d:g}: final smoothed loss {final_smoothed(fixed[-1]):.4g}"
                  + (f"  [{fixed[-1]['error']}]" if fixed[-1]["diverged"] else ""), flush=True)
        adaptive = []
        for d in cfg["starts"]:
            adaptive.append(train(est, args.rule, d, True, data, cfg, adaptive_steps, args.seed, args.mechanism,
                                  args.rho))
            print(f"  {est} LM from {d:g}: final smoothed loss {final_smoothed(adaptive[-1]):.4g}, damping "
                  f"{adaptive[-1]['final_damping']:.3g}" + (f"  [{adaptive[-1]['error']}]" if adaptive[-1]["diverged"]
                                                           else ""), flush=True)
        results[est] = {"lr": fixed[0]["lr"], "rule": args.rule,
                        "hyper": hyper_for(est, args.rule, cfg.get("kl_clip", "suggested")),
                        "fixed": fixed, "adaptive": adaptive}
        summaries[est] = summarize(est, fixed, adaptive, interval, omega)
    rows = [r for s in summaries.values() for r in s["rows"]]
    print(f"\nL* = the best fixed damping's final smoothed loss after {cfg['steps']} steps; ratio = adaptive steps to "
          f"L* / the best fixed run's steps to L*; claim: ratio <= {CLAIM_RATIO}")
    print(format_table(rows, ["estimator", "start", "steps_to_L*", "best_fixed_steps", "ratio", "within_1.5x",
                              "final_damping", "final_gamma", "final_loss", "best_fixed_damping", "steps_to_travel",
                              "down", "up",
                              "rho_nan", "median_rho", "diverged_at"]))
    print("\nfixed grid, final smoothed loss ('-' = diverged):")
    grid_rows = [{"estimator": est, "L*": s["target_loss"], **{f"{d:g}": s["fixed_final"][str(d)] for d in cfg["grid"]}}
                 for est, s in summaries.items()]
    print(format_table(grid_rows, ["estimator", "L*"] + [f"{d:g}" for d in cfg["grid"]]))
    out = Path(args.out)
    plot(results, summaries, cfg, out, f"{name}, MLP width {cfg['width']}, batch {cfg['batch']}: fixed damping "
                                       f"({cfg['steps']} steps) vs adaptive {args.mechanism}, rho {args.rho} ({adaptive_steps} steps), "
                                       f"rule {args.rule}")
    numbers = {"mode": args.mode, "dataset": name,
               "config": {**cfg, "rule": args.rule, "mechanism": args.mechanism, "rho": args.rho,
                          "mechanism_hyper": MECHANISMS[args.mechanism],
                          "seed": args.seed, "budget_factor": BUDGET_FACTOR,
                          "adaptive_steps": adaptive_steps, "claim_ratio": CLAIM_RATIO, "smooth_window": SMOOTH,
                          "damping_interval": interval, "damping_omega": omega,
                          "damping_min": defaults["damping_min"].default,
                          "damping_max": defaults["damping_max"].default, "activation": "relu", "depth": 2,
                          "loss": "cross_entropy", "num_train_used": len(x)},
               "estimators": results, "summary": summaries, "table": rows}
    write_numbers(out, "damping", numbers)
    print(f"wrote {out}/damping.png, .pdf, .json")
    return numbers


if __name__ == "__main__":
    main()
