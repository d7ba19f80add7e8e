"""The ``curvlab`` command: ``list`` what is registered, ``check`` estimators against exact curvature,
``demo`` the main job, ``run``/``sweep``/``report``/``tune`` experiments, ``coord-check`` the muP coordinate check (per-layer update size against width), ``bench`` step time over SGD's."""
from __future__ import annotations

import argparse
import os
import sys


def _print(text: str) -> int:
    """Print to stdout; a reader that stops early (``curvlab list | head``) ends the output quietly (exit 0)."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the rest of the output (and Python's flush at exit) would hit the closed pipe again: send it nowhere
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="curvlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="print the registered components with their options, defaults and suggested "
                         "settings; `curvlab list NAME` shows one with each option's meaning")
    lst.add_argument("names", nargs="*", metavar="NAME",
                     help="components (kfac, natural, mup, linear, digits, mlp, ...), kinds (estimators, ...) or "
                          "'common'")
    chk = sub.add_parser("check", help="relative error of each estimator block against torch.func exact curvature")
    chk.add_argument("--estimator", default=None, help="one estimator (default: K-FAC exact cases + every estimator)")
    sub.add_parser("demo", help="the main job (see `curvlab demo --help`)", add_help=False)
    sub.add_parser("coord-check", help="muP coordinate check (see `curvlab coord-check --help`)", add_help=False)
    sub.add_parser("bench", help="step time over momentum SGD's, table + JSON (see `curvlab bench --help`)",
                   add_help=False)
    for name, text in (("run", "train one configuration into a run directory (see `curvlab run --help`)"),
                       ("sweep", "run a grid of configurations in parallel processes, resumable"),
                       ("report", "tables and figures from finished runs"),
                       ("tune", "tune hyper-parameters on a validation split (Optuna), then test the best")):
        sub.add_parser(name, help=text, add_help=False)
    if argv[:1] in (["run"], ["sweep"], ["report"], ["tune"]):
        from .experiments import cli as exp_cli
        return {"run": exp_cli.run_main, "sweep": exp_cli.sweep_main, "report": exp_cli.report_main,
                "tune": exp_cli.tune_main}[argv[0]](argv[1:])
    if argv[:1] == ["coord-check"]:
        from .coord_check import main as coord_main
        return coord_main(argv[1:])
    if argv[:1] == ["bench"]:
        from .bench.cli import main as bench_main
        bench_main(argv[1:])
        return 0
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main
        demo_main(argv[1:])
        return 0
    args = parser.parse_args(argv)
    if args.command == "list":
        from .listing import UnknownComponent, listing
        import curvlab  # noqa: F401  (registers built-ins)
        import curvlab.data, curvlab.models  # noqa: F401,E401  (register datasets and models)
        try:
            text = listing(args.names)
        except UnknownComponent as err:
            print(f"curvlab list: {err}", file=sys.stderr)
            return 2
        return _print(text)
    elif args.command == "check":
        from .check import run_default_check
        print(run_default_check(args.estimator))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
