"""Command-line entry points ``curvlab run``, ``curvlab sweep``, ``curvlab report`` and ``curvlab tune``.

``run_main(argv)``, ``sweep_main(argv)``, ``report_main(argv)`` and ``tune_main(argv)`` take the arguments after the
sub-command and return an exit status (0 ok, 1 some runs failed, 2 bad configuration or input).

Overrides, for ``run`` and ``sweep``: ``--set optimizer.lr=0.1`` (repeatable) or the same key as a flag,
``--optimizer.lr 0.1`` / ``--optimizer.lr=0.1``; values are TOML values, bare words are strings
(:func:`curvlab.experiments.config.parse_value`). For a sweep, ``--set sweep.grid.optimizer.lr=[0.1,0.3]``
changes an axis.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, apply_overrides, load_config, parse_value, resolve_config, run_id

__all__ = ["run_main", "sweep_main", "report_main", "tune_main", "parse_overrides"]

_EXPECTED = (ConfigError, ValueError, TypeError, ImportError)


def parse_overrides(argv: Sequence[str], sets: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Split dotted flags (``--a.b v`` / ``--a.b=v``) out of ``argv``; return ``(other arguments,
    key=value overrides)``, the ``--set`` values ``sets`` first. Done before argparse sees ``argv``, so
    a flag's value is never mistaken for a positional argument.

    Raises:
        ConfigError: a dotted flag without a value, or an override that is not ``section.key=value``.
    """
    rest: list[str] = []
    out = list(sets)
    i = 0
    while i < len(argv):
        token = argv[i]
        key = token[2:] if token.startswith("--") else ""
        if "." in key.partition("=")[0]:
            if "=" in key:
                out.append(key)
            elif i + 1 < len(argv):
                out.append(f"{key}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"{token} needs a value, e.g. {token} 0.1")
        else:
            rest.append(token)
        i += 1
    for item in out:
        key, sep, _ = item.partition("=")
        if not sep or ("." not in key and key not in ("name", "imports")):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optimizer.lr=0.1)")
    return rest, out


def _load(path: str | None, overrides: list[str]) -> dict:
    cfg = load_config(path) if path else {}
    return apply_overrides(cfg, overrides)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The parsed arguments of a config command and its config overrides: every ``--set KEY=VALUE`` followed by the
    dotted ``--train.epochs 3`` forms (:func:`parse_overrides`; ``ConfigError`` on a malformed one)."""
    rest, dotted = parse_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    return args, [*args.set, *dotted]


def _fail(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def run_main(argv: Sequence[str] | None = None) -> int:
    """``curvlab run [CONFIG] [--set k=v ...] [--out runs]``: train one configuration."""
    parser = argparse.ArgumentParser(prog="curvlab run", description="Train one configuration into a run "
                                     "directory (resolved config, metrics.jsonl, summary.json, DONE).",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="TOML / YAML / JSON config (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", default="runs", help="parent folder of the run directory (default: runs)")
    parser.add_argument("--run-dir", help="exact run directory (default: OUT/<run id>)")
    parser.add_argument("--force", action="store_true", help="train again even if the run finished before")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, only the final line")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and run id, stop")
    try:
        args, overrides = _parse(parser, argv)
    except ConfigError as err:
        return _fail(err)
    try:
        cfg = _load(args.config, overrides)
        if "sweep" in cfg:
            raise ConfigError(f"{args.config} has a [sweep] table: run it with `curvlab sweep {args.config}`")
        resolved = resolve_config(cfg)
        if args.print_config:
            print(json.dumps(resolved, indent=2))
            print(f"run id: {run_id(resolved)}")
            return 0
        from .runner import run

        result = run(resolved, args.out, run_dir=args.run_dir, quiet=args.quiet, force=args.force)
    except _EXPECTED as err:
        return _fail(err)
    except KeyboardInterrupt:
        print("\ninterrupted: the same command resumes from the last finished epoch", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    s = result.summary
    state = "already finished" if result.skipped else "finished"
    acc = s.get("final_test_accuracy")
    what = f"final test accuracy {acc:.4f}, epochs to {s['target_accuracy']:g}: {s.get('epochs_to_target') or '-'}" \
        if acc is not None else f"final test loss {s['final_test_loss']:.6g}"
    if s.get("diverged"):
        state += f" (DIVERGED after {s['steps']} steps: {s.get('diverged_reason')})"
    print(f"run {result.run_id} {state}: {what}, step {s['mean_step_ms']:.2f} ms "
          f"(refresh {s['refresh_ms_per_step']:.2f} ms/step) -> {result.run_dir}")
    return 0


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """``curvlab sweep CONFIG [--workers N] [--out DIR] [--launcher local|submitit|local-submitit ...]``: run a
    grid, resumable (locally or as SLURM jobs through submitit); then report it."""
    parser = argparse.ArgumentParser(prog="curvlab sweep", description="Expand the config's [sweep] grid into "
                                     "runs, run the unfinished ones in parallel processes, report.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML / YAML / JSON config with a [sweep] table")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", help="sweep folder (default: sweeps/<config file stem>)")
    parser.add_argument("--workers", type=int, help="parallel processes (default: sweep.workers or 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list the runs (id, finished, name) and stop")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    group = _launcher_flags(parser, "launcher (sweep.launcher; see curvlab.experiments.submitit_launcher)")
    group.add_argument("--no-wait", action="store_true", help="submitit: return after submitting; run the same "
                       "command again later to collect the results and report")
    try:
        args, overrides = _parse(parser, argv)
    except ConfigError as err:
        return _fail(err)
    from .runner import is_finished
    from .sweep import expand_sweep, run_sweep

    out = Path(args.out or Path("sweeps") / Path(args.config).stem)
    try:
        cfg = _load(args.config, overrides)
        if args.list:
            for point in expand_sweep(cfg):
                done = "done" if is_finished(out / "runs" / point.run_id) else "todo"
                print(f"{point.run_id}  {done}  {point.config['name']}")
            return 0
        result = run_sweep(cfg, out, workers=args.workers, quiet=args.quiet, launcher=_launcher(cfg, args))
    except _EXPECTED as err:
        return _fail(err)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are kept; `curvlab sweep {args.config} --out {out}` resumes",
              file=sys.stderr)
        return 130
    if result.pending:
        print(f"{len(result.pending)} run(s) submitted and not finished yet; `curvlab sweep {args.config} --out "
              f"{out}` collects them later (nothing is submitted twice while its job lives)")
        return 0
    if not args.no_report and len(result.failed) < len(result.run_ids):
        from .reporting import report

        report(out, quiet=args.quiet)
    if result.failed:
        print(f"{len(result.failed)} run(s) failed (see runs/<id>/error.txt); run the sweep again to retry them: "
              + ", ".join(result.failed), file=sys.stderr)
        return 1
    return 0


def _launcher_flags(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The ``--launcher`` options shared by ``curvlab sweep`` and ``curvlab tune``; returns their group."""
    group = parser.add_argument_group(title)
    group.add_argument("--launcher", choices=("local", "submitit", "local-submitit"),
                       help="local processes (default), SLURM jobs through submitit, or submitit's local executor "
                       "(testing)")
    for flag, kind, text in (("--partition", str, "SLURM partition"),
                             ("--timeout-min", float, "job time limit in minutes (default 60)"),
                             ("--nodes", int, "nodes per job (default 1)"),
                             ("--tasks-per-node", int, "tasks per node; > 1 makes each run data parallel"),
                             ("--gpus-per-node", int, "GPUs per node (default 0)"),
                             ("--cpus-per-task", int, "CPUs per task"), ("--mem-gb", float, "memory per node")):
        group.add_argument(flag, type=kind, help=text)
    group.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch option, e.g. --slurm-arg account=abc --slurm-arg qos=high (repeatable)")
    return group


def _launcher(cfg: dict, args: argparse.Namespace, table: str = "sweep") -> dict | None:
    """``<table>.launcher`` of ``cfg`` (a name or a table) updated with the launcher flags; None if neither."""
    given = (cfg.get(table) or {}).get("launcher")
    launcher = {"name": given} if isinstance(given, str) else dict(given or {})
    if args.launcher:
        launcher["name"] = args.launcher
    for key in ("partition", "timeout_min", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb"):
        if getattr(args, key) is not None:
            launcher[key] = getattr(args, key)
    if args.slurm_arg:
        extra = dict(launcher.get("slurm_args") or {})
        for item in args.slurm_arg:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--slurm-arg {item!r} must look like KEY=VALUE, e.g. account=abc")
            extra[key.strip()] = parse_value(value.strip())
        launcher["slurm_args"] = extra
    if getattr(args, "no_wait", False):
        launcher["wait"] = False
    return launcher or None


def tune_main(argv: Sequence[str] | None = None) -> int:
    """``curvlab tune CONFIG --trials N [--workers K] [--out DIR] [--storage URL] [--launcher submitit ...]``."""
    from .tune import __doc__ as tune_doc

    parser = argparse.ArgumentParser(prog="curvlab tune", description="Tune the config's [tune.space] on a "
                                     "validation split carved from the training data (Optuna; resumable, shared by "
                                     "workers), then re-run the best configuration with several seeds on the test "
                                     "set.", epilog=tune_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML / YAML / JSON config with a [tune] table")
    parser.add_argument("--trials", type=int, help="the budget: finished trials (default: tune.trials)")
    parser.add_argument("--workers", type=int, help="parallel worker processes sharing the study (default: "
                        "tune.workers or 1)")
    parser.add_argument("--out", help="tune folder: study.db, runs/, final/, tune.json, best.json, report/ "
                        "(default: tunes/<config file stem>)")
    parser.add_argument("--storage", help="Optuna RDB URL of the study, e.g. postgresql://host/db for workers on "
                        "several machines (default: sqlite:///OUT/study.db)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _launcher_flags(parser, "launcher (tune.launcher, a table as sweep.launcher): where the workers run")
    try:
        args, overrides = _parse(parser, argv)
    except ConfigError as err:
        return _fail(err)
    from .tune import run_tune

    out = Path(args.out or Path("tunes") / Path(args.config).stem)
    try:
        cfg = _load(args.config, overrides)
        launcher = _launcher(cfg, args, "tune")
        run_tune(cfg, out, trials=args.trials, workers=args.workers, storage=args.storage,
                 launcher=launcher, quiet=args.quiet)
    except (*_EXPECTED, RuntimeError) as err:
        return _fail(err)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished trials are kept; `curvlab tune {args.config} --out {out}` resumes",
              file=sys.stderr)
        return 130
    return 0


def report_main(argv: Sequence[str] | None = None) -> int:
    """``curvlab report DIR [--out DIR] [--baseline LABEL] [--heatmap ROW,COL] [--vs AXIS] [--target ACC]``:
    tables and figures of the finished runs (the last three: :mod:`.ablation_report`)."""
    parser = argparse.ArgumentParser(prog="curvlab report", description="Aggregate every finished run under "
                                     "DIR into report.csv, runs.csv, report.txt and figures. A DIR holding tunes "
                                     "(DIR/*/tune.json from `curvlab tune`) gets the equal-budget comparison "
                                     "instead: every method tuned with the same number of trials (damping tuned "
                                     "for second-order methods), test mean +- std of each best configuration.")
    parser.add_argument("dir", help="folder holding run directories (a sweep folder, or any parent)")
    parser.add_argument("--out", help="where to write (default: DIR/report)")
    parser.add_argument("--baseline", help="configuration label the step times are divided by "
                        "(default: the identity+natural one, i.e. SGD, if present)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    parser.add_argument("--heatmap", metavar="ROW,COL", help="also a heat map of --metric over two axes, e.g. "
                        "estimator,rule (axis: a sweep axis, a config key or its last part; a+b joins keys)")
    parser.add_argument("--vs", metavar="AXIS", help="also --metric against AXIS (e.g. batch_size), one line per "
                        "--series value, each point the best configuration over the other axes")
    parser.add_argument("--series", metavar="AXIS", help="lines of --vs / columns of --target (default: variant, "
                        "else estimator+rule)")
    parser.add_argument("--target", type=float, metavar="ACC", help="also epochs / seconds to test accuracy ACC "
                        "(rows: --vs axis if given, columns: --series)")
    parser.add_argument("--metric", default="final_test_accuracy", help="summary key of --heatmap and --vs")
    args = parser.parse_args(argv)
    from .reporting import report

    tunes = Path(args.dir) / "tune.json"
    if tunes.is_file() or any(Path(args.dir).glob("*/tune.json")):
        return _compare_tunes(Path(args.dir), Path(args.out or Path(args.dir) / "report"), args.quiet)
    try:
        report(args.dir, args.out, baseline=args.baseline, figures=not args.no_figures, quiet=args.quiet)
        if args.heatmap or args.vs or args.target is not None:
            from .ablation_report import write_extras

            write_extras(args.dir, args.out or Path(args.dir) / "report", metric=args.metric, vs=args.vs,
                         heatmap_axes=args.heatmap.split(",") if args.heatmap else None, series=args.series,
                         target=args.target, quiet=args.quiet)
    except _EXPECTED as err:
        return _fail(err)
    return 0


def _compare_tunes(folder: Path, out: Path, quiet: bool) -> int:
    """``curvlab report`` of a folder of tunes: the equal-budget comparison (:mod:`curvlab.equal_budget`)."""
    from curvlab.equal_budget import BudgetError, compare_tunes, load_tunes

    from .io import atomic_write_json, atomic_write_text

    try:
        result = compare_tunes(load_tunes([folder]))
    except BudgetError as err:
        return _fail(err)
    atomic_write_json(out / "comparison.json", result)
    atomic_write_text(out / "comparison.txt", result["table"] + "\n")
    if not quiet:
        print(result["table"])
        print(f"wrote {out / 'comparison.json'}, {out / 'comparison.txt'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m curvlab.experiments.cli run|sweep|report ...`` (the same as ``curvlab run|sweep|report``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_main, "sweep": sweep_main, "report": report_main, "tune": tune_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m curvlab.experiments.cli {run,sweep,report,tune} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
