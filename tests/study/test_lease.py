"""The driver lease and the schema migration, on the database alone (no Ray, fast). The lease tests
run on both backends (`db`: an SQLite file, a database on the tests' PostgreSQL server)."""

from __future__ import annotations

import hashlib
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from rbm_study.study import lease
from rbm_study.study.schema import SCHEMA_VERSION
from rbm_study.study.storage import DriverClaim, DriverInfo, StorageError, StudyStorage, now
from tests.conftest import Database
from tests.study.conftest import version_1_database


def _study(db: Database) -> tuple[StudyStorage, int]:
    storage = StudyStorage(db.arg, create=True)
    return storage, storage.create_study("s", {"seed": 0}, 3, "m", "max", "test").id


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lease_is_a_compare_and_swap(db):
    storage, study = _study(db)
    first, second = (DriverClaim(socket.gethostname(), 1, t) for t in ("a" * 32, "b" * 32))
    assert storage.take_driver(study, first, None)
    assert not storage.take_driver(study, second, None)  # it saw no record, but one exists now
    seen = storage.driver(study)
    assert seen is not None and seen.token == first.token
    assert storage.renew_driver(study, first.token) and not storage.renew_driver(study, second.token)
    assert storage.take_driver(study, second, seen)  # judged dead by the caller: swapped
    assert not storage.take_driver(study, first, seen)  # the record it saw is gone
    assert not storage.renew_driver(study, first.token)  # the old holder learns it lost the lease
    storage.release_driver(study, second.token)
    assert storage.driver(study).token is None


def test_who_counts_as_alive(tmp_path):
    here = socket.gethostname()
    fresh = now()
    assert lease.is_alive(DriverInfo(here, lease.os.getpid(), fresh, fresh, "t"))
    assert not lease.is_alive(DriverInfo(here, _dead_pid(), fresh, fresh, "t"))  # gone on this host
    assert not lease.is_alive(DriverInfo(here, lease.os.getpid(), fresh, fresh, None))  # released
    stale = fresh - timedelta(seconds=lease.TIMEOUT_S + 1)
    assert not lease.is_alive(DriverInfo("elsewhere", 1, stale, stale, "t"))  # silent on another host
    assert lease.is_alive(DriverInfo("elsewhere", 1, fresh, fresh, "t"))  # another host: the heartbeat decides


def test_a_live_driver_is_refused_and_a_dead_one_taken_over(db):
    storage, study = _study(db)
    held, previous = lease.acquire(storage, study, "s")
    assert previous is None
    try:
        with pytest.raises(lease.DriverAliveError) as refused:
            lease.acquire(storage, study, "s")
        message = str(refused.value)
        assert socket.gethostname() in message and f"pid {lease.os.getpid()}" in message and "s ago" in message
        assert "\n" not in message
    finally:
        held.release()
    assert storage.driver(study).token is None  # released: the next resume is no takeover

    dead = DriverClaim(socket.gethostname(), _dead_pid(), "d" * 32)
    assert storage.take_driver(study, dead, storage.driver(study))
    held, previous = lease.acquire(storage, study, "s")
    try:
        assert previous is not None and previous.pid == dead.pid
    finally:
        held.release()


def test_heartbeat_keeps_the_lease_fresh_and_notices_a_loss(db, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    storage, study = _study(db)
    held, _ = lease.acquire(storage, study, "s")
    first = storage.driver(study).heartbeat_at
    time.sleep(0.3)
    assert storage.driver(study).heartbeat_at > first
    thief = DriverClaim("elsewhere", 1, "t" * 32)
    assert storage.take_driver(study, thief, storage.driver(study))
    assert held.lost.wait(2.0)
    held.release()  # a lost lease is not released: it is the thief's now
    assert storage.driver(study).token == thief.token


_RACE = """
import sys, time
from rbm_study.study import lease
from rbm_study.study.storage import StudyStorage
storage = StudyStorage(sys.argv[1])
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    held, _ = lease.acquire(storage, 1, "s")
except lease.DriverAliveError:
    print("refused"); sys.exit(0)
print("won"); time.sleep(1.0); held.release()
"""


def test_two_drivers_starting_together_one_wins(db):
    storage, study = _study(db)
    dead = DriverClaim(socket.gethostname(), _dead_pid(), "d" * 32)  # an orphaned study
    assert storage.take_driver(study, dead, storage.driver(study))
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, db.arg, str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused", "won"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_version_1_is_read_as_it_is_and_migrated_on_the_first_write(tmp_path, capsys):
    db = tmp_path / "v1.db"
    version_1_database(db)
    before = _digest(db)
    reader = StudyStorage(db, readonly=True)
    info = reader.get_study(None)
    assert reader.schema_version == 1 and reader.driver(info.id) is None
    assert [t.state for t in reader.trials(info.id)] == ["completed", "running"]
    reader.close()
    assert _digest(db) == before  # reading changed nothing

    writer = StudyStorage(db)
    assert writer.schema_version == SCHEMA_VERSION
    assert "migrated" in capsys.readouterr().err  # never silently
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT value FROM rbm_meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert con.execute("SELECT COUNT(*) FROM rbm_drivers").fetchone() == (0,)
    assert len(writer.trials(info.id)) == 2  # nothing lost
    writer.close()
    StudyStorage(db).close()
    assert "migrated" not in capsys.readouterr().err  # once


def test_a_newer_schema_is_refused_and_left_alone(tmp_path):
    db = tmp_path / "future.db"
    version_1_database(db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE rbm_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    before = _digest(db)
    for readonly in (True, False):
        with pytest.raises(StorageError, match="newer"):
            StudyStorage(db, readonly=readonly)
    assert _digest(db) == before


def test_on_a_server_the_lease_runs_on_the_servers_clock(postgres_server, monkeypatch):
    """A driver whose host clock is an hour behind still writes fresh heartbeats, and a reader
    whose clock is off judges them by the server's time."""
    from rbm_study.study import storage as storage_module

    db = Database("postgresql", postgres_server.create_database())
    storage, study = _study(db)
    true_now = storage_module.now
    monkeypatch.setattr(storage_module, "now", lambda: true_now() - timedelta(hours=1))
    monkeypatch.setattr(lease, "now", lambda: true_now() + timedelta(hours=1))
    held, _ = lease.acquire(storage, study, "s")
    try:
        record = storage.driver(study)
        assert abs(record.heartbeat_at - true_now()) < timedelta(seconds=60)
        assert lease.heartbeat_age(record) < 5 and lease.is_alive(record)
        with pytest.raises(lease.DriverAliveError):
            lease.acquire(storage, study, "s")
    finally:
        held.release()
