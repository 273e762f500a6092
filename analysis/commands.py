"""Subcommands `report` (figures and the k-comparison report of a study) and `export` (a trial's
lab weight files), both reading a study database without writing to it."""

from __future__ import annotations

import argparse


def report_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rbm_study.analysis.report import build
    from rbm_study.core.data import has_mnist
    from rbm_study.core.errors import UserError

    if args.data_dir and not has_mnist(Path(args.data_dir)):
        raise UserError(f"--data-dir {args.data_dir} holds no MNIST/raw/*-ubyte[.gz]; pass the folder holding MNIST/")
    index = build(args.db, args.out, name=args.name, trial=args.trial, data_dir=args.data_dir)
    print(f"report written: {index}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from rbm_study.analysis.report import export

    for path in export(args.db, args.trial, args.out, args.name):
        print(path)
    return 0
