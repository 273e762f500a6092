"""Subcommands `report` (figures and the k-comparison report of a study) and `export` (a trial's
lab weight files), both reading a study database without writing to it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report",
        help="turn a study database into the lab's figures and the k-comparison report",
        description="Write DIR/index.html (self-contained), DIR/report.md, the figures as PNG and "
        "DIR/trials.csv from a study's SQLite database. Works on a running study (reads a consistent "
        "snapshot, never writes).",
    )
    report.add_argument("--db", required=True, help="the study's SQLite database")
    report.add_argument("--name", help="the study's name (needed when the file holds several)")
    report.add_argument("--trial", type=int, metavar="ID",
                        help="also draw the lab's figures of this trial (its id, as in trials.csv)")
    report.add_argument("--out", required=True, metavar="DIR", help="folder to write the report into")
    report.add_argument("--data-dir", metavar="ROOT",
                        help="MNIST root for the reconstruction figures (default: the trial's data.root, "
                        "$MNIST_ROOT, ./data)")
    report.set_defaults(func=_report)

    export = subparsers.add_parser(
        "export",
        help="write a trial's zad1_rbm.th, zad2_dbn.th, zad3_dbn_ft.th",
        description="Write the lab's three weight files of one trial, to open in the handout's notebook.",
    )
    export.add_argument("--db", required=True, help="the study's SQLite database")
    export.add_argument("--trial", type=int, required=True, metavar="ID", help="the trial's id (trials.csv)")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write the files into")
    export.set_defaults(func=_export)


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from analysis.report import build
    from core.data import has_mnist
    from core.errors import UserError

    if args.data_dir and not has_mnist(Path(args.data_dir)):
        raise UserError(f"--data-dir {args.data_dir} holds no MNIST/raw/*-ubyte[.gz]; pass the folder holding MNIST/")
    index = build(args.db, args.out, name=args.name, trial_id=args.trial, data_dir=args.data_dir)
    print(f"report written: {index}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from analysis.report import export

    for path in export(args.db, args.trial, args.out):
        print(path)
    return 0
