"""`rbm-study`, the one command line (also `python -m study`).

Each part of the project registers its own subcommands:

    core.cli        run, evaluate          one lab run in-process; score a weight file
    study.commands  launch, resume, status  studies on Ray, in one SQLite database
    analysis.cli    report, export          figures and the k-comparison report; weight files

Bad input raises `core.errors.UserError`; it is printed as one line and the exit code is 2.
"""

from __future__ import annotations

import argparse
import sys

from core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from analysis import cli as analysis_cli
    from core import cli as core_cli
    from study import commands as study_commands

    parser = argparse.ArgumentParser(
        prog="rbm-study",
        description="Hyperparameter studies of RBMs and DBNs on MNIST (CD-k, PCD-k, up-down fine-tuning).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (core_cli, study_commands, analysis_cli):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"rbm-study {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rbm-study {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
