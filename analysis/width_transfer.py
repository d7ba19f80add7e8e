"""Width transfer: final train loss vs learning rate, one curve per width, for each estimator x scaling.

Reproduces the protocol of Ishikawa & Karakida (ICLR 2024, arXiv 2312.12226), Figure 6 (ALGORITHMS.md 5.4):
an MLP (input, hidden, output weight layers, ReLU) trained with K-FAC, Shampoo and SGD (estimator ``identity``,
rule ``natural``, momentum) under ``scaling="standard"`` and ``scaling="mup"`` (``base_width`` = smallest width,
where both coincide) for a log grid of learning rates at every width. Prints, per estimator x scaling, the best
lr at each width and the shift ``log2(best_lr(largest) / best_lr(smallest))`` (muP's claim: ~0; SP: drifts).
The computation is :mod:`curvlab.width_transfer`; this script is wiring.

    OMP_NUM_THREADS=1 python analysis/width_transfer.py --quick --out out/width_transfer      # minutes, 1 CPU
    python analysis/width_transfer.py --device cuda --out out/width_transfer_full            # GPU, full MNIST

Writes ``width_transfer.png``/``.pdf`` (the figure) and ``width_transfer.json`` (config, every run, the summary).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curvlab import width_transfer as wt  # noqa: E402

#: sizes of the two modes (``--quick``: minutes on one CPU thread; default: a GPU, full MNIST)
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"widths": [32, 64, 128, 256], "num_train": 6000, "num_test": 2000, "epochs": 3.0, "seeds": 1,
              "lr_points": 7, "pool": 2},
    "full": {"widths": [64, 128, 256, 512, 1024, 2048, 4096], "num_train": None, "num_test": None, "epochs": 2.0,
             "seeds": 3, "lr_points": 9, "pool": 1},
}


def _csv(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
    return parse


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="minutes on one CPU thread (MNIST subset pooled to 14x14, widths 32..256)")
    p.add_argument("--out", default="out/width_transfer", help="output directory (created)")
    p.add_argument("--estimators", type=_csv(str), default=["kfac", "shampoo", "identity"])
    p.add_argument("--scalings", type=_csv(str), default=["standard", "mup"])
    p.add_argument("--widths", type=_csv(int), default=None, help="e.g. 64,128,256,512 (default: by mode)")
    p.add_argument("--lrs", type=_csv(float), default=None,
                   help="one lr grid for every estimator (default: lr_points around each suggested lr)")
    p.add_argument("--lr-points", type=int, default=None)
    p.add_argument("--lr-spacing", type=float, default=2.0, help="ratio of neighbouring lrs of the default grid")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-train", type=int, default=None)
    p.add_argument("--num-test", type=int, default=None)
    p.add_argument("--pool", type=int, default=None,
                   help="average-pool MNIST images by this factor (quick: 2, i.e. 14x14 inputs; full: 1)")
    p.add_argument("--base-width", type=float, default=None, help="muP M0 (default: the smallest width)")
    p.add_argument("--loss", choices=wt.LOSSES, default="mse",
                   help="mse (default: one-hot targets, (1/C)||f - y||^2, the paper's theory and reference code's "
                        "default) or cross_entropy (shows much less drift at these sizes, see README)")
    p.add_argument("--sp-init", choices=wt.SP_INITS, default="matched")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    settings = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("widths", "num_train", "num_test", "epochs", "seeds", "lr_points", "pool"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["seeds"] < 1:
        raise SystemExit(f"--seeds must be >= 1, got {settings['seeds']}")
    settings.update(estimators=args.estimators, scalings=args.scalings, lrs=args.lrs, lr_spacing=args.lr_spacing,
                    batch_size=args.batch_size, base_width=args.base_width, sp_init=args.sp_init, loss=args.loss,
                    data_dir=args.data_dir, device=args.device)
    return wt.run_width_transfer(settings, args.out, progress=not args.no_progress)


if __name__ == "__main__":
    main()
