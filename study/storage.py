"""The study database: the only module that reads or writes it (SQLAlchemy 2, SQLite).

Shaped like Optuna's storage layer: a `StudyStorage` object with one method per operation, each
operation one transaction, plain frozen records (`StudyInfo`, `TrialInfo`) going out, so no caller
ever holds a session or an ORM object. That is what makes a SIGKILL at any moment harmless: SQLite
in WAL mode either has a whole transaction or none of it, and every state a study can be found in
after a crash is one that `study.driver` knows how to resume from.

Opening is careful about files that are not ours. Before anything is created or a pragma is set,
an existing file is inspected read-only: not SQLite, SQLite with tables but no `rbm_meta`, or a
different schema version are all refused with a message, and the file is left byte-for-byte as it
was (journal_mode=WAL alone would rewrite its header).
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rbm_study.core.errors import UserError
from rbm_study.study import migrations
from rbm_study.study.schema import (
    APP_NAME,
    SCHEMA_VERSION,
    TRIAL_STATES,
    Base,
    Checkpoint,
    Driver,
    EpochMetric,
    FinalMetric,
    Meta,
    Study,
    Trial,
    Weights,
)

SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 30_000
FINISHED_STATES = ("completed", "failed", "pruned")  # terminal: count toward search.num_samples


class StorageError(UserError):
    """The file is not a usable rbm-study database (foreign, other version, missing)."""


class StudyExistsError(UserError):
    pass


class UnknownStudyError(UserError):
    pass


def now() -> datetime:
    """UTC, without tzinfo (SQLite has no time zones; every time in the file is UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class StudyInfo:
    id: int
    name: str
    config: dict
    status: str
    num_samples: int
    objective_metric: str
    objective_mode: str
    code_version: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class TrialInfo:
    id: int
    number: int
    ray_trial_id: str | None
    optuna_trial_number: int | None
    params: dict
    state: str
    node: str | None
    attempt: int
    objective_value: float | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    last_stage: str | None = None
    last_epoch: int | None = None
    study_id: int = 0
    config: dict | None = None  # the full config the trial ran with


@dataclass(frozen=True)
class DriverInfo:
    """Who drives (or last drove) a study; `token` is None once the driver released the lease."""

    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    token: str | None


@dataclass(frozen=True)
class DriverClaim:
    """This process, asking to drive a study (`study.lease.this_driver`)."""

    host: str
    pid: int
    token: str


def _study_info(row: Study) -> StudyInfo:
    return StudyInfo(
        row.id, row.name, row.config, row.status, row.num_samples, row.objective_metric, row.objective_mode,
        row.code_version, row.created_at, row.updated_at, row.finished_at,
    )


def _trial_info(row: Trial, last: tuple[str, int] | None = None) -> TrialInfo:
    return TrialInfo(
        row.id, row.number, row.ray_trial_id, row.optuna_trial_number, row.params, row.state, row.node,
        row.attempt, row.objective_value, row.error, row.started_at, row.finished_at,
        last[0] if last else None, last[1] if last else None, row.study_id, row.config,
    )


def inspect_file(path: Path) -> tuple[str, int]:
    """('new', SCHEMA_VERSION) for an absent, empty or table-less SQLite file, or ('ours', its schema
    version); raises StorageError otherwise. Read-only, so a refused file is not modified.
    """
    if not path.exists() or path.stat().st_size == 0:
        return "new", SCHEMA_VERSION
    if path.is_dir():
        raise StorageError(f"{path} is a folder, not a database file")
    with path.open("rb") as fh:
        if fh.read(16) != SQLITE_MAGIC:
            raise StorageError(f"{path} is not an rbm-study database (not an SQLite file); it was not changed")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                return "new", SCHEMA_VERSION
            if "rbm_meta" not in tables:
                shown = ", ".join(sorted(tables)[:6])
                raise StorageError(
                    f"{path} is an SQLite file but not an rbm-study database (tables: {shown}); "
                    "it was not changed. Pass a new --db path"
                )
            meta = dict(con.execute("SELECT key, value FROM rbm_meta"))
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        raise StorageError(f"{path} cannot be read as SQLite ({err}); it was not changed") from None
    if meta.get("app") != APP_NAME:
        raise StorageError(f"{path} is not an rbm-study database (rbm_meta.app={meta.get('app')!r})")
    return "ours", schema_version(meta.get("schema_version"), path)


def schema_version(text: str | None, where: object) -> int:
    """The one schema-version policy: older versions are read as they are and migrated on the first
    write (`study.migrations`); a newer one is refused, since this code cannot know its tables."""
    if text is None or not text.isdigit() or int(text) < 1:
        raise StorageError(f"{where} has no valid rbm-study schema version ({text!r}); it was not changed")
    if int(text) > SCHEMA_VERSION:
        raise StorageError(
            f"{where} was written with database schema version {text}, newer than this rbm-study's "
            f"{SCHEMA_VERSION}; upgrade rbm-study (pip install -U rbm-study) or start a new --db"
        )
    return int(text)


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # transactions are begun by the engine's "begin" event
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    cursor.close()


class StudyStorage:
    """One study database file. `create=True` makes it when absent; `readonly=True` never writes."""

    def __init__(self, path: str | Path, *, create: bool = False, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        kind, self.schema_version = inspect_file(self.path)
        if kind == "new" and not create:
            if not self.path.exists():
                raise StorageError(f"no database at {self.path}; start a study there with `rbm-study launch`")
            raise StorageError(f"{self.path} holds no rbm-study data yet; start a study with `rbm-study launch`")
        if kind == "new":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(self.url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        if readonly:
            event.listen(self.engine, "connect", lambda c, r: c.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}"))
            return
        event.listen(self.engine, "connect", _on_connect)
        # pysqlite opens a transaction only before DML; taking the write lock at BEGIN instead makes
        # every write transaction (DDL of a migration included) all-or-nothing and serialised.
        event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        if kind == "new":
            with self._write() as s:
                Base.metadata.create_all(s.connection())
                s.add_all([Meta(key="app", value=APP_NAME), Meta(key="schema_version", value=str(SCHEMA_VERSION))])
        elif self.schema_version < SCHEMA_VERSION:
            self._migrate()

    def _migrate(self) -> None:
        """Bring an older database to SCHEMA_VERSION in one transaction, and say so (stderr)."""
        with self._write() as s:
            found = schema_version(s.scalar(select(Meta.value).where(Meta.key == "schema_version")), self.path)
            added = migrations.upgrade(s.connection(), found) if found < SCHEMA_VERSION else []
        if added:
            print(f"rbm-study: migrated {self.path} from database schema version {found} to {SCHEMA_VERSION} "
                  f"(added {'; '.join(added)})", file=sys.stderr, flush=True)
        self.schema_version = SCHEMA_VERSION

    def __getstate__(self) -> dict:
        # Ray Tune pickles its callbacks with the experiment state; only the path travels.
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the file; Optuna's RDBStorage uses the same one."""
        return f"sqlite:///{self.path.resolve()}"

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self.engine) as session, session.begin():
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine) as session:
            yield session

    # --- studies ----------------------------------------------------------------------------------
    def study_names(self) -> list[str]:
        with self._read() as s:
            return list(s.scalars(select(Study.name).order_by(Study.id)))

    def require_new_name(self, name: str) -> None:
        """Raise StudyExistsError (pointing to `resume`) when the file already holds `name`."""
        if name in self.study_names():
            raise self._exists(name)

    def _exists(self, name: str) -> StudyExistsError:
        return StudyExistsError(
            f"study {name!r} already exists in {self.path}; continue it with "
            f"`rbm-study resume --db {self.path} --name {name}` or pick another --name"
        )

    def create_study(
        self, name: str, config: dict, num_samples: int, objective_metric: str, objective_mode: str,
        code_version: str, driver: DriverClaim | None = None,
    ) -> StudyInfo:
        """A new study, driven by `driver` from the start (one transaction: no other driver can
        take a study that is being created); without one, the study starts with no driver."""
        try:
            with self._write() as s:
                if s.scalar(select(Study.id).where(Study.name == name)) is not None:
                    raise self._exists(name)
                t = now()
                row = Study(
                    name=name, config=config, status="running", num_samples=num_samples,
                    objective_metric=objective_metric, objective_mode=objective_mode, code_version=code_version,
                    created_at=t, updated_at=t,
                )
                s.add(row)
                s.flush()
                if driver is not None:
                    s.add(Driver(study_id=row.id, host=driver.host, pid=driver.pid, started_at=t, heartbeat_at=t,
                                 token=driver.token))
                return _study_info(row)
        except IntegrityError:  # the same name created by another process a moment ago
            raise self._exists(name) from None

    # --- the driver lease (study.lease decides who is alive) --------------------------------------
    def driver(self, study_id: int) -> DriverInfo | None:
        """The study's driver record; None if it never had one (or the database predates leases)."""
        if self.schema_version < 2:
            return None
        with self._read() as s:
            row = s.get(Driver, study_id)
            return None if row is None else DriverInfo(row.host, row.pid, row.started_at, row.heartbeat_at, row.token)

    def take_driver(self, study_id: int, claim: DriverClaim, seen: DriverInfo | None) -> bool:
        """Compare-and-swap the lease to `claim`, if the record is still the `seen` one (the caller
        judged it free or dead). False when another process got there first."""
        t = now()
        values = {"host": claim.host, "pid": claim.pid, "started_at": t, "heartbeat_at": t, "token": claim.token}
        try:
            with self._write() as s:
                if seen is None:
                    s.add(Driver(study_id=study_id, **values))
                    return True
                same = Driver.token.is_(None) if seen.token is None else Driver.token == seen.token
                result = s.execute(update(Driver).where(Driver.study_id == study_id, same).values(**values))
                return result.rowcount == 1
        except IntegrityError:
            return False

    def renew_driver(self, study_id: int, token: str) -> bool:
        """The heartbeat; False if the lease is no longer this driver's."""
        with self._write() as s:
            result = s.execute(
                update(Driver).where(Driver.study_id == study_id, Driver.token == token).values(heartbeat_at=now())
            )
            return result.rowcount == 1

    def release_driver(self, study_id: int, token: str) -> None:
        with self._write() as s:
            s.execute(
                update(Driver).where(Driver.study_id == study_id, Driver.token == token)
                .values(token=None, heartbeat_at=now())
            )

    def get_study(self, name: str | None) -> StudyInfo:
        """The named study; with no name, the only one in the file."""
        with self._read() as s:
            names = list(s.scalars(select(Study.name).order_by(Study.id)))
            if name is None:
                if len(names) == 1:
                    name = names[0]
                elif not names:
                    raise UnknownStudyError(f"{self.path} holds no study yet; start one with `rbm-study launch`")
                else:
                    raise UnknownStudyError(
                        f"{self.path} holds several studies; pass --name, one of: {', '.join(names)}"
                    )
            row = s.scalar(select(Study).where(Study.name == name))
            if row is None:
                listed = ", ".join(names) if names else "none"
                raise UnknownStudyError(f"no study named {name!r} in {self.path}; studies there: {listed}")
            return _study_info(row)

    def set_study_status(self, study_id: int, status: str) -> None:
        with self._write() as s:
            row = s.get_one(Study, study_id)
            row.status = status
            row.updated_at = now()
            row.finished_at = now() if status == "completed" else None

    # --- trials -----------------------------------------------------------------------------------
    def start_trial(
        self, study_id: int, *, ray_trial_id: str, optuna_trial_number: int | None, params: dict, config: dict,
    ) -> TrialInfo:
        """Record a trial that Ray started. One row per logical trial, so counts stay honest:

        - the same Ray trial started again (Ray retried it after a worker died): attempt + 1;
        - a trial with the params of an `interrupted` one (a resume re-running it): that row
          is taken over, attempt + 1, its epoch metrics kept and overwritten as they come again;
        - otherwise a new row with the next number.

        Either way an existing row keeps its stage checkpoint until a newer one replaces it. A
        run that resumes from a checkpoint sends the finished stages' epoch metrics again, with
        the values of the attempt that made the checkpoint, so (trial, stage, epoch, name) stays
        one row with one value.
        """
        with self._write() as s:
            row = s.scalar(select(Trial).where(Trial.study_id == study_id, Trial.ray_trial_id == ray_trial_id))
            if row is None:
                interrupted = s.scalars(
                    select(Trial).where(Trial.study_id == study_id, Trial.state == "interrupted").order_by(Trial.number)
                )
                row = next((r for r in interrupted if _same(r.params, params)), None)
            if row is not None:
                row.attempt += 1
                row.error = None
                row.finished_at = None
            else:
                number = s.scalar(select(func.coalesce(func.max(Trial.number), -1)).where(Trial.study_id == study_id))
                row = Trial(study_id=study_id, number=number + 1, params=params, attempt=1)
                s.add(row)
            row.ray_trial_id = ray_trial_id
            row.optuna_trial_number = optuna_trial_number
            row.config = config
            row.state = "running"
            row.started_at = now()
            s.get_one(Study, study_id).updated_at = now()
            s.flush()
            return _trial_info(row)

    def set_trial_node(self, trial_id: int, node: str) -> None:
        with self._write() as s:
            s.get_one(Trial, trial_id).node = node

    def add_epoch_metrics(self, trial_id: int, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        rows = [
            {"trial_id": trial_id, "stage": stage, "epoch": epoch, "name": k, "value": float(v)}
            for k, v in metrics.items()
            if _storable(v)
        ]
        if not rows:
            return
        stmt = sqlite_insert(EpochMetric).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=["trial_id", "stage", "epoch", "name"], set_={"value": stmt.excluded.value}
        )
        with self._write() as s:
            s.execute(stmt)

    def finish_trial(
        self, trial_id: int, state: str, *, objective_value: float | None = None,
        final_metrics: dict[str, float] | None = None, weights: dict[str, bytes] | None = None,
        error: str | None = None,
    ) -> TrialInfo:
        """Everything a finished trial leaves, in one transaction: all of it or none of it."""
        if state not in (*FINISHED_STATES, "interrupted"):
            raise ValueError(f"not a final trial state: {state}")
        with self._write() as s:
            row = s.get_one(Trial, trial_id)
            row.state = state
            row.objective_value = objective_value
            row.error = error
            row.finished_at = now()
            if final_metrics:
                s.query(FinalMetric).filter(FinalMetric.trial_id == trial_id).delete()
                s.add_all(
                    FinalMetric(trial_id=trial_id, name=k, value=float(v))
                    for k, v in final_metrics.items()
                    if _storable(v)
                )
            if weights:
                s.query(Weights).filter(Weights.trial_id == trial_id).delete()
                s.add_all(Weights(trial_id=trial_id, file_name=k, data=v) for k, v in weights.items())
            if state in FINISHED_STATES:  # never run again: its checkpoint is dead weight
                s.query(Checkpoint).filter(Checkpoint.trial_id == trial_id).delete()
            s.get_one(Study, row.study_id).updated_at = now()
            s.flush()
            return _trial_info(row)

    def interrupt_running(self, study_id: int) -> list[TrialInfo]:
        """Trials still 'running' in the file belong to a driver that died: mark them interrupted."""
        with self._write() as s:
            rows = list(s.scalars(select(Trial).where(Trial.study_id == study_id, Trial.state == "running")))
            for row in rows:
                row.state = "interrupted"
                row.error = "the driver stopped while this trial ran; it runs again on resume"
            return [_trial_info(r) for r in rows]

    # --- stage checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, trial_id: int, stage: str, config_key: str, data: bytes) -> None:
        """The trial's latest stage checkpoint (one a trial: a later one replaces it)."""
        stmt = sqlite_insert(Checkpoint).values(
            trial_id=trial_id, stage=stage, config_key=config_key, data=data, created_at=now()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["trial_id"],
            set_={k: stmt.excluded[k] for k in ("stage", "config_key", "data", "created_at")},
        )
        with self._write() as s:
            s.execute(stmt)

    def checkpoint(self, trial_id: int) -> tuple[str, str, bytes] | None:
        """(stage, config_key, data) of the trial's checkpoint, if it has one."""
        with self._read() as s:
            row = s.execute(
                select(Checkpoint.stage, Checkpoint.config_key, Checkpoint.data).where(Checkpoint.trial_id == trial_id)
            ).first()
            return None if row is None else (row[0], row[1], row[2])

    def checkpoints_for_interrupted(self, study_id: int) -> dict[str, bytes]:
        """config key -> checkpoint of the study's `interrupted` trials (the latest stage wins when
        two share a key: the run is seeded, so either is valid for any trial with that config)."""
        order = {"rbm": 0, "dbn": 1}
        found: dict[str, tuple[int, bytes]] = {}
        with self._read() as s:
            for key, stage, data in s.execute(
                select(Checkpoint.config_key, Checkpoint.stage, Checkpoint.data)
                .join(Trial, Trial.id == Checkpoint.trial_id)
                .where(Trial.study_id == study_id, Trial.state == "interrupted")
                .order_by(Trial.number)
            ):
                rank = order.get(stage, -1)
                if key not in found or rank > found[key][0]:
                    found[key] = (rank, data)
        return {key: data for key, (_, data) in found.items()}

    def trials(self, study_id: int) -> list[TrialInfo]:
        with self._read() as s:
            last: dict[int, tuple[str, int]] = {}
            order = {"rbm": 0, "dbn": 1, "finetune": 2}
            for trial_id, stage, epoch in s.execute(
                select(EpochMetric.trial_id, EpochMetric.stage, func.max(EpochMetric.epoch))
                .join(Trial, Trial.id == EpochMetric.trial_id)
                .where(Trial.study_id == study_id)
                .group_by(EpochMetric.trial_id, EpochMetric.stage)
            ):
                if trial_id not in last or order.get(stage, 9) > order.get(last[trial_id][0], 9):
                    last[trial_id] = (stage, epoch)
            rows = s.scalars(select(Trial).where(Trial.study_id == study_id).order_by(Trial.number))
            return [_trial_info(r, last.get(r.id)) for r in rows]

    def counts(self, study_id: int) -> dict[str, int]:
        with self._read() as s:
            found = dict(
                s.execute(
                    select(Trial.state, func.count()).where(Trial.study_id == study_id).group_by(Trial.state)
                ).all()
            )
        return {state: int(found.get(state, 0)) for state in TRIAL_STATES}

    def final_metrics(self, trial_id: int) -> dict[str, float]:
        with self._read() as s:
            rows = s.execute(select(FinalMetric.name, FinalMetric.value).where(FinalMetric.trial_id == trial_id))
            return dict(rows.all())

    def epoch_metrics(self, trial_id: int) -> list[tuple[str, int, str, float]]:
        with self._read() as s:
            return [
                tuple(r)
                for r in s.execute(
                    select(EpochMetric.stage, EpochMetric.epoch, EpochMetric.name, EpochMetric.value)
                    .where(EpochMetric.trial_id == trial_id)
                    .order_by(EpochMetric.id)
                )
            ]

    def weights(self, trial_id: int) -> dict[str, bytes]:
        with self._read() as s:
            rows = s.execute(select(Weights.file_name, Weights.data).where(Weights.trial_id == trial_id))
            return dict(rows.all())

    # --- whole-study reads for the report (`analysis.load`) ----------------------------------------
    def studies(self) -> list[StudyInfo]:
        with self._read() as s:
            return [_study_info(row) for row in s.scalars(select(Study).order_by(Study.id))]

    def meta(self) -> dict[str, str]:
        with self._read() as s:
            return dict(s.execute(select(Meta.key, Meta.value)).all())

    def final_metric_rows(self, study_id: int) -> list[tuple[int, str, float]]:
        """(trial id, name, value) of every final metric of the study's trials."""
        with self._read() as s:
            return [tuple(r) for r in s.execute(
                select(FinalMetric.trial_id, FinalMetric.name, FinalMetric.value)
                .join(Trial, Trial.id == FinalMetric.trial_id).where(Trial.study_id == study_id)
            )]

    def epoch_metric_rows(self, study_id: int) -> list[tuple[int, str, int, str, float]]:
        """(trial id, stage, epoch, name, value) of every per-epoch metric of the study's trials."""
        with self._read() as s:
            return [tuple(r) for r in s.execute(
                select(EpochMetric.trial_id, EpochMetric.stage, EpochMetric.epoch, EpochMetric.name, EpochMetric.value)
                .join(Trial, Trial.id == EpochMetric.trial_id).where(Trial.study_id == study_id)
                .order_by(EpochMetric.id)
            )]

    def weight_sizes(self, study_id: int) -> list[tuple[int, str, int]]:
        """(trial id, file name, bytes) of the study's stored weight files."""
        with self._read() as s:
            return [tuple(r) for r in s.execute(
                select(Weights.trial_id, Weights.file_name, func.length(Weights.data))
                .join(Trial, Trial.id == Weights.trial_id).where(Trial.study_id == study_id)
            )]

    def has_optuna_tables(self) -> bool:
        with self.engine.connect() as con:
            names = {r[0] for r in con.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")}
        return {"studies", "trials"} <= names

    def integrity_check(self) -> str:
        with self.engine.connect() as con:
            return str(con.exec_driver_sql("PRAGMA integrity_check").scalar())


@contextmanager
def snapshot(path: str | Path) -> Iterator[StudyStorage]:
    """A read-only `StudyStorage` on a private, consistent copy of the database at `path`.

    A report must work on a study that is still running and never write to its file. The file is
    checked (`inspect_file`: a foreign or newer one is refused, unchanged), opened read-only, and
    copied page by page with SQLite's online backup API in a single step, which holds one read
    transaction for the whole copy: the copy is one state of the database even while a driver keeps
    writing. Every read, Optuna's included (through the copy's `url`), then comes from the copy,
    which is deleted on exit.
    """
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"database {path} does not exist; pass the database a study wrote (--db PATH)")
    if inspect_file(path)[0] == "new":
        raise StorageError(f"{path} holds no rbm-study data yet; start a study with `rbm-study launch`")
    folder = tempfile.mkdtemp(prefix="rbm-study-snapshot-")
    copy = Path(folder) / "snapshot.db"
    try:
        try:
            source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                target = sqlite3.connect(copy)
                try:
                    source.backup(target, pages=-1)  # one step: one read transaction, one state
                    target.execute("PRAGMA journal_mode=DELETE")  # the copy needs no -wal/-shm beside it
                finally:
                    target.close()
            finally:
                source.close()
        except sqlite3.Error as err:
            raise StorageError(f"cannot read {path}: {err}") from None
        storage = StudyStorage(copy, readonly=True)
        try:
            yield storage
        finally:
            storage.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _storable(value: Any) -> bool:
    """A number SQLite can hold in a NOT NULL REAL column: NaN would be stored as NULL and refused
    (the whole transaction with it), so a NaN metric is left out; a missing objective then fails the
    trial as 'not finite' (study.driver)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _same(a: dict, b: dict) -> bool:
    """Params equal as JSON would store them (floats compared with a tolerance for round trips)."""
    if set(a) != set(b):
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, float) or isinstance(y, float):
            try:
                if not math.isclose(float(x), float(y), rel_tol=1e-12, abs_tol=0.0):
                    return False
            except (TypeError, ValueError):
                return False
        elif json.dumps(x) != json.dumps(y):
            return False
    return True
