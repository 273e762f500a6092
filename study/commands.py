"""Subcommands `launch`, `resume` and `status`: thin argument handling around `study.driver`.

Everything that can be checked without Ray is checked first (the config and its search space, the
database file, the study name), so bad input costs one line and exit code 2 and leaves no trace.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    launch = subparsers.add_parser("launch", help="start a study: many trials on Ray, one SQLite database")
    launch.add_argument("config", help="YAML config, e.g. configs/quick.yaml")
    launch.add_argument("--db", required=True, help="SQLite database file (created if missing)")
    launch.add_argument("--name", help="study name (default: the config file's name)")
    launch.add_argument("--address", help="join this Ray cluster (host:port); default: start a local one")
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    launch.add_argument("--quiet", action="store_true", help="no progress lines while it runs")
    launch.set_defaults(func=launch_command)

    resume = subparsers.add_parser("resume", help="finish a study whose driver stopped or died")
    resume.add_argument("--db", required=True, help="the study's SQLite database")
    resume.add_argument("--name", help="study name (needed when the file holds several)")
    resume.add_argument("--address", help="join this Ray cluster (host:port); default: start a local one")
    resume.add_argument("--quiet", action="store_true", help="no progress lines while it runs")
    resume.set_defaults(func=resume_command)

    status = subparsers.add_parser("status", help="a study's state, from the database alone")
    status.add_argument("--db", required=True, help="the study's SQLite database")
    status.add_argument("--name", help="study name (needed when the file holds several)")
    status.set_defaults(func=status_command)


def launch_command(args: argparse.Namespace) -> int:
    from study import driver
    from study.config import load_study_config
    from study.storage import StudyStorage

    study = load_study_config(args.config, args.set)
    name = args.name or Path(args.config).stem
    db = Path(args.db)
    # Refuse a foreign file or an existing name before Ray starts.
    storage = StudyStorage(db, create=True)
    try:
        storage.require_new_name(name)
    finally:
        storage.close()
    return driver.launch(db, study, name, args.address, progress=not args.quiet)


def resume_command(args: argparse.Namespace) -> int:
    from study import driver

    return driver.resume(Path(args.db), args.name, args.address, progress=not args.quiet)


def status_command(args: argparse.Namespace) -> int:
    from study.progress import render_status
    from study.storage import StudyStorage

    storage = StudyStorage(Path(args.db), readonly=True)
    print(render_status(storage, args.name))
    return 0
