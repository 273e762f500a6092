"""Studies as Ray jobs: a loopback head with Ray's job server, started by the containers' script
(docker/entrypoint.sh head, dashboard on), and the commands of the README:

    ray job submit --address http://HEAD:8265 -- rbm-study launch CONFIG --db URL --address auto
    ray job stop --address http://HEAD:8265 JOB          (trials marked, lease released)
    ray job submit --address http://HEAD:8265 -- rbm-study resume --db URL --name NAME --address auto

on both backends (`db`). The job's driver is a process the job server starts on the head, with the
head's environment: nothing of the test's own process reaches it but the command line.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Database
from tests.study.conftest import (
    REPO,
    env,
    kill_group,
    needs_mnist,
    optuna_states,
    query,
    start,
    trial_states,
    wait_for,
    write_config,
)
from tests.study.test_cluster import free_port

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
BIN = Path(sys.executable).parent  # rbm-study and ray, as an activated venv puts them on PATH


@dataclass
class Head:
    url: str  # the job server (Ray's dashboard)
    proc: subprocess.Popen
    log: Path
    pgpass: Path  # the head's PGPASSFILE

    def db_arg(self, db: Database) -> str:
        """What a job's command line should carry for `db`: a PostgreSQL URL without its password
        (Ray keeps every job's command line and shows it in `ray job list` and the dashboard), the
        password in the head's password file, where libpq finds it."""
        if db.server is None:
            return db.arg
        self.pgpass.write_text(f"127.0.0.1:{db.server.port}:*:postgres:{db.server.password}\n")
        return db.arg.replace(f":{db.server.password}@", "@")

    def job(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray job COMMAND --address URL ARGS...`, as a user types it."""
        command, *rest = args
        return subprocess.run([str(BIN / "ray"), "job", command, "--address", self.url, *rest], cwd=REPO,
                              env=env(), capture_output=True, text=True, timeout=timeout)

    def status(self, job_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.url).get_job_status(job_id))

    def logs(self, job_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url).get_job_logs(job_id)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    logs = tmp_path_factory.mktemp("jobs")
    url = f"http://127.0.0.1:{free_port()}"
    pgpass = logs / "pgpass"
    pgpass.touch(mode=0o600)
    head_env = {"RAY_NODE_IP": "127.0.0.1", "RAY_NUM_CPUS": "2", "RAY_PORT": str(free_port()),
                "RAY_DASHBOARD": "true", "RBM_STUDY_NODE": "head", "PYTHON": sys.executable,
                "PATH": f"{BIN}:{env()['PATH']}", "PGPASSFILE": str(pgpass)}
    # every port of its own: another Ray on this machine (a local study's) holds the agent's default 52365,
    # and a head whose dashboard agent cannot bind has no agent to run jobs ("No available agent")
    proc = start(["bash", str(ENTRYPOINT), "head", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                  url.rsplit(":", 1)[1], "--dashboard-agent-listen-port", str(free_port()),
                  "--object-store-memory", "150000000"], logs / "head.log", head_env)
    try:
        wait_for(lambda: _answers(url), 180, "the head's job server", proc, logs / "head.log")
        yield Head(url, proc, logs / "head.log", pgpass)
    finally:
        kill_group(proc)


def _submit(head: Head, job_id: str, *command: str, wait: bool) -> subprocess.CompletedProcess:
    return head.job("submit", *([] if wait else ["--no-wait"]), "--submission-id", job_id, "--",
                    "rbm-study", *command, "--address", "auto", timeout=600)


@pytest.mark.slow
@needs_mnist()
def test_a_submitted_study_runs_on_the_cluster_into_the_database(head, db: Database, tmp_path):
    config = write_config(tmp_path)
    job = f"launch-{db.kind}"
    done = _submit(head, job, "launch", str(config), "--db", head.db_arg(db), "--name", "as-job", wait=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert head.status(job) == "SUCCEEDED"
    assert trial_states(db) == {"completed": 2}
    assert optuna_states(db) == {"COMPLETE": 2}
    assert {node.split("@")[0] for (node,) in query(db, "SELECT node FROM rbm_trials")} == {"head"}
    assert query(db, "SELECT status FROM rbm_studies") == [("completed",)]
    logs = head.logs(job)
    assert "cluster at 127.0.0.1:" in logs and "study completed" in logs
    if db.server is not None:
        assert db.server.password not in logs + done.stdout + done.stderr + head.job("list").stdout


@pytest.mark.slow
@needs_mnist()
def test_ray_job_stop_interrupts_cleanly_and_a_resume_job_finishes(head, db: Database, tmp_path):
    # trials long enough (fine-tuning) that one is surely running when the stop arrives
    config = write_config(tmp_path, finetune={"epochs": 300}, search={"num_samples": 3})
    job = f"stop-{db.kind}"
    db_arg = head.db_arg(db)
    submitted = _submit(head, job, "launch", str(config), "--db", db_arg, "--name", "stopped", wait=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    wait_for(lambda: trial_states(db).get("running", 0) >= 1, 300, "a running trial")

    stopped = head.job("stop", job, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert head.status(job) == "STOPPED"
    # Clean: what only the driver's own shutdown writes is there (a SIGKILL would leave the lease
    # held and the trials `running`).
    assert query(db, "SELECT token FROM rbm_drivers") == [(None,)]
    assert query(db, "SELECT status FROM rbm_studies") == [("interrupted",)]
    states = trial_states(db)
    assert states.get("running", 0) == 0 and states.get("interrupted", 0) >= 1, states

    resumed = _submit(head, f"resume-{db.kind}", "resume", "--db", db_arg, "--name", "stopped", wait=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "taking over" not in resumed.stdout  # the lease was handed back, not abandoned
    assert trial_states(db) == {"completed": 3}
    assert optuna_states(db).get("COMPLETE") == 3
    assert query(db, "SELECT status FROM rbm_studies") == [("completed",)]
