"""Helpers for the study tests: tiny configs, the CLI as a real subprocess, the database read-only."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.conftest import Database

REPO = Path(__file__).resolve().parents[2]
MNIST = Path(os.environ.get("MNIST_ROOT", "/work/shared/data"))

# A trial of a few seconds: AIS (hidden 25 > 20, so not exact) with cheap settings, a small subset.
TINY = {
    "seed": 0,
    "data": {"subset": 1000, "val_size": 1000},
    "rbm": {"hidden_size": 25, "epochs": 2},
    "dbn": {"hidden_size": 25, "epochs": 1},
    "finetune": {"epochs": 1},
    "eval": {"ais_chains": 16, "ais_betas": 200, "size": 300, "raise_images": 20, "raise_chains": 2,
             "raise_betas": 300},
    "search": {"num_samples": 2},
    "resources": {"num_cpus": 2, "cpus_per_trial": 1},
}


V1_DUMP = Path(__file__).parent / "fixtures" / "v1_interrupted.sql"
"""A study database as rbm-study 0.1.0 (schema version 1) left it when its driver was killed mid-study
(3 trials: 1 completed, 1 running), as SQL text (`sqlite3 .dump`)."""


def version_1_database(path: Path) -> Path:
    """Write the version-1 fixture to `path` (a real SQLite file, as that release wrote it)."""
    con = sqlite3.connect(path)
    try:
        con.executescript(V1_DUMP.read_text())
    finally:
        con.close()
    return path


def needs_mnist() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not (MNIST / "MNIST" / "raw").is_dir(), reason=f"MNIST not found under {MNIST} (set MNIST_ROOT)"
    )


def write_config(tmp_path: Path, name: str = "tiny", **sections: dict) -> Path:
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.pop("RAY_ADDRESS", None)
    out["MNIST_ROOT"] = str(MNIST)
    out["RAY_USAGE_STATS_ENABLED"] = "0"
    out["PYTHONUNBUFFERED"] = "1"
    return out


def cli(*args: str, timeout: float = 300, cwd: Path = REPO, extra_env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rbm_study", *args], cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True,
        text=True, timeout=timeout,
    )


def start(args: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in its own session, so the test can kill it and everything it started."""
    return subprocess.Popen(
        args, cwd=REPO, env={**env(), **(extra_env or {})}, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def query(db: Path | Database, sql: str, params: tuple = ()) -> list[tuple]:
    if isinstance(db, Database):
        return db.query(sql, params)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (sqlite3.OperationalError, psycopg.errors.UndefinedTable):
            pass  # tables not created yet
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{tail}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


def trial_states(db: Path | Database) -> dict[str, int]:
    return dict(query(db, "SELECT state, COUNT(*) FROM rbm_trials GROUP BY state"))


def optuna_states(db: Path | Database) -> dict[str, int]:
    return dict(query(db, "SELECT state, COUNT(*) FROM trials GROUP BY state"))
