"""Bad input is refused before anything starts: exit code 2, one line naming the problem."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest

from rbm_study.cli import main
from rbm_study.study.config import load_study_config
from rbm_study.study.storage import StudyStorage
from tests.conftest import Database
from tests.study.conftest import write_config


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("sections", "named"),
    [
        ({"search": {"space": {"rbm.nonsense": [1, 2]}}}, "search.space.rbm.nonsense"),
        ({"search": {"space": {"rbm.cd_k": {"type": "int", "low": 0, "high": 3}}}}, "search.space.rbm.cd_k"),
        ({"search": {"space": {"rbm.learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}}},
         "search.space.rbm.learning_rate"),
        ({"search": {"space": {"rbm.cd_k": {"type": "int", "low": 1.5, "high": 3}}}}, "search.space.rbm.cd_k"),
        ({"search": {"space": {"rbm.cd_k": {"type": "normal"}}}}, "search.space.rbm.cd_k"),
        ({"search": {"space": {"search.num_samples": [1, 2]}}}, "search.space.search.num_samples"),
        ({"search": {"sampler": "grid", "num_samples": 5, "space": {"rbm.cd_k": [1, 2]}}}, "search.num_samples"),
        ({"search": {"sampler": "bayes"}}, "search.sampler"),
        ({"objective": {"metric": "val_accuracy"}}, "objective.metric"),
        ({"objective": {"metric": ["final.val.log_likelihood", "rbm.val.recon_error"], "mode": ["max"]}},
         "objective.mode"),
        ({"resources": {"cpus_per_trial": 0}}, "resources.cpus_per_trial"),
        ({"rbm": {"cd_k": 0}}, "rbm.cd_k"),
    ],
)
def test_invalid_config_is_refused_naming_the_key(tmp_path, capsys, sections, named):
    config = write_config(tmp_path, **sections)
    db = tmp_path / "study.db"
    code, err = run(capsys, "launch", str(config), "--db", str(db))
    assert code == 2
    assert named in err and len(err.strip().splitlines()) == 1
    assert not db.exists()


def test_search_space_forms(tmp_path):
    config = write_config(tmp_path, search={"space": {
        "rbm.cd_k": [1, 3],
        "rbm.hidden_size": {"type": "int", "low": 50, "high": 150, "step": 50},
        "rbm.learning_rate": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
        "finetune.epochs": {"type": "categorical", "values": [0, 2]},
    }})
    study = load_study_config(str(config), ["search.num_samples=5"])
    assert {p.key: p.kind for p in study.params} == {
        "rbm.cd_k": "categorical", "rbm.hidden_size": "int", "rbm.learning_rate": "float",
        "finetune.epochs": "categorical",
    }
    assert study.num_samples == 5
    lab = study.lab_config({"rbm.cd_k": 3, "rbm.learning_rate": 0.02})
    assert (lab.rbm.cd_k, lab.rbm.learning_rate) == (3, 0.02) and "search" not in lab.to_dict()


def test_lab_yaml_is_a_study_of_one_trial():
    study = load_study_config("configs/lab.yaml")
    assert study.num_samples == 1 and study.params == []


def test_launch_of_an_existing_name_points_to_resume(tmp_path, capsys):
    db = tmp_path / "study.db"
    StudyStorage(db, create=True).create_study("tiny", {}, 1, "final.val.log_likelihood", "max", "test")
    code, err = run(capsys, "launch", str(write_config(tmp_path)), "--db", str(db), "--name", "tiny")
    assert code == 2 and "already exists" in err and "rbm-study resume" in err


def test_resume_of_an_unknown_name_lists_the_names(tmp_path, capsys):
    db = tmp_path / "study.db"
    storage = StudyStorage(db, create=True)
    for name in ("alpha", "beta"):
        storage.create_study(name, {}, 1, "final.val.log_likelihood", "max", "test")
    code, err = run(capsys, "resume", "--db", str(db), "--name", "gamma")
    assert code == 2 and "alpha, beta" in err
    code, err = run(capsys, "status", "--db", str(db), "--name", "gamma")
    assert code == 2 and "alpha, beta" in err


@pytest.mark.parametrize("command", ["launch", "resume", "status", "report", "export"])
def test_an_empty_name_is_refused_and_nothing_changes(tmp_path, capsys, command):
    db = tmp_path / "study.db"
    storage = StudyStorage(db, create=True)
    storage.create_study("tiny", {}, 1, "final.val.log_likelihood", "max", "test")
    storage.close()  # an open connection may still write the file (its header) when it is collected
    before = db.read_bytes()
    argv = {"launch": [str(write_config(tmp_path))], "report": ["--out", str(tmp_path / "r")],
            "export": ["--trial", "0", "--out", str(tmp_path / "e")]}.get(command, [])
    code, err = run(capsys, command, *argv, "--db", str(db), "--name", " ")
    assert code == 2 and "--name ' ' names no study" in err and len(err.strip().splitlines()) == 1
    assert db.read_bytes() == before and not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_foreign_database_is_refused_and_unchanged(tmp_path, capsys):
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE measurements (x REAL)")
    con.commit()
    con.close()
    before = db.read_bytes()
    for argv in (("launch", str(write_config(tmp_path)), "--db", str(db)), ("resume", "--db", str(db)),
                 ("status", "--db", str(db))):
        code, err = run(capsys, *argv)
        assert code == 2 and "not an rbm-study database" in err
    assert db.read_bytes() == before


def test_missing_database(tmp_path, capsys):
    code, err = run(capsys, "status", "--db", str(tmp_path / "none.db"))
    assert code == 2 and "rbm-study launch" in err
    assert not (tmp_path / "none.db").exists()


def test_a_database_where_no_file_can_be_made_is_refused(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    config = write_config(tmp_path)
    code, err = run(capsys, "launch", str(config), "--db", str(taken / "study.db"))
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    assert taken.read_text() == "mine"
    if Path("/proc/self").is_dir():  # Linux: a folder that takes no new file, even for root
        code, err = run(capsys, "launch", str(config), "--db", "/proc/rbm-study-test.db")
        assert code == 2 and "cannot create the database" in err and len(err.strip().splitlines()) == 1


def test_a_local_study_without_mnist_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    """On a local Ray the trials read MNIST where the driver does: missing there, every trial would
    fail. (A file as the data root: nothing can be downloaded into it, whatever the network.)"""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nowhere = tmp_path / "notes.txt"
    nowhere.write_text("mine")
    config = write_config(tmp_path, data={"root": str(nowhere)})
    db = tmp_path / "study.db"
    code, err = run(capsys, "launch", str(config), "--db", str(db))
    assert code == 2 and "MNIST not found" in err and len(err.strip().splitlines()) == 1, err
    assert not db.exists()

    storage = StudyStorage(db, create=True)  # a study whose data has gone since it was launched
    study = storage.create_study("tiny", load_study_config(str(config), []).to_dict(), 2,
                                 "final.val.log_likelihood", "max", "test")
    code, err = run(capsys, "resume", "--db", str(db))
    assert code == 2 and "MNIST not found" in err and len(err.strip().splitlines()) == 1, err
    assert storage.get_study("tiny").status == study.status and storage.trials(study.id) == []
    code, err = run(capsys, "resume", "--db", str(db))  # the lease was given back: refused the same way
    assert code == 2 and "MNIST not found" in err, err
    storage.close()


@pytest.mark.parametrize(
    ("resources", "named"),
    [({"num_cpus": 1, "cpus_per_trial": 2}, "resources.cpus_per_trial is 2 but the local Ray has 1 CPUs"),
     ({"gpus_per_trial": 1}, "resources.gpus_per_trial is 1 but this machine has 0 CUDA GPUs")],
)
def test_a_local_trial_that_can_never_start_is_refused_before_anything_is_stored(
        tmp_path, capsys, monkeypatch, resources, named):
    """A trial asking for more than the local Ray has would leave Tune waiting for it forever."""
    if "gpus_per_trial" in resources:
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = write_config(tmp_path, device="auto", resources=resources)
    db = tmp_path / "study.db"
    code, err = run(capsys, "launch", str(config), "--db", str(db))
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not db.exists()

    storage = StudyStorage(db, create=True)  # stored by a driver that had the resources
    study = storage.create_study("tiny", load_study_config(str(config), []).to_dict(), 2,
                                 "final.val.log_likelihood", "max", "test")
    code, err = run(capsys, "resume", "--db", str(db))
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert storage.get_study("tiny").status == study.status and storage.trials(study.id) == []
    storage.close()


# --- --db as a URL ---------------------------------------------------------------------------------
COMMANDS = ("launch", "resume", "status", "report", "export")


def _argv(command: str, db: str, config: Path, out: Path) -> list[str]:
    return {
        "launch": ["launch", str(config), "--db", db],
        "resume": ["resume", "--db", db],
        "status": ["status", "--db", db, "--json"],
        "report": ["report", "--db", db, "--out", str(out)],
        "export": ["export", "--db", db, "--trial", "0", "--out", str(out)],
    }[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_url_of_another_dialect_is_refused_and_nothing_written(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)  # the old behaviour made a folder named "mysql:" here
    config, out = write_config(tmp_path), tmp_path / "out"
    code, err = run(capsys, *_argv(command, "mysql://someone:hunter2@127.0.0.1:3306/studies", config, out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "mysql is not supported" in err and "postgresql://" in err and "hunter2" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


@pytest.mark.parametrize("command", COMMANDS)
def test_a_server_that_does_not_answer_is_refused(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    config, out = write_config(tmp_path), tmp_path / "out"
    url = f"postgresql://someone:hunter2@127.0.0.1:{_closed_port()}/studies"
    code, err = run(capsys, *_argv(command, url, config, out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot use the database at postgresql+psycopg://someone:***@127.0.0.1" in err and "hunter2" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_foreign_server_database_is_refused_and_unchanged(tmp_path, capsys, postgres_server, command):
    db = Database("postgresql", postgres_server.create_database())
    db.execute("CREATE TABLE measurements (x REAL)")
    before = db.digest()
    code, err = run(capsys, *_argv(command, db.arg, write_config(tmp_path), tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "not an rbm-study one (tables: measurements)" in err and postgres_server.password not in err
    assert db.digest() == before


def test_a_missing_server_database_is_named(tmp_path, capsys, postgres_server):
    url = postgres_server.url("no_such_database")
    code, err = run(capsys, "status", "--db", url)
    assert code == 2 and 'database "no_such_database" does not exist' in err and "createdb" in err
    assert postgres_server.password not in err
