"""The one exception type the command line turns into a one-line message and exit code 2, and the
check of an output folder that every writing command shares (so it fails before any work)."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input from the user (a config key, a file, a name); the message says how to fix it."""


def output_folder(path: str | Path, option: str = "--out") -> Path:
    """`path` as a folder to write into, made where missing; a UserError naming `option` where a
    file stands there or the folder cannot be made (a read-only parent, say)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file, not a folder; pass a folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{option} {folder}: the folder cannot be made ({err.strerror}); "
                        "pass a folder you can write to") from None
    return folder
