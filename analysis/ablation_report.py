"""Ablation report of a finished sweep: heat map (e.g. estimator x rule), a metric against an axis (e.g.
accuracy vs batch size, one line per optimizer variant) and a time-to-target table.

Wiring only: every computation is :mod:`curvlab.experiments.ablation_report`. Usage::

    python analysis/ablation_report.py SWEEP_DIR --heatmap estimator,rule --vs lr --target 0.95
    python analysis/ablation_report.py --quick --out /tmp/ablation    # runs a small estimator x rule x lr
                                                                     # sweep on digits itself (about a minute)
    python analysis/ablation_report.py --tiny --out /tmp/ablation     # seconds (what the test suite runs)

Writes into ``--out`` (default ``SWEEP_DIR/report``): the standard report (``report.csv``, ``runs.csv``,
``curves.png``, ...), ``heatmap_<row>_<col>_<metric>.{png,pdf,csv,txt}``, ``<metric>_vs_<axis>.*`` and
``time_to_<target>_by_<axis>.*``, and every table in ``ablation.json``. Axis names: a sweep axis, any
config key or its unique last part (``estimator``, ``batch_size``), several joined by ``+``.

The quick sweep: a tanh MLP on scikit-learn's digits, estimators {identity, kfac, shampoo} x rules
{natural, fop, sngm} x lr {0.03, 0.1, 0.3}, momentum 0.9, each estimator's other ``suggested`` values,
batch 64, 4 epochs, target 0.95. Each cell of the heat map is the configuration at its best lr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from curvlab.experiments import report, run_sweep
from curvlab.experiments.ablation_report import heatmap, metric_vs_axis, time_to_target_table
from curvlab.figures import write_numbers


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", nargs="?", help="a finished sweep folder (or any folder of run directories)")
    p.add_argument("--quick", action="store_true", help="run the small digits sweep first and report it")
    p.add_argument("--tiny", action="store_true", help="like --quick but in seconds (the test suite)")
    p.add_argument("--out", help="output folder (default SWEEP/report; with --quick/--tiny: "
                   "analysis_output/ablation)")
    p.add_argument("--heatmap", default="estimator,rule", metavar="ROW,COL", help="heat map axes ('' = none)")
    p.add_argument("--vs", default="lr", metavar="AXIS", help="x axis of the metric plot ('' = none)")
    p.add_argument("--series", default=None, metavar="AXIS", help="lines of --vs (default variant, else "
                   "estimator+rule)")
    p.add_argument("--metric", default="final_test_accuracy", help="summary key for the heat map and --vs")
    p.add_argument("--target", type=float, default=0.95, help="test accuracy of the time-to-target table")
    p.add_argument("--by", default=None, help="rows[,columns] of the time-to-target table (default: "
                   "--series, else variant, else estimator+rule)")
    p.add_argument("--workers", type=int, default=1, help="parallel runs for --quick")
    args = p.parse_args(argv)
    if not args.sweep and not (args.quick or args.tiny):
        p.error("give a sweep folder, or --quick / --tiny to run the small digits sweep")
    return args


def quick_sweep(tiny: bool) -> dict[str, Any]:
    """The estimator x rule (x lr) sweep on digits that --quick / --tiny run."""
    return {
        "data": {"name": "digits"},
        "model": {"name": "mlp", "width": 32 if tiny else 64, "depth": 1 if tiny else 2},
        "optimizer": {"momentum": 0.9},
        "train": {"epochs": 1 if tiny else 4, "batch_size": 128 if tiny else 64, "target_accuracy": 0.95},
        "sweep": {"grid": {"optimizer.estimator": ["identity", "kfac"] if tiny else ["identity", "kfac", "shampoo"],
                           "optimizer.rule": ["natural", "sngm"] if tiny else ["natural", "fop", "sngm"],
                           "optimizer.lr": [0.1] if tiny else [0.03, 0.1, 0.3]}},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.quick or args.tiny:
        out = Path(args.out or "analysis_output/ablation")
        root = out / "sweep"
        result = run_sweep(quick_sweep(args.tiny), root, workers=args.workers, quiet=args.tiny)
        if result.failed:
            raise SystemExit(f"{len(result.failed)} run(s) failed: see {root}/runs/<id>/error.txt")
    else:
        root = Path(args.sweep)
        out = Path(args.out) if args.out else root / "report"
    numbers: dict[str, Any] = {"root": str(root), "metric": args.metric}
    report(root, out, quiet=True, figures=not args.tiny)  # tiny: the standard report's tables only
    if args.heatmap:
        row, col = args.heatmap.split(",")
        h = heatmap(root, row, col, args.metric, out=out)
        print(h.text(), "\n")
        numbers["heatmap"] = {"rows": h.rows, "cols": h.cols, "values": h.values, "std": h.std,
                              "best_configuration": h.labels, "row_axis": h.row_axis, "col_axis": h.col_axis}
    if args.vs:
        c = metric_vs_axis(root, args.vs, args.series, args.metric, out=out)
        print(c.text(), "\n")
        numbers["vs"] = {"x_axis": c.x_axis, "series_axis": c.series_axis,
                         "points": {str(s): pts for s, pts in c.points.items()}}
    by = args.by.split(",") if args.by else ([args.series] if args.series else None)
    t = time_to_target_table(root, args.target, by, out=out)
    print(t.text())
    numbers["time_to_target"] = {"target": t.target, "rows": t.rows, "cols": t.cols,
                                 "epochs": [[e.epochs for e in row] for row in t.entries],
                                 "seconds": [[e.seconds for e in row] for row in t.entries],
                                 "text": [[e.text() for e in row] for row in t.entries]}
    write_numbers(out, "ablation", numbers)
    print(f"\nwrote the report and figures into {out}")
    return numbers


if __name__ == "__main__":
    main(sys.argv[1:])
