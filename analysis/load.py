"""A read-only, consistent snapshot of a study database, as pandas DataFrames.

The report must work on a study that is still running and must never write to its file. So:

1. the file is opened with a read-only SQLite URI (`file:PATH?mode=ro`), never created or changed;
2. it is copied page by page with SQLite's online backup API in a single step, which holds one
   read transaction for the whole copy: the copy is one consistent state of the database even
   while the driver process keeps writing;
3. every table is then read from that private copy with pandas through SQLAlchemy inside one
   transaction, and Optuna's study (for parameter importances) is loaded from the same copy.

A missing file, a file that is not SQLite, or an SQLite file without our `rbm_meta` table is a
`UserError` (one line, exit code 2), as is an unknown study name or trial id.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rbm_study.core.errors import UserError
from rbm_study.study.schema import APP_NAME, SCHEMA_VERSION
from sqlalchemy import create_engine, text

SQLITE_HEADER = b"SQLite format 3\x00"
OUR_TABLES = ("rbm_meta", "rbm_studies", "rbm_trials", "rbm_epoch_metrics", "rbm_final_metrics")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"database {path} does not exist; pass the .db file a study wrote (--db PATH)")
    if not path.is_file():
        raise UserError(f"database {path} is not a file")
    with path.open("rb") as handle:
        header = handle.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise UserError(f"{path} is not an SQLite database (not written by rbm-study)")


def _copy_consistent(path: Path, target: Path) -> None:
    """Copy `path` to `target` in one read transaction, opening the source read-only."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        source = sqlite3.connect(uri, uri=True, timeout=30)
    except sqlite3.Error as err:
        raise UserError(f"cannot open {path} read-only: {err}") from None
    try:
        dest = sqlite3.connect(target)
        try:
            source.backup(dest, pages=-1)  # one step: one read lock, one consistent state
            dest.execute("PRAGMA journal_mode=DELETE")  # the copy needs no -wal/-shm beside it
        finally:
            dest.close()
    except sqlite3.DatabaseError as err:
        raise UserError(f"cannot read {path}: {err}") from None
    finally:
        source.close()


@dataclass
class Snapshot:
    """Everything the report reads, from one consistent state of the database file."""

    path: Path
    copy: Path  # the private snapshot file (deleted by close())
    meta: dict[str, str]
    studies: pd.DataFrame
    trials: pd.DataFrame  # one row a trial of every study; params/config parsed to dicts
    epoch_metrics: pd.DataFrame  # trial_id, stage, epoch, name, value
    final_metrics: pd.DataFrame  # trial_id, name, value
    weight_index: pd.DataFrame  # trial_id, file_name, bytes
    optuna_tables: bool
    _tmpdir: str = field(repr=False, default="")

    # --- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = ""

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- selection --------------------------------------------------------------------------
    def study(self, name: str | None = None, trial_id: int | None = None) -> pd.Series:
        """The study row by name; or the study of `trial_id`; or the only study in the file."""
        if self.studies.empty:
            raise UserError(f"{self.path} holds no study yet")
        if name is not None:
            match = self.studies[self.studies["name"] == name]
            if match.empty:
                known = ", ".join(self.studies["name"])
                raise UserError(f"no study named {name!r} in {self.path}; studies there: {known}")
            return match.iloc[0]
        if trial_id is not None:
            trial = self.trial(trial_id)
            return self.studies[self.studies["id"] == trial["study_id"]].iloc[0]
        if len(self.studies) > 1:
            known = ", ".join(self.studies["name"])
            raise UserError(f"{self.path} holds {len(self.studies)} studies; pick one with --name ({known})")
        return self.studies.iloc[0]

    def trial(self, trial_id: int, study_id: int | None = None) -> pd.Series:
        match = self.trials[self.trials["id"] == trial_id]
        if match.empty:
            raise UserError(f"no trial with id {trial_id} in {self.path}; trials.csv of a report lists the ids")
        row = match.iloc[0]
        if study_id is not None and row["study_id"] != study_id:
            raise UserError(f"trial {trial_id} belongs to another study than the one asked for")
        return row

    def study_trials(self, study_id: int) -> pd.DataFrame:
        return self.trials[self.trials["study_id"] == study_id].reset_index(drop=True)

    def weights(self, trial_id: int) -> dict[str, bytes]:
        """The lab files of a trial, by file name (read from the snapshot copy)."""
        engine = create_engine(f"sqlite+pysqlite:///{self.copy}")
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT file_name, data FROM rbm_weights WHERE trial_id = :t"), {"t": int(trial_id)}
                ).all()
        finally:
            engine.dispose()
        return {name: bytes(data) for name, data in rows}

    def optuna_study(self, name: str) -> Any:
        """Optuna's study of that name from the snapshot, or None when the file has none."""
        if not self.optuna_tables:
            return None
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            return optuna.load_study(study_name=name, storage=f"sqlite:///{self.copy}")
        except KeyError:
            return None


def open_snapshot(path: str | Path) -> Snapshot:
    """Copy the database consistently and read our tables; UserError for a missing or foreign file."""
    path = Path(path)
    _check_file(path)
    tmpdir = tempfile.mkdtemp(prefix="rbm-report-")
    copy = Path(tmpdir) / "snapshot.db"
    try:
        _copy_consistent(path, copy)
        return _read(path, copy, tmpdir)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def _read(path: Path, copy: Path, tmpdir: str) -> Snapshot:
    engine = create_engine(f"sqlite+pysqlite:///file:{copy}?mode=ro&uri=true")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")  # pysqlite does not start a transaction for SELECTs itself
            tables = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")}
            if "rbm_meta" not in tables:
                raise UserError(f"{path} is not an rbm-study database (no rbm_meta table)")
            meta = dict(conn.exec_driver_sql("SELECT key, value FROM rbm_meta").all())
            if meta.get("app", APP_NAME) != APP_NAME:
                raise UserError(f"{path} was written by {meta.get('app')!r}, not {APP_NAME}")
            missing = [t for t in OUR_TABLES if t not in tables]
            if missing:
                raise UserError(f"{path} lacks the tables {', '.join(missing)}; it is not a complete study database")
            version = meta.get("schema_version")
            if version is not None and version.isdigit() and int(version) > SCHEMA_VERSION:
                raise UserError(
                    f"{path} has schema version {version}, newer than this code's {SCHEMA_VERSION}; update rbm-study"
                )
            studies = pd.read_sql_query(text("SELECT * FROM rbm_studies ORDER BY id"), conn)
            trials = pd.read_sql_query(text("SELECT * FROM rbm_trials ORDER BY study_id, number"), conn)
            epochs = pd.read_sql_query(
                text("SELECT trial_id, stage, epoch, name, value FROM rbm_epoch_metrics"), conn
            )
            finals = pd.read_sql_query(text("SELECT trial_id, name, value FROM rbm_final_metrics"), conn)
            if "rbm_weights" in tables:
                weight_index = pd.read_sql_query(
                    text("SELECT trial_id, file_name, length(data) AS bytes FROM rbm_weights"), conn
                )
            else:
                weight_index = pd.DataFrame(columns=["trial_id", "file_name", "bytes"])
            conn.exec_driver_sql("COMMIT")
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    finally:
        engine.dispose()

    for column in ("config",):
        studies[column] = studies[column].map(_json)
    for column in ("params", "config"):
        trials[column] = trials[column].map(_json)
    for column in ("started_at", "finished_at"):
        trials[column] = pd.to_datetime(trials[column], errors="coerce")
    return Snapshot(
        path=path,
        copy=copy,
        meta=meta,
        studies=studies,
        trials=trials,
        epoch_metrics=epochs,
        final_metrics=finals,
        weight_index=weight_index,
        optuna_tables="studies" in tables and "trials" in tables,
        _tmpdir=tmpdir,
    )


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return {}
    return value if value is not None else {}
