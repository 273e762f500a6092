"""SIGKILL the driver mid-study, then `rbm-study resume`: real subprocesses, real Ray, one database
(an SQLite file, and a database on the tests' PostgreSQL server)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from rbm_study.core import labfiles
from rbm_study.core.config import LabConfig, validate
from rbm_study.core.data import load_mnist
from rbm_study.core.metrics import STAGES
from rbm_study.core.pipeline import LabResult, run_lab
from rbm_study.study.driver import ray_storage_path
from rbm_study.study.storage import StudyStorage, parse_db
from tests.study.conftest import (
    MNIST,
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
def test_sigkill_then_resume_finishes_exactly_num_samples(tmp_path, db):
    config = write_config(
        tmp_path,
        # Fine-tuning keeps each trial running for a few seconds after its first epoch rows: with
        # the tiny defaults a trial was mid-way for well under a second, and the poll could miss it.
        data={"subset": 4000, "val_size": 1000},
        rbm={"hidden_size": 25, "epochs": 3},
        finetune={"epochs": 40},
        search={"num_samples": 4, "max_concurrent": 2, "seed": 1,
                "space": {"rbm.cd_k": [1, 2], "rbm.learning_rate": {"type": "float", "low": 0.02, "high": 0.1,
                                                                     "log": True}}},
    )
    log = tmp_path / "launch.log"
    driver = start([sys.executable, "-m", "rbm_study", "launch", str(config), "--db", db.arg, "--name", "kill"], log)

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

    status = cli("status", "--db", db.arg)  # readable while nobody drives the study
    assert status.returncode == 0, status.stderr
    assert "status interrupted" in status.stdout
    assert "no driver since" in status.stdout and "run resume" in status.stdout

    # Two resumes started together on the orphaned study: one takes it over, the other is refused.
    command = [sys.executable, "-m", "rbm_study", "resume", "--db", db.arg, "--quiet"]
    resumes = [start(command, tmp_path / f"resume{i}.log") for i in range(2)]
    codes = [r.wait(timeout=600) for r in resumes]
    logs = [(tmp_path / f"resume{i}.log").read_text() for i in range(2)]
    assert sorted(codes) == [0, 2], logs
    refused = logs[codes.index(2)].strip().splitlines()
    assert len(refused) == 1 and "already has a live driver on" in refused[0], refused
    assert "taking over from the driver" in logs[codes.index(0)]

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
    assert StudyStorage(db.arg, readonly=True).integrity_check() == "ok"

    # status, report and export on the finished study, read from the database alone
    as_json = cli("status", "--db", db.arg, "--json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert (document["status"], document["finished"], document["driver"]["alive"]) == ("completed", 4, False)
    report = cli("report", "--db", db.arg, "--out", str(tmp_path / "report"))
    assert report.returncode == 0 and (tmp_path / "report" / "index.html").is_file(), report.stderr
    exported = cli("export", "--db", db.arg, "--trial", "0", "--out", str(tmp_path / "lab"))
    assert exported.returncode == 0 and (tmp_path / "lab" / "zad1_rbm.th").is_file(), exported.stderr
    if db.server is not None:  # the URL's password is in no output, log or stored row
        texts = [status.stdout, status.stderr, *logs, log.read_text()]
        texts += [r.stdout + r.stderr for r in (as_json, report, exported)]
        texts += [(tmp_path / "report" / "report.md").read_text()]
        texts += [repr(row) for row in query(db, "SELECT config, code_version FROM rbm_studies")]
        assert all(db.server.password not in text for text in texts)
        ray_files = [f for f in ray_storage_path(parse_db(db.arg)).rglob("*") if f.is_file()]
        assert any(f.name == "tuner.pkl" for f in ray_files)  # Tune pickles the searcher and callbacks there
        assert all(db.server.password.encode() not in f.read_bytes() for f in ray_files)


def _reference_run(stored: dict) -> tuple[LabResult, dict[tuple[str, int, str], float]]:
    """The trial's stored config run uninterrupted in this process, as a trial runs it (one torch thread)."""
    lab = validate(LabConfig, stored)
    epochs: dict[tuple[str, int, str], float] = {}
    data = load_mnist(MNIST, "cpu", lab.data.val_size, lab.data.subset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # resources.cpus_per_trial, as study.trainable sets it
    try:
        result = run_lab(lab, data=data, on_epoch=lambda stage, epoch, m: epochs.update(
            {(stage, epoch, k): float(v) for k, v in m.items()}))
    finally:
        torch.set_num_threads(threads)
    return result, epochs


@pytest.mark.slow
@needs_mnist()
def test_sigkill_mid_trial_then_resume_carries_on_from_the_stage_checkpoint(tmp_path, db):
    config = write_config(
        tmp_path,
        # Fine-tuning is the slow stage (~6 s alone, more beside another trial): the driver is
        # killed after a trial's first checkpoint, well before that trial can finish.
        data={"subset": 8000, "val_size": 1000},
        finetune={"epochs": 60},
        search={"num_samples": 2, "max_concurrent": 2, "sampler": "grid", "space": {"rbm.cd_k": [1, 2]}},
    )
    log = tmp_path / "launch.log"
    driver = start([sys.executable, "-m", "rbm_study", "launch", str(config), "--db", db.arg, "--name", "ckpt"], log)

    def checkpointed() -> list[tuple]:
        return query(db, "SELECT t.number, c.stage FROM rbm_checkpoints c JOIN rbm_trials t ON t.id = c.trial_id "
                         "WHERE t.state = 'running'")

    try:
        wait_for(checkpointed, 240, "a stage checkpoint of a running trial", driver, log)
    finally:
        kill_group(driver)
    stage_at_kill = dict(query(db, "SELECT t.number, c.stage FROM rbm_checkpoints c JOIN rbm_trials t "
                                   "ON t.id = c.trial_id"))
    assert stage_at_kill
    rbm_rows_before = {n: query(db, "SELECT e.id, e.epoch, e.name, e.value FROM rbm_epoch_metrics e JOIN rbm_trials t "
                                    "ON t.id = e.trial_id WHERE t.number = ? AND e.stage = 'rbm' ORDER BY e.id", (n,))
                       for n in stage_at_kill}

    resumed = cli("resume", "--db", db.arg, "--quiet")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "carry on from their last stage checkpoint" in resumed.stdout

    assert trial_states(db) == {"completed": 2}
    assert [n for (n,) in query(db, "SELECT number FROM rbm_trials ORDER BY number")] == [0, 1]
    assert optuna_states(db).get("COMPLETE") == 2
    assert query(db, "SELECT COUNT(*) FROM rbm_checkpoints") == [(0,)]  # finished trials keep none
    storage = StudyStorage(db.arg, readonly=True)
    assert storage.integrity_check() == "ok"

    for t in storage.trials(storage.get_study("ckpt").id):
        finals = storage.final_metrics(t.id)
        expected = STAGES.index(stage_at_kill[t.number]) + 1 if t.number in stage_at_kill else 0
        assert finals["trial.resumed_after_stage"] == expected, (t.number, stage_at_kill)
        if not expected:
            continue
        assert t.attempt == 2
        # The epoch rows of the first attempt stayed (same rows, same values); none is stored twice.
        assert query(db, "SELECT id, epoch, name, value FROM rbm_epoch_metrics WHERE trial_id = ? "
                         "AND stage = 'rbm' ORDER BY id", (t.id,)) == rbm_rows_before[t.number]
        rows = storage.epoch_metrics(t.id)
        assert len(rows) == len({(s, e, n) for s, e, n, _ in rows})

        # Same weights, metrics and epoch curves as the same config run without interruption.
        [(config_json,)] = query(db, "SELECT config FROM rbm_trials WHERE id = ?", (t.id,))
        whole, whole_epochs = _reference_run(config_json if isinstance(config_json, dict) else json.loads(config_json))
        stored = storage.weights(t.id)
        assert set(stored) == set(whole.weight_files())
        for name, data in whole.weight_files().items():
            ours, theirs = labfiles.load_state(stored[name]), labfiles.load_state(data)
            assert set(ours) == set(theirs)
            for key in theirs:
                assert torch.equal(ours[key], theirs[key]), (t.number, name, key)
        assert {k: v for k, v in finals.items() if "seconds" not in k and not k.startswith("trial.")} == {
            k: v for k, v in whole.metrics.items() if "seconds" not in k}
        assert {(s, e, n): v for s, e, n, v in rows if n != "seconds"} == {
            k: v for k, v in whole_epochs.items() if k[2] != "seconds"}
