"""Subcommands `launch`, `resume` and `status`: thin argument handling around `study.driver`.

Everything that can be checked without Ray is checked first (the config and its search space, the
database: a file, or a server that must answer; the study name), so bad input costs one line and
exit code 2 and leaves no trace.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def launch_command(args: argparse.Namespace) -> int:
    from rbm_study.study import driver
    from rbm_study.study.config import load_study_config
    from rbm_study.study.storage import StudyStorage, inspect_db, parse_db

    study = load_study_config(args.config, args.set)
    db = parse_db(args.db)  # a URL of another dialect is refused here
    _check_address(args.address)
    name = args.name or Path(args.config).stem
    # Refuse a foreign database, one that does not answer, or an existing name before Ray starts,
    # and before anything is written.
    if inspect_db(db)[0] == "ours":
        storage = StudyStorage(db, readonly=True)
        try:
            storage.require_new_name(name)
        finally:
            storage.close()
    return driver.launch(db, study, name, args.address, progress=not args.quiet)


def resume_command(args: argparse.Namespace) -> int:
    from rbm_study.study import driver
    from rbm_study.study.storage import parse_db

    db = parse_db(args.db)
    _check_address(args.address)
    return driver.resume(db, args.name, args.address, progress=not args.quiet)


def _check_address(address: str | None) -> None:
    """A cluster that does not answer is refused before the database is touched."""
    if address and address != "local":
        from rbm_study.study.raynode import driver_node_ip

        driver_node_ip(address)


def status_command(args: argparse.Namespace) -> int:
    import json

    from rbm_study.study.progress import render_status, status_document
    from rbm_study.study.storage import StudyStorage

    storage = StudyStorage(args.db, readonly=True)
    try:
        if args.json:
            print(json.dumps(status_document(storage, args.name), indent=2, allow_nan=False))
        else:
            print(render_status(storage, args.name))
    finally:
        storage.close()
    return 0
