"""Shared test settings: where MNIST is, and tiny configs that keep the suite in minutes."""

import hashlib
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def mnist_root() -> str | None:
    root = os.environ.get("MNIST_ROOT") or (str(SHARED_DATA) if SHARED_DATA.exists() else None)
    return root if root and (Path(root) / "MNIST" / "raw").exists() else None


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    root = mnist_root()
    if root is None:
        pytest.skip("MNIST not found: set MNIST_ROOT to a folder holding MNIST/raw")
    return root


# A whole lab run on MNIST in a few seconds: small subset, few epochs, cheap AIS.
TINY = [
    "data.subset=1000",
    "data.val_size=10000",
    "rbm.hidden_size=16",
    "rbm.epochs=2",
    "dbn.hidden_size=12",
    "dbn.epochs=1",
    "finetune.epochs=1",
    "eval.ais_betas=300",
    "eval.ais_chains=16",
    "eval.size=300",
    "eval.raise_images=5",
    "eval.raise_betas=200",
]


# --- PostgreSQL: a server of the tests' own, on loopback, for the tests that run on both backends ---
SKIP_POSTGRES = "RBM_STUDY_SKIP_POSTGRES"
"""Set to 1 on a machine without PostgreSQL to skip its tests; without it, a missing server fails them."""


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL server: its binaries, its folder, and the superuser's password (every
    test connects over TCP with it, so the password path is exercised everywhere)."""

    bin: Path
    folder: Path
    port: int
    password: str

    def url(self, database: str) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/N/bin (Debian's layout), or the folder of initdb on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if
                   p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).resolve().parent if on_path else None


def _as_postgres(command: str) -> subprocess.CompletedProcess:
    """Run `command` as the `postgres` user when we are root (initdb and the server refuse root)."""
    argv = ["su", "postgres", "-s", "/bin/sh", "-c", command] if os.geteuid() == 0 else ["sh", "-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if os.environ.get(SKIP_POSTGRES) == "1":
        pytest.skip(f"{SKIP_POSTGRES}=1: PostgreSQL tests skipped")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.fail(f"PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): apt-get install "
                    f"postgresql, or set {SKIP_POSTGRES}=1 to skip these tests on this machine", pytrace=False)
    folder = Path(tempfile.mkdtemp(prefix="rbm-study-pg-"))
    password = secrets.token_hex(12)
    (folder / "pw").write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(folder / "pw", "postgres")
    data, port = folder / "data", _free_port()
    server = PostgresServer(bin_dir, folder, port, password)
    steps = [
        f"{bin_dir}/initdb -D {data} -U postgres --auth-local=trust --auth-host=scram-sha-256 --pwfile={folder}/pw "
        "-E UTF8 --no-locale",
        f"{bin_dir}/pg_ctl -D {data} -l {folder}/server.log -w -t 60 start -o \"-c listen_addresses=127.0.0.1 "
        f"-c port={port} -c unix_socket_directories={folder} -c fsync=off -c full_page_writes=off\"",
    ]
    try:
        for step in steps:
            done = _as_postgres(step)
            if done.returncode != 0:
                log = (folder / "server.log").read_text()[-2000:] if (folder / "server.log").exists() else ""
                pytest.fail(f"PostgreSQL did not start: {step.split()[0]}: {done.stderr.strip()[-2000:]} {log}",
                            pytrace=False)
        yield server
    finally:
        _as_postgres(f"{bin_dir}/pg_ctl -D {data} -m immediate -w stop")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Database:
    """A fresh study database of either backend: `arg` is what `--db` takes."""

    kind: str  # "sqlite" or "postgresql"
    arg: str
    server: PostgresServer | None = None

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of `sql` (with ? placeholders), read outside rbm-study, as a person would check them."""
        if self.kind == "sqlite":
            con = sqlite3.connect(f"file:{self.arg}?mode=ro", uri=True, timeout=30)
            try:
                return con.execute(sql, params).fetchall()
            finally:
                con.close()
        import psycopg

        with psycopg.connect(self.arg, autocommit=True) as con:
            return [tuple(r) for r in con.execute(sql.replace("?", "%s"), params).fetchall()]

    def execute(self, sql: str, params: tuple = ()) -> None:
        """One statement, committed (to tamper with a database as a test needs)."""
        if self.kind == "sqlite":
            with closing(sqlite3.connect(self.arg)) as con, con:
                con.execute(sql, params)
            return
        import psycopg

        with psycopg.connect(self.arg, autocommit=True) as con:
            con.execute(sql.replace("?", "%s"), params)

    def digest(self) -> str:
        """What the database holds, as a hash of every row of every table (not a file's bytes: SQLite
        folds its WAL into the file whenever the last connection closes, which writes nothing new)."""
        if self.kind == "sqlite":
            if not Path(self.arg).exists():
                return ""
            con = sqlite3.connect(f"file:{self.arg}?mode=ro", uri=True, timeout=30)
            try:
                return hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()
            finally:
                con.close()
        tables = [t for (t,) in self.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                           "ORDER BY tablename")]
        text = repr([(t, sorted(map(repr, self.query(f'SELECT * FROM "{t}"')))) for t in tables])
        return hashlib.sha256(text.encode()).hexdigest()


def new_database(kind: str, request: pytest.FixtureRequest, folder: Path, name: str = "study.db") -> Database:
    """A fresh database of `kind` (a file in `folder`, or a new database on the tests' server)."""
    if kind == "sqlite":
        return Database("sqlite", str(folder / name))
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return Database("postgresql", server.create_database(), server)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """Each test on its own fresh database, once per backend."""
    return new_database(request.param, request, tmp_path)
