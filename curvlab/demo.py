"""``curvlab demo``: the main job, an ablation of every registered estimator (natural-gradient rule)
against the SGD, SNGM and FOP baselines on scikit-learn's digits (offline, a few minutes on 2 CPU cores).

It prints the result table (final test accuracy, epochs to the target accuracy, step time relative to
SGD, ...) and writes, into ``--out`` (default ``demo_output/``): ``runs/<run id>/`` (one run directory
per method and seed), ``report/`` (``report.csv``, ``runs.csv``, ``report.txt``, ``curves.png``,
``best_variant.png``) and ``results.json``. ``--data-dir DIR`` runs it on MNIST read from DIR (the four
IDX files), ``--data mnist1d`` on MNIST-1D. Each call retrains every method (earlier runs in
``--out`` are replaced); ``--resume`` instead keeps finished runs and only trains what is missing (after
an interruption, or to add seeds). See :mod:`curvlab.experiments.ablation` for the methods and hyper-parameters.

Then, unless ``--tune-trials 0``, the same methods under the equal-budget protocol
(:mod:`curvlab.experiments.tuned_ablation`): each tuned with the same number of trials on a validation split
(learning rate; damping too for second-order methods), the best configuration re-run with several seeds on the
test set, test mean +- std printed and written to ``--out/tuned/``. The tuned tunes resume like the runs (they
are kept across calls; delete ``--out/tuned`` to tune again).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "parse_args"]


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo."""
    parser = argparse.ArgumentParser(prog="curvlab demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", choices=["digits", "mnist1d", "mnist"],
                        help="data set (default: digits, bundled with scikit-learn)")
    parser.add_argument("--data-dir", help="directory with the four MNIST IDX files: runs the ablation on MNIST")
    parser.add_argument("--model", choices=["mlp", "cnn", "resnet"], help="model (default: an MLP)")
    parser.add_argument("--width", type=_positive_int, help="model width")
    parser.add_argument("--epochs", type=_positive_int, help="epochs per method (default: per data set)")
    parser.add_argument("--batch-size", type=_positive_int, help="minibatch size (default: per data set)")
    parser.add_argument("--seeds", type=_positive_int, default=1, help="seeds per method (default 1)")
    parser.add_argument("--estimators", help="comma-separated subset of the estimators (baselines always run)")
    parser.add_argument("--workers", type=_positive_int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes (default: min(2, CPUs))")
    parser.add_argument("--target", type=float, help="target test accuracy for 'epochs to target'")
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--resume", action="store_true",
                        help="keep finished runs in --out and train only the missing ones (default: retrain all)")
    parser.add_argument("--tune-trials", type=int, default=6, metavar="N",
                        help="then the equal-budget comparison: every method tuned with N trials (lr, and damping "
                        "for second-order methods) on a validation split, the best re-run with --tune-seeds seeds "
                        "on the test set (default 6; 0 skips it)")
    parser.add_argument("--tune-seeds", type=_positive_int, default=2, help="test re-runs per tuned method (default 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the ablation, print its table, write its files; return the results (see ``results.json``)."""
    from curvlab.experiments.ablation import run_ablation

    args = parse_args(argv)
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()] if args.estimators else None
    results = run_ablation(args.out, quiet=args.quiet, fresh=not args.resume, data=args.data, data_dir=args.data_dir,
                           epochs=args.epochs, batch_size=args.batch_size, seeds=args.seeds, model=args.model,
                           width=args.width, estimators=estimators, workers=args.workers, target=args.target)
    cfg = results["config"]
    train = cfg["train"]
    print(f"\n{cfg['name']}: model {cfg['model']['name']} (width {cfg['model'].get('width', 'default')}), "
          f"{train['epochs']} epochs, batch {train['batch_size']}, {args.seeds} seed(s); "
          f"{results['ran']} run(s) trained in {results['elapsed_s']:.1f} s"
          + (" (finished runs reused: --resume)" if args.resume else ""))
    print(f"natural-gradient rule for every estimator; sgd = identity+natural, sngm = identity+sngm, "
          f"fop = kfac+fop; ep->target: first epoch with test accuracy >= {train['target_accuracy']:g}; "
          "'x sgd': mean step time over SGD's")
    print(results["table"])
    for run_id, error in results["failed"].items():
        print(f"FAILED {run_id}: {error.strip().splitlines()[-1]}")
    print("wrote " + ", ".join(str(p) for p in results["report"]["files"]) + f", {args.out}/results.json")
    if args.tune_trials > 0:
        import time

        from curvlab.experiments.tuned_ablation import run_tuned_ablation

        start = time.perf_counter()
        tuned = run_tuned_ablation(f"{args.out}/tuned", trials=args.tune_trials, seeds=args.tune_seeds,
                                   workers=args.workers, data=args.data, data_dir=args.data_dir, epochs=args.epochs,
                                   batch_size=args.batch_size, model=args.model, width=args.width,
                                   estimators=estimators, target=args.target)
        print(f"\nequal-budget comparison ({time.perf_counter() - start:.1f} s): each method's lr (and damping for "
              f"second-order methods) tuned within a factor 10 of its suggested value with {args.tune_trials} quasi-random "
              f"trials, selected on 20% of the training set held out; test accuracy of the best over "
              f"{args.tune_seeds} seeds")
        print(tuned["table"])
        print(f"wrote {args.out}/tuned/<method>/ (tune.json, best.json, report/), {args.out}/tuned/comparison.txt")
        results["tuned"] = tuned
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
