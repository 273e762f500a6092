"""SIGKILL the driver mid-study, then `rbm-study resume`: real subprocesses, real Ray, one file."""

from __future__ import annotations

import sys

import pytest

from tests.study.conftest import (
    cli,
    kill_group,
    needs_mnist,
    optuna_states,
    query,
    start,
    trial_states,
    wait_for,
    write_config,
)


@pytest.mark.slow
@needs_mnist()
def test_sigkill_then_resume_finishes_exactly_num_samples(tmp_path):
    config = write_config(
        tmp_path,
        rbm={"hidden_size": 25, "epochs": 3},
        search={"num_samples": 4, "max_concurrent": 2, "seed": 1,
                "space": {"rbm.cd_k": [1, 2], "rbm.learning_rate": {"type": "float", "low": 0.02, "high": 0.1,
                                                                     "log": True}}},
    )
    db, log = tmp_path / "study.db", tmp_path / "launch.log"
    driver = start([sys.executable, "-m", "study", "launch", str(config), "--db", str(db), "--name", "kill"], log)

    def one_done_one_midway() -> bool:
        states = trial_states(db)
        midway = query(db, "SELECT COUNT(DISTINCT e.trial_id) FROM rbm_epoch_metrics e JOIN rbm_trials t "
                           "ON t.id = e.trial_id WHERE t.state = 'running'")[0][0]
        return states.get("completed", 0) >= 1 and midway >= 1

    try:
        wait_for(one_done_one_midway, 240, "a completed trial and one mid-way", driver, log)
    finally:
        kill_group(driver)  # SIGKILL the driver and the Ray it started
    before = {n: (v, f) for n, v, f in query(
        db, "SELECT number, objective_value, finished_at FROM rbm_trials WHERE state = 'completed'")}
    assert trial_states(db).get("running", 0) >= 1  # the kill left trials 'running' in the file

    status = cli("status", "--db", str(db))  # readable while nobody drives the study
    assert status.returncode == 0 and "running" in status.stdout

    resumed = cli("resume", "--db", str(db), "--quiet")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    assert trial_states(db) == {"completed": 4}
    numbers = [n for (n,) in query(db, "SELECT number FROM rbm_trials ORDER BY number")]
    assert numbers == [0, 1, 2, 3]
    after = {n: (v, f) for n, v, f in query(
        db, "SELECT number, objective_value, finished_at FROM rbm_trials WHERE state = 'completed'")}
    assert all(after[n] == before[n] for n in before)  # completed trials were not run again
    rerun = query(db, "SELECT attempt FROM rbm_trials WHERE attempt > 1")
    assert rerun  # the interrupted trial(s) ran again in their own row

    ot = optuna_states(db)
    # Optuna: exactly 4 COMPLETE; every interrupted attempt (and any trial asked but not yet started
    # when the driver died) kept in the history as FAIL, tagged interrupted.
    assert ot["COMPLETE"] == 4 and ot.get("FAIL", 0) >= len(rerun) and set(ot) <= {"COMPLETE", "FAIL"}
    interrupted = query(db, "SELECT COUNT(*) FROM trial_system_attributes WHERE key = 'rbm_study_interrupted'")
    assert interrupted[0][0] == ot["FAIL"]
    assert query(db, "SELECT COUNT(DISTINCT trial_id) FROM rbm_weights") == [(4,)]
    assert query(db, "SELECT status FROM rbm_studies") == [("completed",)]
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
