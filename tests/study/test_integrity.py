"""Study integrity with real processes: one live driver, one trial number, old databases, Optuna's view,
any Ray cluster. Ray on loopback (or in a private network namespace), SQLite files in a temp dir."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import optuna
import pytest

from rbm_study.study.storage import StudyStorage, now, parse_db
from tests.study.conftest import (
    cli,
    env,
    needs_mnist,
    optuna_states,
    query,
    start,
    trial_states,
    version_1_database,
    wait_for,
    write_config,
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(run: subprocess.CompletedProcess) -> str:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stdout + run.stderr
    return lines[0]


@pytest.mark.slow
@needs_mnist()
def test_live_driver_refused_sigterm_releases_resume_finishes_and_one_number_everywhere(tmp_path, db):
    """On both backends (`db`): an SQLite file, and a database on the tests' PostgreSQL server."""
    # four trials one at a time, long enough that the driver is still at work while the probes below
    # start their own processes on a busy machine (with three short ones it could finish first)
    config = write_config(tmp_path, finetune={"epochs": 20},
                          search={"num_samples": 4, "max_concurrent": 1, "sampler": "grid",
                                  "space": {"rbm.cd_k": [1, 2, 3, 4]}})
    log = tmp_path / "launch.log"
    driver = start([sys.executable, "-m", "rbm_study", "launch", str(config), "--db", db.arg, "--name", "live"], log)
    try:
        wait_for(lambda: trial_states(db).get("running", 0) >= 1, 240, "a running trial", driver, log)
        lease_before = query(db, "SELECT host, pid, token FROM rbm_drivers")
        assert lease_before == [(socket.gethostname(), driver.pid, lease_before[0][2])]

        # A second driver, from another terminal, is refused before it writes anything.
        refused = _one_line(cli("resume", "--db", db.arg, "--name", "live"))
        assert f"live driver on {socket.gethostname()} (pid {driver.pid}, heartbeat" in refused
        assert "already exists" in _one_line(cli("launch", str(config), "--db", db.arg, "--name", "live"))
        assert query(db, "SELECT host, pid, token FROM rbm_drivers") == lease_before
        status = cli("status", "--db", db.arg)
        assert f"driver alive on {socket.gethostname()} (pid {driver.pid}, heartbeat" in status.stdout
        assert json.loads(cli("status", "--db", db.arg, "--json").stdout)["driver"]["alive"] is True

        # SIGTERM: the driver stops within a minute, marks its trials and hands the study back.
        stopped_at = time.monotonic()
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=60)
        print(f"SIGTERM to exit: {time.monotonic() - stopped_at:.1f} s")
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode != 0
    assert query(db, "SELECT status FROM rbm_studies") == [("interrupted",)]
    assert trial_states(db).get("running", 0) == 0
    assert query(db, "SELECT token FROM rbm_drivers") == [(None,)]
    assert "no driver since" in cli("status", "--db", db.arg).stdout

    resumed = cli("resume", "--db", db.arg, "--quiet")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "taking over" not in resumed.stdout  # the lease was released, not abandoned
    assert trial_states(db) == {"completed": 4}
    # The grid's four points, each once: a trial Tune had asked for when SIGTERM came, before it
    # reached the database, runs on resume instead of the grid proposing another point twice.
    ks = sorted(json.loads(p)["rbm.cd_k"] if isinstance(p, str) else p["rbm.cd_k"]
                for (p,) in query(db, "SELECT params FROM rbm_trials"))
    assert ks == [1, 2, 3, 4]
    assert optuna_states(db).get("COMPLETE") == 4

    # Optuna's view: curves and the metrics a dashboard shows, for every completed trial.
    study = optuna.load_study(study_name="live", storage=parse_db(db.arg).connect_url)
    numbers = {n for (n,) in query(db, "SELECT number FROM rbm_trials")}
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(completed) == 4
    for trial in completed:
        assert len(trial.intermediate_values) >= 3, trial.number
        assert trial.user_attrs["rbm_study_trial"] in numbers and "node" in trial.user_attrs
        assert trial.user_attrs["final.val.log_likelihood"] == pytest.approx(trial.value)
    assert sorted(t.user_attrs["rbm_study_trial"] for t in completed) == sorted(numbers)

    # One number: status names the best trial N; export --trial N writes exactly its stored weights;
    # the report heads its figures "Trial N".
    document = json.loads(cli("status", "--db", db.arg, "--json").stdout)
    best = document["best"]["trial"]
    assert document["status"] == "completed" and document["driver"]["alive"] is False
    assert f"(trial {best})" in cli("status", "--db", db.arg).stdout
    exported = cli("export", "--db", db.arg, "--name", "live", "--trial", str(best), "--out", str(tmp_path / "x"))
    assert exported.returncode == 0, exported.stderr
    stored = dict(query(db, "SELECT w.file_name, w.data FROM rbm_weights w JOIN rbm_trials t ON t.id = w.trial_id "
                            "WHERE t.number = ?", (best,)))
    assert len(stored) == 3
    for name, data in stored.items():
        assert (tmp_path / "x" / name).read_bytes() == data
    report = cli("report", "--db", db.arg, "--out", str(tmp_path / "r"), timeout=600)
    assert report.returncode == 0, report.stderr
    assert f"### Trial {best}: best trial by the objective" in (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / f"trial{best}_task1_weights.png").is_file()


@pytest.mark.slow
@needs_mnist()
def test_a_driver_silent_on_another_host_is_taken_over_after_the_timeout(tmp_path):
    from rbm_study.study import lease

    db = tmp_path / "study.db"
    version_1_database(db)
    storage = StudyStorage(db)  # migrates
    study = storage.get_study(None)
    with storage.engine.begin() as con:  # a driver on another machine, heartbeat just now
        con.exec_driver_sql(
            "INSERT INTO rbm_drivers (study_id, host, pid, started_at, heartbeat_at, token) VALUES (?, ?, ?, ?, ?, ?)",
            (study.id, "elsewhere", 4242, now(), now(), "e" * 32))
    assert "live driver on elsewhere (pid 4242" in _one_line(cli("resume", "--db", str(db)))
    silent = now() - timedelta(seconds=lease.TIMEOUT_S + 1)
    with storage.engine.begin() as con:
        con.exec_driver_sql("UPDATE rbm_drivers SET heartbeat_at = ?", (silent,))
    storage.close()
    started = time.monotonic()
    resumed = cli("resume", "--db", str(db), "--quiet")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "taking over from the driver on elsewhere (pid 4242)" in resumed.stdout
    print(f"resume after a silent remote driver: {time.monotonic() - started:.1f} s")
    assert trial_states(db) == {"completed": 3}


@pytest.mark.slow
@needs_mnist()
def test_version_1_database_is_read_as_it_is_and_resumes_to_exactly_num_samples(tmp_path):
    db = tmp_path / "v1.db"
    version_1_database(db)
    before = _digest(db)
    status = cli("status", "--db", str(db))
    assert status.returncode == 0, status.stderr
    assert "status interrupted" in status.stdout and "no driver since" in status.stdout
    assert json.loads(cli("status", "--db", str(db), "--json").stdout)["schema_version"] == 1
    report = cli("report", "--db", str(db), "--out", str(tmp_path / "r"), timeout=600)
    assert report.returncode == 0, report.stderr
    assert _digest(db) == before  # read as it is

    resumed = cli("resume", "--db", str(db), "--quiet")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "migrated" in resumed.stderr and "schema version 1 to 2" in resumed.stderr
    assert trial_states(db) == {"completed": 3}
    assert optuna_states(db).get("COMPLETE") == 3
    assert query(db, "SELECT value FROM rbm_meta WHERE key = 'schema_version'") == [("2",)]


def test_nothing_answering_at_the_address_is_one_line_and_writes_nothing(tmp_path):
    config = write_config(tmp_path)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    message = _one_line(cli("launch", str(config), "--db", str(tmp_path / "s.db"), "--address", f"127.0.0.1:{port}"))
    assert f"nothing answers at 127.0.0.1:{port}" in message and "ray start --head" in message
    assert not (tmp_path / "s.db").exists()


# Own network and process namespaces: the head is reachable from nowhere else, and `ray stop` there
# sees only its own processes.
_UNSHARE = ["unshare", "--net", "--pid", "--fork", "--mount-proc"]


def _netns_available() -> bool:
    try:
        return subprocess.run([*_UNSHARE, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_PLAIN_HEAD = r"""
set -e
ip link set lo up
# A private network namespace with an address of its own: the machine a user types `ray start` on,
# reachable from nowhere else.
ip link add veth0 type veth peer name veth1
ip addr add 10.77.0.2/24 dev veth0
ip link set veth0 up; ip link set veth1 up
ip route add default via 10.77.0.1 dev veth0 onlink
export RAY_USAGE_STATS_ENABLED=0
"$BIN/ray" start --head --port 6399 --num-cpus 2 --include-dashboard=false --disable-usage-stats > head.log 2>&1
trap '"$BIN/ray" stop --force > /dev/null 2>&1' EXIT
for address in 127.0.0.1:6399 auto; do
  name="${address%%:*}"
  if ! "$PY" -m rbm_study launch tiny.yaml --db "study-$name.db" --address "$address" --quiet > "launch-$name.log" 2>&1
  then echo "launch with --address $address failed"; cat "launch-$name.log"; exit 1; fi
done
"""


@pytest.mark.slow
@needs_mnist()
@pytest.mark.skipif(not _netns_available(), reason="needs `unshare` (own network and process namespaces)")
def test_a_head_started_by_plain_ray_start_is_joined_through_loopback_and_auto(tmp_path):
    write_config(tmp_path, search={"num_samples": 1})
    bin_dir = Path(sys.executable).parent
    run = subprocess.run([*_UNSHARE, "bash", "-c", _PLAIN_HEAD], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={**env(), "BIN": str(bin_dir), "PY": sys.executable})
    assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "head.log").read_text()
    for host in ("127.0.0.1", "auto"):
        assert trial_states(tmp_path / f"study-{host}.db") == {"completed": 1}, host
