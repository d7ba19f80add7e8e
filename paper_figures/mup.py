"""Learning-rate transfer across width for K-FAC and Shampoo under SP and muP, damping tuned at the base width with
equal budgets: Figure 6 of Ishikawa & Karakida, "On the Parameterization of Second-Order Optimization Effective
Towards the Infinite Width" (ICLR 2024, arXiv 2312.12226); ALGORITHMS.md 5.4.

What it runs (:mod:`curvlab.width_tuning`): a ReLU MLP WITH biases (``curvlab.models.build_mlp(depth=2)``: input,
hidden and output Linear layers) on MNIST, MSE on one-hot targets (the paper's theory and the reference code's
default), batch 128, a fixed number of epochs; 20% of the training examples (stratified, seed ``--seed``) are held
out for validation and the test set is read only by step 1's final re-runs.

1. Tuning at the base width (the smallest): every estimator x scaling gets the same trials (QMC sampler, same
   seed), scored by the final validation MSE: K-FAC (per-side damping, inverses every step) and Shampoo (relative
   epsilon, exponent 1/4, one block per layer side) tune lr and damping in [1e-4, 1]; K-FAC under muP tunes
   ``mup_rho_B0`` as well (``damping`` is its ``rho_A0``) within the same trial count, as the reference code tunes
   ``damping_A`` / ``damping_B``; SGD (``identity``, momentum 0.9) tunes lr. lr range = the sweep's grid. The best
   configuration is re-run with ``test_seeds`` seeds on the test set, with the damping diagnostic.
2. Transfer: the tuned damping is frozen and the lr swept over ONE grid, ``2**k``, shared by all methods, at every
   width (``seeds`` seeds), training on the fitting part; final train loss (the paper's quantity, plotted) and
   validation loss are recorded, with the damping diagnostic of every run.
3. Claims: per estimator, the best-lr shift from the base width under muP against under SP; plus a coordinate
   check WITH biases (one step, float64, widths ``coord_widths``). SP is the reference code's SP with the output
   init matched to muP at the base width, so SP and muP are the same run there (checked: difference exactly 0 for
   SGD and Shampoo; K-FAC differs because its muP row tunes ``rho_B0`` apart).

The JSON (``mup_width_transfer.json``) holds the budget and space per method (``budget``, and ``tuning`` with every
trial), the frozen settings (``config.hyper``), every sweep run, both summaries, the verdicts (``claims``), the
damping diagnostic at each width's best lr (``damping_at_best``) and the coordinate check (``coord_check_bias``).

Modes (``--mode``): ``tiny`` (seconds; MNIST 320 examples pooled to 7x7, widths 16/32, 3 lrs, 2 trials: a smoke
test), ``quick`` (~5 CPU-minutes on one thread: 6000 examples pooled to 14x14, widths 32..256, lrs 2^-9..2, 3
epochs = 113 steps, 8 trials per method, 2 sweep seeds, 3 test seeds), ``full`` (a GPU: full 28x28 MNIST, widths
64..2048, lrs 2^-8..4, 20 trials, 3 seeds; never run: no GPU was lent).

Claims, quick mode (``--seed 0``: validation split and tuning seed 0, sweep seeds 0-1, test seeds 0-2; numbers in
paper_figures/README.md "Width transfer"; one grid step = x2, and with 2 seeds a one-step move is within noise):

| claim | result | evidence |
|---|---|---|
| SGD: the optimal lr transfers under muP, not under SP | reproduced (train loss); partly (validation) | best lr by train loss at 32/64/128/256: muP 1/1/1/2 (lr 1 within 2% at 256), SP 1/1/1/0.5, SP's lr 1 six times worse at 256 and lr 2 diverging from 128; by validation loss muP 1/2/1/1, SP 1/1/1/0.5 |
| K-FAC: the same | not reproduced (validation); partly (train) | tuned muP rho_B0 = 1e-4 (low edge of its range), rho_A0 0.028; muP best lr 0.0156/0.0156/0.0078/0.0078 (train), 0.0156/0.0078/0.0078/0.0039 (validation): its largest stable lr halves per width doubling from 64 (0.031) to 256 (0.0078). SP (damping 0.07 per side) 0.5/0.5/0.5/0.25, every best lr the largest stable one |
| Shampoo: the same | partly | muP 0.0156 at every width by validation loss (train: 0.031 at 128); SP 0.0156/0.0156/0.031/0.0156 (validation), .../0.031/0.031 (train): both within one step |
| muP beats SP at every width above the base, and improves with width | reproduced for SGD and Shampoo; partly for K-FAC (below) | train loss at 256, muP vs SP: SGD 0.0099 vs 0.0121, K-FAC 0.0021 vs 0.0068, Shampoo 0.0133 vs 0.0172 (validation 0.0127 vs 0.0149, 0.0111 vs 0.0148, 0.0151 vs 0.0197); muP monotone in width except Shampoo 0.0130 -> 0.0133 at 256; SP's Shampoo and SGD stall |
| coordinate check with biases: flat under muP, not under SP | reproduced | max/min RMS change over widths 64..1024 (input/hidden/output): muP K-FAC 1.13/1.13/1.06, Shampoo 1.01/1.16/1.10, SGD 1.11/1.08/1.32; SP K-FAC 3.54/1.15/3.51, Shampoo 1.30/1.19/2.67, SGD 3.32/2.61/11.9 |

Damping diagnostic: the tuned SP K-FAC damping (width-independent, 0.07 per side) swamps the G factors (damping /
mean eigenvalue 16 and 10 in the input and hidden layers at the tuned configuration; 30 -> 89 at the best lr from
width 32 to 256, growing with width: SP K-FAC is SGD-like on the G side); muP's tuned per-side damping stays below
the mean eigenvalue (<= 0.95) at every width. Tuned at width 32 (validation MSE; test MSE over 3 seeds): K-FAC SP
0.0152 (0.0229 +- 0.0011), K-FAC muP 0.0149 (0.0212 +- 0.0006), Shampoo 0.0190 (0.0275 +- 0.0014), SGD 0.0174
(0.0243 +- 0.0000).

Robustness of the K-FAC rows (a second, K-FAC-only quick run, same protocol and 8 trials, damping ranges widened to
[1e-6, 1]; ``docs/figures/paper/mup_kfac_wide_damping.json``): the 8 QMC trials then drew a different optimum (SP lr
0.088, damping 0.020; muP lr 0.29, rho_A0 0.029, rho_B0 0.057: none on an edge; validation MSE 0.0142 / 0.0143),
and both scalings' best lr again drifted down one step at 256 (train loss: muP 0.25 -> 0.125, SP 0.125 -> 0.0625;
validation: muP 0.5 -> 0.125, SP 0.125 -> 0.0625): the K-FAC verdict holds. muP's advantage over SP did not: train
loss at 32 / 64 / 128 / 256 muP 0.0106 / 0.0081 / 0.0061 / 0.0046, SP 0.0100 / 0.0081 / 0.0062 / 0.0049
(validation at 256: 0.0118 vs 0.0137), so the 3x gap at 256 of the main run comes with its almost undamped G side.

What changed from the previous (untuned) run and why: damping is no longer fixed (K-FAC 0.03, Shampoo 0.03) but
tuned at the base width with the same 8 trials per method and selected on validation data; one lr grid for all
(before: one per estimator, centred on its suggested lr); the MLP's biases are now handled by Shampoo-muP (its own
bias row); 2 sweep seeds instead of 1. K-FAC's verdict changed: with tied damping 0.03 its best lr moved one step
under both scalings; with the tuned (almost undamped G side) muP configuration it moves one to two steps down.
Different from the paper: widths span 8x (paper: to 16384), 113 steps of training, so the best lr is often the
largest stable one; the tuning budget is 8 trials (K-FAC-muP's 3-D space is thinly covered).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curvlab.figures import paper_mode_parser  # noqa: E402
from curvlab.width_tuning import run_tuned_width_transfer  # noqa: E402

def _grid(lo: int, hi: int) -> list[float]:
    """The lr grid shared by every method: ``2**k`` for ``k = lo .. hi``."""
    return [2.0 ** k for k in range(lo, hi + 1)]


MODES: dict[str, dict[str, Any]] = {
    "tiny": {"widths": [16, 32], "num_train": 320, "num_test": 128, "pool": 4, "epochs": 1.0, "seeds": 1,
             "lrs": _grid(-4, -2), "batch_size": 64, "trials": 2, "test_seeds": 1, "coord_widths": [16, 32]},
    "quick": {"widths": [32, 64, 128, 256], "num_train": 6000, "num_test": 2000, "pool": 2, "epochs": 3.0,
              "seeds": 2, "lrs": _grid(-9, 1), "batch_size": 128, "trials": 8, "test_seeds": 3,
              "coord_widths": [64, 128, 256, 512, 1024]},
    "full": {"widths": [64, 128, 256, 512, 1024, 2048], "num_train": None, "num_test": None, "pool": 1,
             "epochs": 2.0, "seeds": 3, "lrs": _grid(-8, 2), "batch_size": 128, "trials": 20, "test_seeds": 3,
             "coord_widths": [64, 128, 256, 512, 1024, 2048]},
}
ESTIMATORS = ["kfac", "shampoo", "identity"]
SCALINGS = ["standard", "mup"]
#: shared by every tuned setting: K-FAC's per-side ridge (and muP's rho_B0), Shampoo's relative epsilon
DAMPING_RANGE = (1e-4, 1.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = paper_mode_parser(__doc__.split("\n\n")[0], "out/paper_figures/mup")
    args = p.parse_args(argv)
    settings = dict(MODES[args.mode], estimators=ESTIMATORS, scalings=SCALINGS, lr_spacing=2.0, loss="mse",
                    sp_init="matched", val_fraction=0.2, sampler="qmc", damping_range=DAMPING_RANGE,
                    data_dir=args.data_dir, device=args.device, seed=args.seed)
    return run_tuned_width_transfer(settings, args.out, stem="mup_width_transfer", progress=args.mode != "tiny",
                                    title=f"Ishikawa & Karakida (ICLR 2024) Fig. 6-like lr transfer, damping "
                                          f"tuned at the base width ({args.mode})")


if __name__ == "__main__":
    main()
