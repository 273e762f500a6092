"""The study database on its own: no Ray, no training (fast). Each test runs on both backends
(`db`: an SQLite file, a database on the tests' PostgreSQL server) unless it is about one of them."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from rbm_study.study.schema import SCHEMA_VERSION
from rbm_study.study.storage import StorageError, StudyExistsError, StudyStorage, UnknownStudyError
from tests.conftest import Database


def _new(db: Database, name="s"):
    storage = StudyStorage(db.arg, create=True)
    study = storage.create_study(name, {"seed": 0}, 3, "final.val.log_likelihood", "max", "test")
    return storage, study


def test_create_write_read_round_trip(db):
    storage, study = _new(db)
    trial = storage.start_trial(study.id, ray_trial_id="a", optuna_trial_number=0, params={"rbm.cd_k": 2},
                                config={"rbm": {"cd_k": 2}})
    assert trial.number == 0 and trial.state == "running"
    storage.set_trial_node(trial.id, "node-1")
    storage.add_epoch_metrics(trial.id, "rbm", 1, {"val_recon_error": 0.5})
    storage.add_epoch_metrics(trial.id, "rbm", 1, {"val_recon_error": 0.25})  # upsert, no duplicate
    storage.finish_trial(trial.id, "completed", objective_value=-90.0,
                         final_metrics={"final.val.log_likelihood": -90.0}, weights={"zad1_rbm.th": b"xyz"})
    [t] = storage.trials(study.id)
    assert (t.state, t.node, t.objective_value, t.last_stage, t.last_epoch) == ("completed", "node-1", -90.0, "rbm", 1)
    assert storage.epoch_metrics(t.id) == [("rbm", 1, "val_recon_error", 0.25)]
    assert storage.final_metrics(t.id) == {"final.val.log_likelihood": -90.0}
    assert storage.weights(t.id) == {"zad1_rbm.th": b"xyz"}
    assert storage.counts(study.id)["completed"] == 1
    assert storage.integrity_check() == "ok"
    assert db.query("SELECT stage, epoch, name, value FROM rbm_epoch_metrics") == [("rbm", 1, "val_recon_error", 0.25)]
    if db.kind == "sqlite":
        with closing(sqlite3.connect(db.arg)) as con:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_interrupted_trial_is_taken_over_not_duplicated(db):
    storage, study = _new(db)
    a = storage.start_trial(study.id, ray_trial_id="a", optuna_trial_number=0, params={"x": 0.1}, config={})
    storage.start_trial(study.id, ray_trial_id="b", optuna_trial_number=1, params={"x": 0.2}, config={})
    assert [t.id for t in storage.interrupt_running(study.id)] == [a.id, a.id + 1]
    again = storage.start_trial(study.id, ray_trial_id="c", optuna_trial_number=2, params={"x": 0.1}, config={})
    assert (again.id, again.number, again.attempt) == (a.id, 0, 2)
    # Ray retrying the same trial (a worker died) is the same row too.
    retry = storage.start_trial(study.id, ray_trial_id="c", optuna_trial_number=2, params={"x": 0.1}, config={})
    assert (retry.id, retry.attempt) == (a.id, 3)
    assert len(storage.trials(study.id)) == 2


def test_duplicate_and_unknown_names(db):
    storage, _ = _new(db, "first")
    with pytest.raises(StudyExistsError, match="resume"):
        storage.create_study("first", {}, 1, "m", "max", "v")
    storage.create_study("second", {}, 1, "m", "max", "v")
    with pytest.raises(UnknownStudyError, match="first, second"):
        storage.get_study("third")
    with pytest.raises(UnknownStudyError, match="--name"):
        storage.get_study(None)


def test_foreign_files_are_refused_unchanged(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("hello, not a database\n" * 10)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE things (x INTEGER)")
        con.execute("INSERT INTO things VALUES (1)")
    con.close()
    for path in (text, other):
        before = path.read_bytes()
        with pytest.raises(StorageError, match="not an rbm-study database"):
            StudyStorage(path, create=True)
        assert path.read_bytes() == before
        assert not path.with_name(path.name + "-wal").exists()


def test_other_schema_version_is_refused(db):
    storage, _ = _new(db)
    storage.close()
    db.execute("UPDATE rbm_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    before = db.digest()
    for readonly in (True, False):
        with pytest.raises(StorageError, match="schema version"):
            StudyStorage(db.arg, readonly=readonly)
    assert db.digest() == before


def test_missing_file_is_not_created_by_readers(tmp_path):
    with pytest.raises(StorageError, match="launch"):
        StudyStorage(tmp_path / "nothing.db", readonly=True)
    assert not (tmp_path / "nothing.db").exists()


def test_empty_server_database_is_not_written_by_readers(postgres_server):
    db = Database("postgresql", postgres_server.create_database())
    with pytest.raises(StorageError, match=r"holds no rbm-study data yet.*launch"):
        StudyStorage(db.arg, readonly=True)
    with pytest.raises(StorageError, match="holds no rbm-study data yet"):
        StudyStorage(db.arg)  # a writer that may not create (resume) does not either
    assert db.query("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


def test_foreign_server_database_is_refused_unchanged(postgres_server):
    db = Database("postgresql", postgres_server.create_database())
    db.execute("CREATE TABLE things (x INTEGER)")
    db.execute("INSERT INTO things VALUES (1)")
    before = db.digest()
    for create, readonly in ((True, False), (False, True), (False, False)):
        with pytest.raises(StorageError, match=r"not an rbm-study one .*things.*not changed"):
            StudyStorage(db.arg, create=create, readonly=readonly)
    assert db.digest() == before
    assert db.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == [("things",)]


def test_the_password_is_shown_nowhere(postgres_server, monkeypatch):
    db = Database("postgresql", postgres_server.create_database())
    storage, _ = _new(db)
    secret = postgres_server.password
    assert secret in storage.url  # it connects with it...
    assert secret not in storage.display and "***" in storage.display  # ...and shows it nowhere
    assert secret not in storage.target.without_password
    with pytest.raises(StudyExistsError) as err:
        storage.create_study("s", {}, 1, "m", "max", "v")
    assert secret not in str(err.value)
    import pickle

    assert secret.encode() not in pickle.dumps(storage)  # Ray Tune writes its callbacks to disk
    with pytest.raises(StorageError, match="no password supplied") as err:
        pickle.loads(pickle.dumps(storage))  # so an unpickled copy has no password of its own...
    assert secret not in str(err.value)
    monkeypatch.setenv("PGPASSWORD", secret)  # ...and takes it where libpq looks (or ~/.pgpass)
    assert pickle.loads(pickle.dumps(storage)).study_names() == ["s"]


def test_several_studies_share_one_server_database(db):
    first, _ = _new(db, "alice")
    second = StudyStorage(db.arg)  # another user's process, on the same database
    other = second.create_study("bob", {"seed": 1}, 2, "final.val.log_likelihood", "max", "test")
    a = first.start_trial(first.get_study("alice").id, ray_trial_id="a", optuna_trial_number=0, params={}, config={})
    b = second.start_trial(other.id, ray_trial_id="a", optuna_trial_number=0, params={}, config={})
    assert (a.number, b.number) == (0, 0)  # numbered within each study
    assert first.study_names() == second.study_names() == ["alice", "bob"]
    assert [t.id for t in first.trials(other.id)] == [b.id]


def test_stage_checkpoints_saved_found_for_interrupted_and_deleted_when_finished(db):
    storage, study = _new(db)
    a = storage.start_trial(study.id, ray_trial_id="a", optuna_trial_number=0, params={"x": 1}, config={})
    b = storage.start_trial(study.id, ray_trial_id="b", optuna_trial_number=1, params={"x": 2}, config={})
    storage.save_checkpoint(a.id, "rbm", "key-a", b"rbm bytes")
    storage.save_checkpoint(a.id, "dbn", "key-a", b"dbn bytes")  # replaces: one row a trial
    storage.save_checkpoint(b.id, "rbm", "key-b", b"b's rbm")
    assert storage.checkpoint(a.id) == ("dbn", "key-a", b"dbn bytes")
    assert storage.checkpoints_for_interrupted(study.id) == {}  # running trials are not resumed from
    storage.finish_trial(b.id, "completed", objective_value=1.0, weights={"zad1_rbm.th": b"w"})
    assert storage.checkpoint(b.id) is None  # finished: its weights are stored, the checkpoint goes

    storage.interrupt_running(study.id)
    assert storage.checkpoints_for_interrupted(study.id) == {"key-a": b"dbn bytes"}
    again = storage.start_trial(study.id, ray_trial_id="c", optuna_trial_number=2, params={"x": 1}, config={})
    assert again.id == a.id and storage.checkpoint(a.id) is not None  # a re-run keeps it until it finishes
    storage.finish_trial(a.id, "failed", error="out of retries")
    assert storage.checkpoint(a.id) is None
    assert storage.integrity_check() == "ok"
    assert db.query("SELECT COUNT(*) FROM rbm_checkpoints") == [(0,)]


def test_nan_metrics_are_left_out_not_refused(db):
    # SQLite would store NaN as NULL in a NOT NULL column and refuse the whole transaction.
    storage, study = _new(db)
    t = storage.start_trial(study.id, ray_trial_id="a", optuna_trial_number=0, params={}, config={})
    storage.add_epoch_metrics(t.id, "rbm", 1, {"val_recon_error": float("nan"), "seconds": 1.5})
    storage.finish_trial(t.id, "failed", final_metrics={"rbm.log_z": float("nan"), "rbm.log_z_low": float("-inf")},
                         error="objective not finite")
    assert storage.epoch_metrics(t.id) == [("rbm", 1, "seconds", 1.5)]
    assert storage.final_metrics(t.id) == {"rbm.log_z_low": float("-inf")}


def test_a_multi_objective_study_and_a_long_name(db):
    # PostgreSQL enforces column lengths that SQLite ignores: the stored modes must fit.
    storage = StudyStorage(db.arg, create=True)
    info = storage.create_study("two", {}, 1, "final.val.log_likelihood,rbm.val.recon_error", "max,min", "test")
    assert storage.get_study("two").objective_mode == "max,min" == info.objective_mode
    with pytest.raises(StorageError, match="shorter --name"):
        storage.create_study("x" * 201, {}, 1, "m", "max", "v")


_CREATE = """
import sys, time
from rbm_study.study.storage import StudyStorage
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
storage = StudyStorage(sys.argv[1], create=True)
storage.create_study(sys.argv[3], {}, 1, "m", "max", "v")
print("ok")
"""


def test_two_launches_into_one_empty_server_database_create_one_schema(postgres_server):
    import subprocess
    import sys
    import time

    db = Database("postgresql", postgres_server.create_database())
    start = str(time.time() + 2.0)
    procs = [subprocess.Popen([sys.executable, "-c", _CREATE, db.arg, start, name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    results = [p.communicate(timeout=60) for p in procs]
    assert [out.strip() for out, _ in results] == ["ok", "ok"], results
    assert sorted(n for (n,) in db.query("SELECT name FROM rbm_studies")) == ["a", "b"]
    assert db.query("SELECT key, value FROM rbm_meta ORDER BY key") == [("app", "rbm-study"),
                                                                         ("schema_version", str(SCHEMA_VERSION))]


def test_a_read_only_user_can_read_and_snapshot_a_server_study(postgres_server):
    """Another user with SELECT rights only: status and report need nothing more."""
    from rbm_study.study.storage import snapshot

    db = Database("postgresql", postgres_server.create_database())
    storage, study = _new(db)
    storage.start_trial(study.id, ray_trial_id="a", optuna_trial_number=0, params={"x": 1}, config={})
    storage.close()
    reader = f"reader_{db.arg.rsplit('/', 1)[1]}"
    db.execute(f"CREATE ROLE {reader} LOGIN PASSWORD 'readonly-pw'")
    db.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {reader}")
    url = db.arg.replace(f"postgres:{postgres_server.password}@", f"{reader}:readonly-pw@")
    before = db.digest()
    assert StudyStorage(url, readonly=True).get_study(None).name == "s"
    with snapshot(url) as copy:
        assert [t.params for t in copy.trials(copy.get_study("s").id)] == [{"x": 1}]
    with pytest.raises(StorageError, match=r"may not write here.*permission denied for table rbm_studies"):
        StudyStorage(url).set_study_status(study.id, "completed")  # a writer needs write rights
    assert db.digest() == before
