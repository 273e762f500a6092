"""Subcommands `launch`, `resume` and `status`: thin argument handling around `study.driver`.

Everything that can be checked without Ray is checked first (the config and its search space, the
database file, the study name), so bad input costs one line and exit code 2 and leaves no trace.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def launch_command(args: argparse.Namespace) -> int:
    from rbm_study.study import driver
    from rbm_study.study.config import load_study_config
    from rbm_study.study.storage import StudyStorage

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
    from rbm_study.study import driver

    return driver.resume(Path(args.db), args.name, args.address, progress=not args.quiet)


def status_command(args: argparse.Namespace) -> int:
    from rbm_study.study.progress import render_status
    from rbm_study.study.storage import StudyStorage

    storage = StudyStorage(Path(args.db), readonly=True)
    print(render_status(storage, args.name))
    return 0
