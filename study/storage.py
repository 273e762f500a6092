"""The study database: the only module that reads or writes it (SQLAlchemy 2; SQLite or PostgreSQL).

Shaped like Optuna's storage layer: a `StudyStorage` object with one method per operation, each
operation one transaction, plain frozen records (`StudyInfo`, `TrialInfo`) going out, so no caller
ever holds a connection or a row. That is what makes a SIGKILL at any moment harmless: SQLite
in WAL mode either has a whole transaction or none of it, and every state a study can be found in
after a crash is one that `study.driver` knows how to resume from.

Opening is careful about files that are not ours. Before anything is created or a pragma is set,
an existing file is inspected read-only: not SQLite, SQLite with tables but no `rbm_meta`, or a
different schema version are all refused with a message, and the file is left byte-for-byte as it
was (journal_mode=WAL alone would rewrite its header).

`--db` names either an SQLite file (a path) or a PostgreSQL database (a SQLAlchemy URL such as
`postgresql://user@host:5432/studies`, connected with psycopg 3), parsed once into a `Target`. On a
server the same rules hold: a database with tables of its own but no `rbm_meta` is refused
untouched, one that does not answer is refused before anything starts, and several studies (and
users) share one database by name. Statements are portable SQLAlchemy except where a dialect
branch says why; a password in a URL is never shown (`Target.display`) nor stored.
"""

from __future__ import annotations

import dataclasses
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

from sqlalchemy import (
    URL,
    Connection,
    Engine,
    Row,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    make_url,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError

from rbm_study.core.errors import UserError, output_folder
from rbm_study.study import migrations, schema
from rbm_study.study.schema import APP_NAME, SCHEMA_VERSION, TRIAL_STATES

# the tables, by the names the queries read best with
Meta, Studies, Trials, Drivers = schema.meta, schema.studies, schema.trials, schema.drivers
EpochMetrics, FinalMetrics, Weights, Checkpoints = (
    schema.epoch_metrics, schema.final_metrics, schema.weights, schema.checkpoints,
)

SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_S = 10  # a server that does not answer is refused after this long
PG_DRIVER = "postgresql+psycopg"
SCHEMA_LOCK = 0x7262_6D73  # 'rbms': the advisory lock that serialises creating and migrating our tables
NAME_LENGTH = Studies.c.name.type.length or 200
INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL's SQLSTATE for a write the user has no right to
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
    seen_at: datetime | None = None  # the database's clock when this was read (`StudyStorage._clock`)


@dataclass(frozen=True)
class DriverClaim:
    """This process, asking to drive a study (`study.lease.this_driver`)."""

    host: str
    pid: int
    token: str


def _study_info(row: Row) -> StudyInfo:
    return StudyInfo(
        row.id, row.name, row.config, row.status, row.num_samples, row.objective_metric, row.objective_mode,
        row.code_version, row.created_at, row.updated_at, row.finished_at,
    )


def _trial_info(row: Row, last: tuple[str, int] | None = None) -> TrialInfo:
    return TrialInfo(
        row.id, row.number, row.ray_trial_id, row.optuna_trial_number, row.params, row.state, row.node,
        row.attempt, row.objective_value, row.error, row.started_at, row.finished_at,
        last[0] if last else None, last[1] if last else None, row.study_id, row.config,
    )


# --- where the database is --------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where a study database is: an SQLite file (`path`) or a database on a PostgreSQL server (`url`)."""

    path: Path | None = None
    url: URL | None = None

    @property
    def on_server(self) -> bool:
        return self.url is not None

    @property
    def display(self) -> str:
        """For messages and logs: the path, or the URL with its password hidden."""
        return str(self.path) if self.url is None else self.url.render_as_string(hide_password=True)

    @property
    def connect_url(self) -> str:
        """What SQLAlchemy and Optuna connect with (the password included): never print it."""
        if self.url is None:
            return f"sqlite:///{Path(self.path or '').resolve()}"
        return self.url.render_as_string(hide_password=False)

    @property
    def without_password(self) -> str:
        """What may be written down (Ray's pickled state): the path, or the URL with no password in it
        (libpq then finds one in PGPASSWORD or ~/.pgpass, where a password belongs)."""
        return str(self.path) if self.url is None else without_password(self.url)

    def scrub(self, text: str) -> str:
        """`text` with this URL's password replaced, for driver errors that might quote it."""
        secret = self.url.password if self.url is not None else None
        return text.replace(str(secret), "***") if secret else text

    def __str__(self) -> str:
        return self.display


def without_password(url: str | URL) -> str:
    """`url` with no password in it at all (`URL.set` leaves a None field unchanged; rendering with
    the password hidden writes '***' in its place, which a reconnect would send)."""
    return make_url(url)._replace(password=None).render_as_string(hide_password=False)


def parse_db(db: str | Path | Target) -> Target:
    """`--db` as given: a path (SQLite, also `sqlite:///path`) or a PostgreSQL URL; `postgresql://`
    and `postgres://` connect through psycopg 3. Any other URL is refused (StorageError)."""
    if isinstance(db, Target):
        return db
    if isinstance(db, Path) or "://" not in db:
        return Target(path=Path(db))
    try:
        url = make_url(db)
    except ArgumentError:
        raise StorageError(f"--db {db.split('://')[0]}://... is not a valid database URL; use a SQLite file path "
                           "or postgresql://USER@HOST:PORT/DATABASE") from None
    backend, driver = url.get_backend_name(), url.get_driver_name()
    shown = url.render_as_string(hide_password=True)
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise StorageError(f"--db {shown} names no file; use sqlite:///PATH or just PATH")
        return Target(path=Path(url.database))
    if backend not in ("postgresql", "postgres"):
        raise StorageError(f"--db {shown}: {backend} is not supported; use a SQLite file path or "
                           "postgresql://USER@HOST:PORT/DATABASE")
    if "+" in url.drivername and driver != "psycopg":
        raise StorageError(f"--db {shown}: rbm-study connects to PostgreSQL with psycopg 3; write the URL as "
                           "postgresql://USER@HOST:PORT/DATABASE")
    if not url.database:
        raise StorageError(f"--db {shown} names no database; add it: postgresql://USER@HOST:PORT/DATABASE")
    return Target(url=url.set(drivername=PG_DRIVER))


def _server_engine(target: Target, readonly: bool) -> Engine:
    """An engine on the server; a reader's sessions are read-only on the server's side too."""
    connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "rbm-study"}
    if readonly:
        given = (target.url.query.get("options") if target.url is not None else None) or ""
        given = given if isinstance(given, str) else " ".join(given)
        connect_args["options"] = f"{given} -c default_transaction_read_only=on".strip()
    # pre-ping: a study outlives server restarts and idle-connection timeouts of the network
    return create_engine(target.connect_url, connect_args=connect_args, pool_pre_ping=True)


def optuna_engine_kwargs(url: str) -> dict[str, Any]:
    """engine_kwargs for Optuna's RDBStorage on the study database at `url` (a dialect branch)."""
    if make_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": BUSY_TIMEOUT_MS / 1000}}
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "rbm-study optuna"},
            "pool_pre_ping": True}


def _server_error(target: Target, err: DBAPIError) -> StorageError:
    """One line for a server that cannot be used: what it said, without the password."""
    said = target.scrub(str(err.orig or err)).strip().splitlines()
    detail = next((line.strip() for line in said if line.strip()), "no answer")
    return StorageError(
        f"cannot use the database at {target.display}: {detail}; check the host, port, user and database "
        "(create it with `createdb`), and that the server is running"
    )


def _inspect_server(engine: Engine, target: Target) -> tuple[str, int]:
    """The server's counterpart of `inspect_file`: ('new', SCHEMA_VERSION) for a database with no
    tables, ('ours', its schema version), or StorageError (not answering, or not an rbm-study one)."""
    try:
        with engine.connect() as con:
            tables = set(inspect(con).get_table_names())
            if not tables:
                return "new", SCHEMA_VERSION
            if "rbm_meta" not in tables:
                shown = ", ".join(sorted(tables)[:6])
                raise StorageError(
                    f"{target.display} is a PostgreSQL database but not an rbm-study one (tables: {shown}); "
                    "it was not changed. Pass a new, empty database (createdb NAME)"
                )
            meta = dict(con.execute(select(Meta.c.key, Meta.c.value)).all())
    except DBAPIError as err:
        raise _server_error(target, err) from None
    if meta.get("app") != APP_NAME:
        raise StorageError(f"{target.display} is not an rbm-study database (rbm_meta.app={meta.get('app')!r})")
    return "ours", schema_version(meta.get("schema_version"), target.display)


def inspect_db(db: str | Path | Target) -> tuple[str, int]:
    """('new', SCHEMA_VERSION) or ('ours', its schema version) for a file or a server database;
    StorageError otherwise. Read-only: a refused database is not modified."""
    target = parse_db(db)
    if target.url is None:
        return inspect_file(Path(target.path or ""))
    engine = _server_engine(target, readonly=True)
    try:
        return _inspect_server(engine, target)
    finally:
        engine.dispose()


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
    """One study database (a file or a server's). `create=True` makes it when absent; `readonly=True`
    never writes."""

    def __init__(self, db: str | Path | Target, *, create: bool = False, readonly: bool = False):
        self.target = parse_db(db)
        self.path: Path | None = self.target.path  # None on a server
        self.readonly = readonly
        if self.target.on_server:
            self._open_server(create, readonly)
        else:
            self._open_file(Path(self.target.path or ""), create, readonly)

    def _open_file(self, path: Path, create: bool, readonly: bool) -> None:
        kind, self.schema_version = inspect_file(path)
        if kind == "new" and not create:
            if not path.exists():
                raise StorageError(f"no database at {path}; start a study there with `rbm-study launch`")
            raise StorageError(f"{path} holds no rbm-study data yet; start a study with `rbm-study launch`")
        if kind == "new":
            output_folder(path.parent, "--db's folder")
        self.engine: Engine = create_engine(self.url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        if readonly:
            event.listen(self.engine, "connect", lambda c, r: c.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}"))
            return
        event.listen(self.engine, "connect", _on_connect)
        # pysqlite opens a transaction only before DML; taking the write lock at BEGIN instead makes
        # every write transaction (DDL of a migration included) all-or-nothing and serialised.
        event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        if kind == "new":
            try:
                self._create_schema()
            except DBAPIError as err:  # the folder exists but takes no new file
                raise StorageError(f"cannot create the database {path} ({err.orig}); pass a --db path in a "
                                   "folder you can write to") from None
        elif self.schema_version < SCHEMA_VERSION:
            self._migrate()

    def _open_server(self, create: bool, readonly: bool) -> None:
        self.engine = _server_engine(self.target, readonly)
        try:
            kind, self.schema_version = _inspect_server(self.engine, self.target)
            if kind == "new" and not create:
                raise StorageError(
                    f"{self.display} holds no rbm-study data yet; start a study there with `rbm-study launch`"
                )
            if readonly:
                return
            if kind == "new":
                self._create_schema()
            elif self.schema_version < SCHEMA_VERSION:
                self._migrate()
        except DBAPIError as err:
            self.engine.dispose()
            raise _server_error(self.target, err) from None
        except BaseException:
            self.engine.dispose()
            raise

    def _lock_schema(self, con: Connection) -> None:
        """Serialise creating and migrating our tables. SQLite's BEGIN IMMEDIATE already does; on a
        server, two launches into one new database would otherwise both create the tables."""
        if self.target.on_server:
            con.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))

    def _create_schema(self) -> None:
        with self._write() as con:
            self._lock_schema(con)
            if "rbm_meta" in inspect(con).get_table_names():
                return  # another process created them while this one waited for the lock
            schema.metadata.create_all(con)
            con.execute(insert(Meta), [{"key": "app", "value": APP_NAME},
                                       {"key": "schema_version", "value": str(SCHEMA_VERSION)}])

    def _migrate(self) -> None:
        """Bring an older database to SCHEMA_VERSION in one transaction, and say so (stderr)."""
        with self._write() as con:
            self._lock_schema(con)
            found = schema_version(con.scalar(select(Meta.c.value).where(Meta.c.key == "schema_version")), self.display)
            added = migrations.upgrade(con, found) if found < SCHEMA_VERSION else []
        if added:
            print(f"rbm-study: migrated {self.display} from database schema version {found} to {SCHEMA_VERSION} "
                  f"(added {'; '.join(added)})", file=sys.stderr, flush=True)
        self.schema_version = SCHEMA_VERSION

    def __getstate__(self) -> dict:
        # Ray Tune pickles its callbacks with the experiment state (tuner.pkl, on disk): only where
        # the database is travels, never a password.
        return {"db": self.target.without_password}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["db"])

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the database (password included); Optuna's RDBStorage uses the same one."""
        return self.target.connect_url

    @property
    def display(self) -> str:
        """The database as messages name it: the path, or the URL with its password hidden."""
        return self.target.display

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        try:
            with self.engine.begin() as con:
                yield con
        except DBAPIError as err:
            # A user with read rights only (status and report need no more) gets one line, not a traceback.
            if getattr(err.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE:
                said = self.target.scrub(str(err.orig)).splitlines()[0]
                raise StorageError(f"{self.display}: this user may not write here ({said}); launch and resume "
                                   "need write rights on the database, status and report do not") from None
            raise

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """One read transaction (rolled back when the block ends: it writes nothing)."""
        with self.engine.connect() as con:
            yield con

    # --- studies ----------------------------------------------------------------------------------
    def study_names(self) -> list[str]:
        with self._read() as con:
            return list(con.scalars(select(Studies.c.name).order_by(Studies.c.id)))

    def require_new_name(self, name: str) -> None:
        """Raise StudyExistsError (pointing to `resume`) when the file already holds `name`."""
        if name in self.study_names():
            raise self._exists(name)

    def _exists(self, name: str) -> StudyExistsError:
        return StudyExistsError(
            f"study {name!r} already exists in {self.display}; continue it with "
            f"`rbm-study resume --db {self.display} --name {name}` or pick another --name"
        )

    def create_study(
        self, name: str, config: dict, num_samples: int, objective_metric: str, objective_mode: str,
        code_version: str, driver: DriverClaim | None = None,
    ) -> StudyInfo:
        """A new study, driven by `driver` from the start (one transaction: no other driver can
        take a study that is being created); without one, the study starts with no driver."""
        if len(name) > NAME_LENGTH:  # a server refuses a longer one mid-transaction; say it plainly first
            raise StorageError(f"study name {name[:40]!r}... is longer than {NAME_LENGTH} characters; pick a "
                               "shorter --name")
        try:
            with self._write() as con:
                if con.scalar(select(Studies.c.id).where(Studies.c.name == name)) is not None:
                    raise self._exists(name)
                t = self._clock(con)
                study_id = con.execute(insert(Studies).values(
                    name=name, config=config, status="running", num_samples=num_samples,
                    objective_metric=objective_metric, objective_mode=objective_mode, code_version=code_version,
                    created_at=t, updated_at=t,
                )).inserted_primary_key[0]
                if driver is not None:
                    con.execute(insert(Drivers).values(study_id=study_id, host=driver.host, pid=driver.pid,
                                                       started_at=t, heartbeat_at=t, token=driver.token))
                return _study_info(con.execute(select(Studies).where(Studies.c.id == study_id)).one())
        except IntegrityError:  # the same name created by another process a moment ago
            raise self._exists(name) from None

    # --- the driver lease (study.lease decides who is alive) --------------------------------------
    def driver(self, study_id: int) -> DriverInfo | None:
        """The study's driver record; None if it never had one (or the database predates leases)."""
        if self.schema_version < 2:
            return None
        with self._read() as con:
            row = con.execute(select(Drivers).where(Drivers.c.study_id == study_id)).first()
            if row is None:
                return None
            return DriverInfo(row.host, row.pid, row.started_at, row.heartbeat_at, row.token, self._clock(con))

    def _clock(self, con: Connection) -> datetime:
        """Now, for the lease's times: on a server, the server's clock (UTC), so that drivers and
        readers on hosts whose clocks disagree still agree on a heartbeat's age; a file's is this host's."""
        if not self.target.on_server:
            return now()
        return con.scalar(select(func.timezone("UTC", func.clock_timestamp())))

    def take_driver(self, study_id: int, claim: DriverClaim, seen: DriverInfo | None) -> bool:
        """Compare-and-swap the lease to `claim`, if the record is still the `seen` one (the caller
        judged it free or dead). False when another process got there first."""
        try:
            with self._write() as con:
                t = self._clock(con)
                values = {"host": claim.host, "pid": claim.pid, "started_at": t, "heartbeat_at": t,
                          "token": claim.token}
                if seen is None:
                    con.execute(insert(Drivers).values(study_id=study_id, **values))
                    return True
                same = Drivers.c.token.is_(None) if seen.token is None else Drivers.c.token == seen.token
                result = con.execute(update(Drivers).where(Drivers.c.study_id == study_id, same).values(**values))
                return result.rowcount == 1
        except IntegrityError:
            return False

    def renew_driver(self, study_id: int, token: str) -> bool:
        """The heartbeat; False if the lease is no longer this driver's."""
        with self._write() as con:
            result = con.execute(
                update(Drivers).where(Drivers.c.study_id == study_id, Drivers.c.token == token)
                .values(heartbeat_at=self._clock(con))
            )
            return result.rowcount == 1

    def release_driver(self, study_id: int, token: str) -> None:
        with self._write() as con:
            con.execute(
                update(Drivers).where(Drivers.c.study_id == study_id, Drivers.c.token == token)
                .values(token=None, heartbeat_at=self._clock(con))
            )

    def get_study(self, name: str | None) -> StudyInfo:
        """The named study; with no name, the only one in the file."""
        with self._read() as con:
            names = list(con.scalars(select(Studies.c.name).order_by(Studies.c.id)))
            if name is None:
                if len(names) == 1:
                    name = names[0]
                elif not names:
                    raise UnknownStudyError(f"{self.display} holds no study yet; start one with `rbm-study launch`")
                else:
                    raise UnknownStudyError(
                        f"{self.display} holds several studies; pass --name, one of: {', '.join(names)}"
                    )
            row = con.execute(select(Studies).where(Studies.c.name == name)).first()
            if row is None:
                listed = ", ".join(names) if names else "none"
                raise UnknownStudyError(f"no study named {name!r} in {self.display}; studies there: {listed}")
            return _study_info(row)

    def set_study_status(self, study_id: int, status: str) -> None:
        with self._write() as con:
            t = now()
            con.execute(update(Studies).where(Studies.c.id == study_id).values(
                status=status, updated_at=t, finished_at=t if status == "completed" else None))

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
        with self._write() as con:
            row = con.execute(
                select(Trials).where(Trials.c.study_id == study_id, Trials.c.ray_trial_id == ray_trial_id)
            ).first()
            if row is None:
                interrupted = con.execute(
                    select(Trials).where(Trials.c.study_id == study_id, Trials.c.state == "interrupted")
                    .order_by(Trials.c.number)
                )
                row = next((r for r in interrupted if _same(r.params, params)), None)
            t = now()
            values = {"ray_trial_id": ray_trial_id, "optuna_trial_number": optuna_trial_number, "config": config,
                      "state": "running", "started_at": t, "error": None, "finished_at": None}
            if row is not None:
                trial_id = row.id
                con.execute(update(Trials).where(Trials.c.id == trial_id).values(attempt=row.attempt + 1, **values))
            else:
                number = con.scalar(
                    select(func.coalesce(func.max(Trials.c.number), -1)).where(Trials.c.study_id == study_id)
                )
                trial_id = con.execute(insert(Trials).values(
                    study_id=study_id, number=number + 1, params=params, attempt=1, **values
                )).inserted_primary_key[0]
            con.execute(update(Studies).where(Studies.c.id == study_id).values(updated_at=t))
            return _trial_info(con.execute(select(Trials).where(Trials.c.id == trial_id)).one())

    def set_trial_node(self, trial_id: int, node: str) -> None:
        with self._write() as con:
            con.execute(update(Trials).where(Trials.c.id == trial_id).values(node=node))

    def add_epoch_metrics(self, trial_id: int, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        rows = [
            {"trial_id": trial_id, "stage": stage, "epoch": epoch, "name": k, "value": float(v)}
            for k, v in metrics.items()
            if _storable(v)
        ]
        if not rows:
            return
        stmt = self._insert(EpochMetrics).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=["trial_id", "stage", "epoch", "name"], set_={"value": stmt.excluded.value}
        )
        with self._write() as con:
            con.execute(stmt)

    def finish_trial(
        self, trial_id: int, state: str, *, objective_value: float | None = None,
        final_metrics: dict[str, float] | None = None, weights: dict[str, bytes] | None = None,
        error: str | None = None,
    ) -> TrialInfo:
        """Everything a finished trial leaves, in one transaction: all of it or none of it."""
        if state not in (*FINISHED_STATES, "interrupted"):
            raise ValueError(f"not a final trial state: {state}")
        with self._write() as con:
            t = now()
            con.execute(update(Trials).where(Trials.c.id == trial_id).values(
                state=state, objective_value=objective_value, error=error, finished_at=t))
            if final_metrics:
                con.execute(delete(FinalMetrics).where(FinalMetrics.c.trial_id == trial_id))
                rows = [{"trial_id": trial_id, "name": k, "value": float(v)}
                        for k, v in final_metrics.items() if _storable(v)]
                if rows:
                    con.execute(insert(FinalMetrics), rows)
            if weights:
                con.execute(delete(Weights).where(Weights.c.trial_id == trial_id))
                con.execute(insert(Weights), [{"trial_id": trial_id, "file_name": k, "data": v}
                                              for k, v in weights.items()])
            if state in FINISHED_STATES:  # never run again: its checkpoint is dead weight
                con.execute(delete(Checkpoints).where(Checkpoints.c.trial_id == trial_id))
            row = con.execute(select(Trials).where(Trials.c.id == trial_id)).one()
            con.execute(update(Studies).where(Studies.c.id == row.study_id).values(updated_at=t))
            return _trial_info(row)

    def interrupt_running(self, study_id: int) -> list[TrialInfo]:
        """Trials still 'running' in the file belong to a driver that died: mark them interrupted."""
        error = "the driver stopped while this trial ran; it runs again on resume"
        running = (Trials.c.study_id == study_id, Trials.c.state == "running")
        with self._write() as con:
            rows = con.execute(select(Trials).where(*running)).all()
            con.execute(update(Trials).where(*running).values(state="interrupted", error=error))
            return [dataclasses.replace(_trial_info(r), state="interrupted", error=error) for r in rows]

    # --- stage checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, trial_id: int, stage: str, config_key: str, data: bytes) -> None:
        """The trial's latest stage checkpoint (one a trial: a later one replaces it)."""
        stmt = self._insert(Checkpoints).values(
            trial_id=trial_id, stage=stage, config_key=config_key, data=data, created_at=now()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["trial_id"],
            set_={k: stmt.excluded[k] for k in ("stage", "config_key", "data", "created_at")},
        )
        with self._write() as con:
            con.execute(stmt)

    def checkpoint(self, trial_id: int) -> tuple[str, str, bytes] | None:
        """(stage, config_key, data) of the trial's checkpoint, if it has one."""
        with self._read() as con:
            row = con.execute(
                select(Checkpoints.c.stage, Checkpoints.c.config_key, Checkpoints.c.data)
                .where(Checkpoints.c.trial_id == trial_id)
            ).first()
            return None if row is None else (row[0], row[1], row[2])

    def checkpoints_for_interrupted(self, study_id: int) -> dict[str, bytes]:
        """config key -> checkpoint of the study's `interrupted` trials (the latest stage wins when
        two share a key: the run is seeded, so either is valid for any trial with that config)."""
        order = {"rbm": 0, "dbn": 1}
        found: dict[str, tuple[int, bytes]] = {}
        with self._read() as con:
            for key, stage, data in con.execute(
                select(Checkpoints.c.config_key, Checkpoints.c.stage, Checkpoints.c.data)
                .join(Trials, Trials.c.id == Checkpoints.c.trial_id)
                .where(Trials.c.study_id == study_id, Trials.c.state == "interrupted")
                .order_by(Trials.c.number)
            ):
                rank = order.get(stage, -1)
                if key not in found or rank > found[key][0]:
                    found[key] = (rank, data)
        return {key: data for key, (_, data) in found.items()}

    def trials(self, study_id: int) -> list[TrialInfo]:
        with self._read() as con:
            last: dict[int, tuple[str, int]] = {}
            order = {"rbm": 0, "dbn": 1, "finetune": 2}
            for trial_id, stage, epoch in con.execute(
                select(EpochMetrics.c.trial_id, EpochMetrics.c.stage, func.max(EpochMetrics.c.epoch))
                .join(Trials, Trials.c.id == EpochMetrics.c.trial_id)
                .where(Trials.c.study_id == study_id)
                .group_by(EpochMetrics.c.trial_id, EpochMetrics.c.stage)
            ):
                if trial_id not in last or order.get(stage, 9) > order.get(last[trial_id][0], 9):
                    last[trial_id] = (stage, epoch)
            rows = con.execute(select(Trials).where(Trials.c.study_id == study_id).order_by(Trials.c.number))
            return [_trial_info(r, last.get(r.id)) for r in rows]

    def counts(self, study_id: int) -> dict[str, int]:
        with self._read() as con:
            found = dict(
                con.execute(
                    select(Trials.c.state, func.count()).where(Trials.c.study_id == study_id).group_by(Trials.c.state)
                ).all()
            )
        return {state: int(found.get(state, 0)) for state in TRIAL_STATES}

    def final_metrics(self, trial_id: int) -> dict[str, float]:
        with self._read() as con:
            rows = con.execute(
                select(FinalMetrics.c.name, FinalMetrics.c.value).where(FinalMetrics.c.trial_id == trial_id)
            )
            return dict(rows.all())

    def epoch_metrics(self, trial_id: int) -> list[tuple[str, int, str, float]]:
        E = EpochMetrics.c
        with self._read() as con:
            rows = con.execute(select(E.stage, E.epoch, E.name, E.value).where(E.trial_id == trial_id).order_by(E.id))
            return [tuple(r) for r in rows]

    def weights(self, trial_id: int) -> dict[str, bytes]:
        with self._read() as con:
            rows = con.execute(select(Weights.c.file_name, Weights.c.data).where(Weights.c.trial_id == trial_id))
            return dict(rows.all())

    # --- whole-study reads for the report (`analysis.load`) ----------------------------------------
    def studies(self) -> list[StudyInfo]:
        with self._read() as con:
            return [_study_info(row) for row in con.execute(select(Studies).order_by(Studies.c.id))]

    def meta(self) -> dict[str, str]:
        with self._read() as con:
            return dict(con.execute(select(Meta.c.key, Meta.c.value)).all())

    def final_metric_rows(self, study_id: int) -> list[tuple[int, str, float]]:
        """(trial id, name, value) of every final metric of the study's trials."""
        F = FinalMetrics.c
        with self._read() as con:
            return [tuple(r) for r in con.execute(
                select(F.trial_id, F.name, F.value)
                .join(Trials, Trials.c.id == F.trial_id).where(Trials.c.study_id == study_id)
            )]

    def epoch_metric_rows(self, study_id: int) -> list[tuple[int, str, int, str, float]]:
        """(trial id, stage, epoch, name, value) of every per-epoch metric of the study's trials."""
        E = EpochMetrics.c
        with self._read() as con:
            return [tuple(r) for r in con.execute(
                select(E.trial_id, E.stage, E.epoch, E.name, E.value)
                .join(Trials, Trials.c.id == E.trial_id).where(Trials.c.study_id == study_id)
                .order_by(E.id)
            )]

    def weight_sizes(self, study_id: int) -> list[tuple[int, str, int]]:
        """(trial id, file name, bytes) of the study's stored weight files."""
        with self._read() as con:
            return [tuple(r) for r in con.execute(
                select(Weights.c.trial_id, Weights.c.file_name, func.length(Weights.c.data))
                .join(Trials, Trials.c.id == Weights.c.trial_id).where(Trials.c.study_id == study_id)
            )]

    def has_optuna_tables(self) -> bool:
        with self.engine.connect() as con:
            return {"studies", "trials"} <= set(inspect(con).get_table_names())

    def integrity_check(self) -> str:
        """'ok', or what is wrong: SQLite's own check of the file (a server checks its storage
        itself), then rows that point at a trial or study that is not there (on either backend)."""
        with self.engine.connect() as con:
            if not self.target.on_server:
                verdict = str(con.exec_driver_sql("PRAGMA integrity_check").scalar())
                if verdict != "ok":
                    return verdict
            orphans = [
                f"{table.name}: {n} row(s) of no trial"
                for table in (EpochMetrics, FinalMetrics, Weights, Checkpoints)
                if (n := con.scalar(select(func.count()).select_from(table).where(
                    table.c.trial_id.not_in(select(Trials.c.id)))))
            ]
        return "; ".join(orphans) or "ok"

    def _insert(self, table: Table) -> Any:
        """INSERT that can take ON CONFLICT DO UPDATE: a dialect branch, since SQLAlchemy has the
        upsert per dialect (the same API on SQLite and PostgreSQL). PostgreSQL's dialect is imported
        here, on a server only: it pulls in asyncio, which `status` on a file need not pay for."""
        if self.target.on_server:
            from sqlalchemy.dialects import postgresql

            return postgresql.insert(table)
        return sqlite.insert(table)


@contextmanager
def snapshot(db: str | Path | Target, name: str | None = None) -> Iterator[StudyStorage]:
    """A read-only `StudyStorage` on a private, consistent SQLite copy of the database `db`.

    A report must work on a study that is still running and never write to its database. Every
    read, Optuna's included (through the copy's `url`), comes from the copy, which is deleted on
    exit; how the copy is taken is a backend's business:

    - a file is checked (`inspect_file`: a foreign or newer one is refused, unchanged), opened
      read-only and copied page by page with SQLite's online backup API in a single step, which
      holds one read transaction for the whole copy;
    - a server's rows are read in one read-only REPEATABLE READ transaction (`_copy_from_server`):
      `rbm_meta`, every study's row, and the rows of study `name` (with no name, of the only study;
      the report then refuses several) in our tables and Optuna's.

    Either way the copy is one state of the database even while a driver keeps writing.
    """
    target = parse_db(db)
    folder = tempfile.mkdtemp(prefix="rbm-study-snapshot-")
    copy = Path(folder) / "snapshot.db"
    try:
        if target.on_server:
            _copy_from_server(target, copy, name)
        else:
            _copy_file(Path(target.path or ""), copy)
        storage = StudyStorage(copy, readonly=True)
        try:
            yield storage
        finally:
            storage.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy_file(path: Path, copy: Path) -> None:
    if not path.is_file():
        raise StorageError(f"database {path} does not exist; pass the database a study wrote (--db PATH)")
    if inspect_file(path)[0] == "new":
        raise StorageError(f"{path} holds no rbm-study data yet; start a study with `rbm-study launch`")
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


# Optuna's tables that belong to one study, and how: by its study_id, or by the ids of its trials.
_OPTUNA_BY_STUDY = ("studies", "study_directions", "study_user_attributes", "study_system_attributes", "trials")
_OPTUNA_BY_TRIAL = ("trial_params", "trial_values", "trial_intermediate_values", "trial_user_attributes",
                    "trial_system_attributes", "trial_heartbeats")


def _copy_from_server(target: Target, copy: Path, name: str | None) -> None:
    """Copy one state of a server's study database into the SQLite file `copy` (see `snapshot`)."""
    source = StudyStorage(target, readonly=True)  # refuses a foreign, empty or newer database
    try:
        with source.engine.connect() as con:
            con = con.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with con.begin():
                mode = tuple(con.execute(select(func.current_setting("transaction_isolation"),
                                                func.current_setting("transaction_read_only"))).one())
                if mode != ("repeatable read", "on"):  # the whole point: never a torn or a writing read
                    raise StorageError(f"{target.display}: the snapshot transaction is {mode}, not a read-only "
                                       "repeatable read; report not taken")
                _copy_rows(con, copy, name)
    except DBAPIError as err:
        raise _server_error(target, err) from None
    finally:
        source.close()


def _copy_rows(con: Any, copy: Path, name: str | None) -> None:
    """All reads of a server snapshot, inside the caller's one transaction on `con`. The copy keeps
    the server's `rbm_meta`, so its schema version is the server's."""
    tables = set(inspect(con).get_table_names())
    names = list(con.scalars(select(Studies.c.name).order_by(Studies.c.id)))
    chosen = [name] if name is not None else names if len(names) == 1 else []
    study_ids = list(con.scalars(select(Studies.c.id).where(Studies.c.name.in_(chosen))))
    trial_ids = select(Trials.c.id).where(Trials.c.study_id.in_(study_ids))
    engine = create_engine(f"sqlite:///{copy}")
    try:
        with engine.begin() as out:
            ours = [t for t in schema.metadata.sorted_tables if t.name in tables]
            schema.metadata.create_all(out, tables=ours)
            for table in ours:
                query = select(table)
                if table.name in ("rbm_trials", "rbm_drivers"):
                    query = query.where(table.c.study_id.in_(study_ids))
                elif "trial_id" in table.c:
                    query = query.where(table.c.trial_id.in_(trial_ids))
                _copy_table(con, out, table, query)
        if {"studies", "trials"} <= tables:
            _copy_optuna(con, engine, copy, chosen, tables)
    finally:
        engine.dispose()


def _copy_table(con: Any, out: Any, table: Table, query: Any, chunk: int = 500) -> None:
    """Rows of `query` on the server into `table` of the copy, a chunk at a time (weights are large)."""
    result = con.execution_options(yield_per=chunk).execute(query)
    for rows in result.partitions(chunk):
        out.execute(table.insert(), [dict(row._mapping) for row in rows])


def _copy_optuna(con: Any, engine: Engine, copy: Path, chosen: list[str], tables: set[str]) -> None:
    """Optuna's rows of the chosen studies, into Optuna tables that Optuna itself made in the copy
    (same schema and version stamp, so `optuna.load_study` on the copy needs nothing else)."""
    import optuna
    from sqlalchemy import MetaData, column
    from sqlalchemy import table as bare_table

    made_by_optuna = optuna.storages.RDBStorage(f"sqlite:///{copy}")
    made_by_optuna.remove_session()
    made_by_optuna.engine.dispose()
    made = MetaData()
    made.reflect(engine, only=[t for t in (*_OPTUNA_BY_STUDY, *_OPTUNA_BY_TRIAL) if t in tables])
    ids = list(con.execute(bare_table("studies", column("study_id"), column("study_name")).select()).all())
    study_ids = [i for i, n in ids if n in chosen]
    trials = bare_table("trials", column("trial_id"), column("study_id"))
    trial_ids = select(trials.c.trial_id).where(trials.c.study_id.in_(study_ids))
    with engine.begin() as out:
        for name, into in made.tables.items():
            # Read untyped (the driver's values: Optuna's enums are text), write through the copy's types.
            source = bare_table(name, *(column(c.name) for c in into.c))
            key = source.c.study_id if name in _OPTUNA_BY_STUDY else source.c.trial_id
            _copy_table(con, out, into, select(source).where(key.in_(study_ids if name in _OPTUNA_BY_STUDY
                                                                      else trial_ids)))


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
