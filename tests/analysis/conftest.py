"""A small real study database (tiny models really trained, no Ray) and its report, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbm_study.cli import main
from tests.analysis import builddb


@pytest.fixture(scope="session")
def runs(mnist_dir: str) -> list[dict]:
    """k in {1, 2} x seeds {0, 1}, each a real (tiny) run of the three lab tasks."""
    return builddb.train_all(ks=(1, 2), seeds=(0, 1), mnist_root=mnist_dir)


@pytest.fixture(scope="session")
def study_db(runs: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db") / "study.db"
    builddb.write_study(path, "tiny", runs, extra_states=(
        ("failed", "Traceback (most recent call last):\nFloatingPointError: fine-tuning diverged"),
        ("pruned", "pruned by ASHA at epoch 1 (val_recon_error)"),
    ))
    return path


@pytest.fixture(scope="session")
def report_dir(study_db: Path, tmp_path_factory: pytest.TempPathFactory, mnist_dir: str) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", "--db", str(study_db), "--out", str(out), "--trial", "1"]) == 0
    return out
