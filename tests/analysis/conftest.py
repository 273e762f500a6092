"""A small real study database (tiny models really trained, no Ray) and its report, built once per
backend: an SQLite file, and a database on the tests' PostgreSQL server."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbm_study.cli import main
from tests.analysis import builddb
from tests.conftest import Database, new_database


@pytest.fixture(scope="session")
def runs(mnist_dir: str) -> list[dict]:
    """k in {1, 2} x seeds {0, 1}, each a real (tiny) run of the three lab tasks."""
    return builddb.train_all(ks=(1, 2), seeds=(0, 1), mnist_root=mnist_dir)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def study_db(runs: list[dict], tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Database:
    db = new_database(request.param, request, tmp_path_factory.mktemp("db"))
    builddb.write_study(db.arg, "tiny", runs, extra_states=(
        ("failed", "Traceback (most recent call last):\nFloatingPointError: fine-tuning diverged"),
        ("pruned", "pruned by ASHA at epoch 1 (val_recon_error)"),
    ))
    return db


@pytest.fixture(scope="session")
def report_dir(study_db: Database, tmp_path_factory: pytest.TempPathFactory, mnist_dir: str) -> Path:
    out = tmp_path_factory.mktemp("report")
    before = study_db.digest()
    assert main(["report", "--db", study_db.arg, "--out", str(out), "--trial", "1"]) == 0
    assert study_db.digest() == before  # read, never written
    return out
