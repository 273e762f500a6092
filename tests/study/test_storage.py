"""The study database on its own: no Ray, no training (fast)."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from rbm_study.study.schema import SCHEMA_VERSION
from rbm_study.study.storage import StorageError, StudyExistsError, StudyStorage, UnknownStudyError


def _new(tmp_path, name="s"):
    storage = StudyStorage(tmp_path / "study.db", create=True)
    study = storage.create_study(name, {"seed": 0}, 3, "final.val.log_likelihood", "max", "test")
    return storage, study


def test_create_write_read_round_trip(tmp_path):
    storage, study = _new(tmp_path)
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
    with sqlite3.connect(tmp_path / "study.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_interrupted_trial_is_taken_over_not_duplicated(tmp_path):
    storage, study = _new(tmp_path)
    a = storage.start_trial(study.id, ray_trial_id="a", optuna_trial_number=0, params={"x": 0.1}, config={})
    storage.start_trial(study.id, ray_trial_id="b", optuna_trial_number=1, params={"x": 0.2}, config={})
    assert [t.id for t in storage.interrupt_running(study.id)] == [a.id, a.id + 1]
    again = storage.start_trial(study.id, ray_trial_id="c", optuna_trial_number=2, params={"x": 0.1}, config={})
    assert (again.id, again.number, again.attempt) == (a.id, 0, 2)
    # Ray retrying the same trial (a worker died) is the same row too.
    retry = storage.start_trial(study.id, ray_trial_id="c", optuna_trial_number=2, params={"x": 0.1}, config={})
    assert (retry.id, retry.attempt) == (a.id, 3)
    assert len(storage.trials(study.id)) == 2


def test_duplicate_and_unknown_names(tmp_path):
    storage, _ = _new(tmp_path, "first")
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


def test_other_schema_version_is_refused(tmp_path):
    storage, _ = _new(tmp_path)
    storage.close()
    with sqlite3.connect(tmp_path / "study.db") as con:
        con.execute("UPDATE rbm_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.close()
    with pytest.raises(StorageError, match="schema version"):
        StudyStorage(tmp_path / "study.db")


def test_missing_file_is_not_created_by_readers(tmp_path):
    with pytest.raises(StorageError, match="launch"):
        StudyStorage(tmp_path / "nothing.db", readonly=True)
    assert not (tmp_path / "nothing.db").exists()


def test_stage_checkpoints_saved_found_for_interrupted_and_deleted_when_finished(tmp_path):
    storage, study = _new(tmp_path)
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
    with closing(sqlite3.connect(tmp_path / "study.db")) as con:
        assert con.execute("SELECT COUNT(*) FROM rbm_checkpoints").fetchone() == (0,)


def test_nan_metrics_are_left_out_not_refused(tmp_path):
    # SQLite would store NaN as NULL in a NOT NULL column and refuse the whole transaction.
    storage, study = _new(tmp_path)
    t = storage.start_trial(study.id, ray_trial_id="a", optuna_trial_number=0, params={}, config={})
    storage.add_epoch_metrics(t.id, "rbm", 1, {"val_recon_error": float("nan"), "seconds": 1.5})
    storage.finish_trial(t.id, "failed", final_metrics={"rbm.log_z": float("nan"), "rbm.log_z_low": float("-inf")},
                         error="objective not finite")
    assert storage.epoch_metrics(t.id) == [("rbm", 1, "seconds", 1.5)]
    assert storage.final_metrics(t.id) == {"rbm.log_z_low": float("-inf")}
