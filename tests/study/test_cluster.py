"""The cluster path, with the script the containers run (docker/entrypoint.sh) on loopback:
a Ray head and a second Ray node as separate processes, the driver joining with --address."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.study.conftest import (
    REPO,
    env,
    kill_group,
    needs_mnist,
    query,
    start,
    trial_states,
    wait_for,
    write_config,
)

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
# Notice a dead node within seconds, not Ray's default half a minute.
FAST_HEALTH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    head: subprocess.Popen
    worker: subprocess.Popen
    logs: Path

    def node_env(self, name: str) -> dict[str, str]:
        return {"RAY_HEAD": self.address, "RAY_NODE_IP": "127.0.0.1", "RAY_NUM_CPUS": "1",
                "RBM_STUDY_NODE": name, "PYTHON": sys.executable, **FAST_HEALTH}

    def alive_nodes(self) -> int:
        out = subprocess.run(
            [sys.executable, "-c", "from rbm_study.study.internals import keep_loopback; keep_loopback(); import ray; "
             f"ray.init(address='{self.address}', _node_ip_address='127.0.0.1', logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))"],
            cwd=REPO, env=env(), capture_output=True, text=True, timeout=120,
        )
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("cluster")
    address = f"127.0.0.1:{free_port()}"
    c = Cluster(address, None, None, logs)  # type: ignore[arg-type]
    head_env = {**c.node_env("head"), "RAY_PORT": address.rsplit(":", 1)[1]}
    c.head = start(["bash", str(ENTRYPOINT), "head", "--object-store-memory", "150000000"], logs / "head.log",
                   head_env)
    try:
        wait_for(lambda: "Ray runtime started" in (logs / "head.log").read_text(), 120, "the head", c.head,
                 logs / "head.log")
        c.worker = start(["bash", str(ENTRYPOINT), "worker", "--object-store-memory", "150000000"],
                         logs / "worker.log", c.node_env("worker-1"))
        wait_for(lambda: c.alive_nodes() == 2, 120, "two live nodes", c.worker, logs / "worker.log")
        yield c
    finally:
        for proc in (c.worker, c.head):
            if proc is not None:
                kill_group(proc)


def drive(cluster: Cluster, tmp_path: Path, config: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    db, log = tmp_path / "study.db", tmp_path / f"{name}.log"
    proc = start(["bash", str(ENTRYPOINT), "driver", "launch", str(config), "--db", str(db), "--name", name],
                 log, {**cluster.node_env("driver"), "RBM_STUDY_DRIVER_NODE": "0"})
    return proc, db, log


@pytest.mark.slow
@needs_mnist()
def test_two_nodes_both_run_trials(cluster, tmp_path):
    config = write_config(tmp_path, search={"num_samples": 4, "space": {"rbm.cd_k": [1, 2]}})
    proc, db, log = drive(cluster, tmp_path, config, "two-nodes")
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert trial_states(db) == {"completed": 4}
    nodes = {n for (n,) in query(db, "SELECT node FROM rbm_trials")}
    assert len(nodes) == 2, nodes
    assert {n.split("@")[0] for n in nodes} == {"head", "worker-1"}


@pytest.mark.slow
@needs_mnist()
def test_worker_killed_mid_trial_is_retried_and_study_completes(cluster, tmp_path):
    """Runs after the two-node test: it takes the worker node down for good."""
    config = write_config(
        # Fine-tuning long enough (~10 s) to kill the worker after a trial there made its first
        # stage checkpoint and before the trial ends.
        tmp_path, data={"subset": 8000, "val_size": 1000}, finetune={"epochs": 60},
        search={"num_samples": 3, "space": {"rbm.cd_k": [1, 2]}}, resources={"max_failures": 2},
    )
    proc, db, log = drive(cluster, tmp_path, config, "worker-kill")

    def worker_checkpointed() -> list[tuple]:
        return query(db, "SELECT t.number FROM rbm_trials t JOIN rbm_checkpoints c ON c.trial_id = t.id "
                         "WHERE t.state = 'running' AND t.node LIKE 'worker-1@%'")

    try:
        wait_for(worker_checkpointed, 240, "a trial on the worker past its first stage", proc, log)
        kill_group(cluster.worker)  # SIGKILL the whole worker node: raylet, its workers, the trial
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert trial_states(db) == {"completed": 3}
    retried = query(db, "SELECT attempt, node FROM rbm_trials WHERE attempt > 1")
    assert retried and all(node.startswith("head@") for _, node in retried), retried
    assert query(db, "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'") == [(3,)]
    # The retry carried on from the checkpoint its first attempt had put in the store (on the head).
    resumed = query(db, "SELECT f.value FROM rbm_final_metrics f JOIN rbm_trials t ON t.id = f.trial_id "
                        "WHERE t.attempt > 1 AND f.name = 'trial.resumed_after_stage'")
    assert resumed and all(v >= 1 for (v,) in resumed), resumed
    assert query(db, "SELECT COUNT(*) FROM rbm_checkpoints") == [(0,)]
