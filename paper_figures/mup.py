"""Learning-rate transfer across width for K-FAC and Shampoo under SP and muP: Figure 6 of Ishikawa & Karakida,
"On the Parameterization of Second-Order Optimization Effective Towards the Infinite Width" (ICLR 2024,
arXiv 2312.12226); ALGORITHMS.md 5.4.

What it runs: a ReLU MLP (input, hidden, output weight layers, ``curvlab.models.build_mlp(depth=2)``) on MNIST,
MSE on one-hot targets (the loss of the paper's theory and the reference code's default), batch 128, trained for a
fixed number of epochs at every (estimator, scaling, width, lr, seed): K-FAC (per-side damping 0.03, inverses
every step) and Shampoo (suggested: relative epsilon 0.03, exponent 1/4, inverse roots every 5 steps) with
``rule="natural"``, and SGD (estimator ``identity``, momentum 0.9) as the first-order reference, each under
``scaling="standard"`` and ``scaling="mup"`` with ``base_width`` = the smallest width, where the two are the same
run (checked: the printed SP-vs-muP difference at that width is exactly 0). Plotted: final train loss vs lr, one
curve per width (the layout of the paper's Figure 6), best lr starred. Printed: the best lr per width and the
shift ``log2(best_lr(largest) / best_lr(smallest))`` per estimator x scaling.

Modes (``--mode``): ``tiny`` (seconds; MNIST 256 examples pooled to 7x7, widths 16/32, 3 lrs: a smoke test),
``quick`` (~4-8 minutes on one CPU thread: 6000 examples pooled to 14x14, widths 32..256, 7 lrs x2 apart,
3 epochs, 1 seed), ``full`` (a GPU: full 28x28 MNIST, widths 64..2048, 9 lrs, 2 epochs, 3 seeds; never run so
far: no GPU was available when this was written).

Agreement with the paper, measured in quick mode, seed 0 (numbers in paper_figures/README.md, "Width
transfer"; a second seed moves single best lrs by +-1 grid step, so one-seed shifts are good to about +-1):

* Agrees: under muP the best lr of SGD and Shampoo stays at the same grid point from width 32 to 256 (and
  Shampoo's from 32 to 512) and the loss at that lr improves monotonically with width; under SP the SGD optimum
  moves one grid step down (x1/2) and its two largest lrs diverge at width 256, and SP-Shampoo's loss stops
  improving with width (width 256 worse than 128; at 512 it is 30% above muP's). muP beats SP at every width
  above the base for all three optimizers.
* Partly: K-FAC's best lr moves one step down (0.2 -> 0.1) under both scalings; under muP 0.2 stays stable and
  within 15% of the best loss at width 256, under SP 0.2 diverges there. The paper reports K-FAC-muP transfer
  with a slight drift to smaller lrs at the largest width (reviews, ALGORITHMS.md 5.4), so this is consistent,
  but the clean "optimum stays put" picture is not reproduced at this scale.
* Not reproduced: SP-Shampoo's optimum does not drift over 32..512 (the one-step theory predicts ~x1/sqrt(r),
  i.e. -1.5 log2 at r = 8); with cross-entropy instead of MSE no SP optimum drifted at all (SGD up to width 1024).
* Different: the paper's MLP goes to width 16384 and trains much longer; here widths span 8x-16x and training is
  141 steps, so the best lr is largely the largest stable one. SP here is the reference code's SP (b = 1/2,
  c = 0, width-independent damping) with the output scale matched to muP at the base width, not PyTorch's init.
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
