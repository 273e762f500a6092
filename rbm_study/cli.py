"""`rbm-study`, the one command line (also `python -m rbm_study`): every subcommand composed here.

    run, evaluate            one lab run in-process; score a weight file     (rbm_study.core.commands)
    launch, resume, status   studies on Ray, in one database                 (rbm_study.study.commands)
    report, export           figures and the k-comparison report; weights    (rbm_study.analysis.commands)

This module imports nothing heavy: each handler imports its layer when it runs, so `--help`,
`--version` and `status` never pay for torch or Ray. Bad input raises `UserError` (from
`rbm_study.core.errors`, which imports nothing); it is printed as one line and the exit code is 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from rbm_study.core.errors import UserError

Handler = Callable[[argparse.Namespace], int]


def _lazy(module: str, function: str) -> Handler:
    """A handler that imports `module` only when its subcommand runs."""

    def handler(args: argparse.Namespace) -> int:
        from importlib import import_module

        return int(getattr(import_module(module), function)(args) or 0)

    return handler


def _run(args: argparse.Namespace) -> int:
    """`run` accepts study configs too (their study keys are checked, then unused)."""
    from rbm_study.core.commands import run_command
    from rbm_study.study.config import StudyConfig

    return run_command(args, StudyConfig)


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"rbm-study {version('rbm-study')}"
    except PackageNotFoundError:
        return "rbm-study (not installed)"


class _Version(argparse.Action):
    """`--version`, looked up only when asked for: reading the package metadata imports
    `importlib.metadata` and searches the installed distributions, which `--help` need not wait for."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_text())
        parser.exit()


def _db_arg(parser: argparse.ArgumentParser, help_text: str = "the study's database") -> None:
    parser.add_argument(
        "--db", required=True,
        help=f"{help_text}: a SQLite file path, or a PostgreSQL URL (postgresql://USER@HOST:PORT/DATABASE; "
        "keep the password in ~/.pgpass or PGPASSWORD)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rbm-study",
        description="Hyperparameter studies of RBMs and DBNs on MNIST (CD-k, PCD-k, up-down fine-tuning).",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    core, study, analysis = "rbm_study.core.commands", "rbm_study.study.commands", "rbm_study.analysis.commands"

    # --- one lab run ---------------------------------------------------------------------------
    run = sub.add_parser("run", help="run the three lab tasks once, in-process (no Ray)")
    run.add_argument("config", help="YAML config: a bundled name (lab, quick, k_comparison) or a file path")
    run.add_argument("--out", required=True, help="folder for the weight files and metrics.json")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--data-dir", help="MNIST root (default: data.root, $MNIST_ROOT, ./data)")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    run.set_defaults(func=_run)

    ev = sub.add_parser(
        "evaluate",
        help="mean log-likelihood (RBM) or its lower bound (DBN) of a lab file",
        description="Score a lab weight file on MNIST: one line per method, the estimate last. "
        "exact enumerates (min(V, H) <= 24), ais estimates log Z forward (leans optimistic), raise "
        "anneals each image back to the base-rate model (a stochastic lower bound on the annealed model, "
        "which leans the other way); all runs every "
        "method that applies, on the same images; auto is exact when it is cheap, else ais.",
    )
    ev.add_argument("file", help="zad1_rbm.th, zad2_dbn.th or zad3_dbn_ft.th")
    ev.add_argument("--split", choices=("test", "val"), default="test")
    ev.add_argument("--method", choices=("exact", "ais", "raise", "all", "auto"), default="auto")
    ev.add_argument("--images", type=int, metavar="N",
                    help="score the first N images of the split, with every method (default: all of them, "
                    "but raise only the first 50, as eval.raise_images)")
    ev.add_argument("--chains", type=int, metavar="M",
                    help="AIS chains (default 100) or RAISE chains per image (default 1, as eval.raise_chains)")
    ev.add_argument("--betas", type=int, metavar="K",
                    help="inverse temperatures of AIS (default 14500) and RAISE (default 50000, as "
                    "eval.raise_betas)")
    ev.add_argument("--data-dir", help="MNIST root (default: $MNIST_ROOT, ./data)")
    ev.add_argument("--device", choices=("cpu", "cuda"))
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=_lazy(core, "evaluate_command"))

    # --- studies ---------------------------------------------------------------------------------
    launch = sub.add_parser("launch", help="start a study: many trials on Ray, one database")
    launch.add_argument("config", help="YAML config: a bundled name (quick, k_comparison, lab) or a file path")
    _db_arg(launch, "database (created if missing)")
    launch.add_argument("--name", help="study name (default: the config's name)")
    launch.add_argument("--address", help="join this Ray cluster (host:port or auto); default: start a local one")
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    launch.add_argument("--quiet", action="store_true", help="no progress lines while it runs")
    launch.set_defaults(func=_lazy(study, "launch_command"))

    resume = sub.add_parser("resume", help="finish a study whose driver stopped or died")
    _db_arg(resume)
    resume.add_argument("--name", help="study name (needed when the database holds several)")
    resume.add_argument("--address", help="join this Ray cluster (host:port or auto); default: start a local one")
    resume.add_argument("--quiet", action="store_true", help="no progress lines while it runs")
    resume.set_defaults(func=_lazy(study, "resume_command"))

    status = sub.add_parser("status", help="a study's state, from the database alone")
    _db_arg(status)
    status.add_argument("--name", help="study name (needed when the database holds several)")
    status.add_argument("--json", action="store_true", help="one JSON object for scripts and monitors")
    status.set_defaults(func=_lazy(study, "status_command"))

    # --- reports -----------------------------------------------------------------------------------
    report = sub.add_parser(
        "report",
        help="turn a study database into the lab's figures and the k-comparison report",
        description="Write DIR/index.html (self-contained), DIR/report.md, the figures as PNG and "
        "DIR/trials.csv from a study's database. Works on a running study (reads a consistent "
        "snapshot, never writes).",
    )
    _db_arg(report)
    report.add_argument("--name", help="the study's name (needed when the database holds several)")
    report.add_argument("--trial", type=int, metavar="N",
                        help="also draw the lab's figures of trial N (its number, as status shows it)")
    report.add_argument("--out", required=True, metavar="DIR", help="folder to write the report into")
    report.add_argument("--data-dir", metavar="ROOT",
                        help="MNIST root for the reconstruction figures (default: the trial's data.root, "
                        "$MNIST_ROOT, ./data)")
    report.set_defaults(func=_lazy(analysis, "report_command"))

    export = sub.add_parser(
        "export",
        help="write a trial's zad1_rbm.th, zad2_dbn.th, zad3_dbn_ft.th",
        description="Write the lab's three weight files of one trial, to open in the handout's notebook.",
    )
    _db_arg(export)
    export.add_argument("--name", help="the study's name (needed when the database holds several)")
    export.add_argument("--trial", type=int, required=True, metavar="N",
                        help="the trial's number, as status and the report show it")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write the files into")
    export.set_defaults(func=_lazy(analysis, "export_command"))
    return parser


def _check_name(args: argparse.Namespace) -> None:
    """`--name ''` names no study: refused, rather than read as if --name were left out."""
    name = getattr(args, "name", None)
    if name is not None and not name.strip():
        raise UserError(f"--name {name!r} names no study; give the study's name, or leave --name out")


def main(argv: list[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    try:
        _check_name(args)
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"rbm-study {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rbm-study {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
