"""A tiny study end to end through the real CLI: local Ray on loopback, one SQLite file."""

from __future__ import annotations

import os

import pytest

from rbm_study.core import labfiles
from rbm_study.study.storage import StudyStorage
from tests.study.conftest import MNIST, REPO, cli, needs_mnist, optuna_states, query, trial_states, write_config


@pytest.mark.slow
@needs_mnist()
def test_tiny_grid_study_records_everything(tmp_path):
    # A 2x2 grid; rbm.learning_rate 1e38 makes the weights overflow, so two trials diverge.
    # Two objectives at once, as configs/k_comparison.yaml has.
    config = write_config(
        tmp_path,
        search={"num_samples": 4, "sampler": "grid",
                "space": {"rbm.cd_k": [1, 2], "rbm.learning_rate": [0.05, 1e38]}},
        objective={"metric": ["final.val.log_likelihood", "rbm.val.recon_error"], "mode": ["max", "min"]},
    )
    db = tmp_path / "study.db"
    run = cli("launch", str(config), "--db", str(db), "--name", "tiny")
    assert run.returncode == 0, run.stdout + run.stderr

    assert trial_states(db) == {"completed": 2, "failed": 2}
    assert optuna_states(db) == {"COMPLETE": 2, "FAIL": 2}
    assert query(db, "SELECT COUNT(*) FROM trial_values") == [(4,)]  # 2 objectives x 2 completed
    assert query(db, "SELECT status, finished_at IS NOT NULL FROM rbm_studies") == [("completed", 1)]
    failed = query(db, "SELECT params, error FROM rbm_trials WHERE state = 'failed'")
    assert all("1e+38" in p and "diverged" in e for p, e in failed)

    storage = StudyStorage(db, readonly=True)
    study = storage.get_study("tiny")
    for t in storage.trials(study.id):
        if t.state != "completed":
            continue
        assert t.node and t.attempt == 1 and t.objective_value is not None
        finals = storage.final_metrics(t.id)
        assert finals["final.val.log_likelihood"] == pytest.approx(t.objective_value)
        assert {"rbm.val.log_likelihood", "dbn.test.log_likelihood", "finetune.val.recon_error"} <= set(finals)
        epochs = storage.epoch_metrics(t.id)
        assert {(s, e) for s, e, _, _ in epochs} == {("rbm", 1), ("rbm", 2), ("dbn", 1), ("finetune", 1)}
        files = storage.weights(t.id)
        assert set(files) == {"zad1_rbm.th", "zad2_dbn.th", "zad3_dbn_ft.th"}
        assert labfiles.load_state(files["zad1_rbm.th"])["rbm_w"].shape == (784, 25)
    assert storage.integrity_check() == "ok"

    status = cli("status", "--db", str(db))
    assert status.returncode == 0
    assert "4/4 finished (2 completed, 2 failed, 0 pruned)" in status.stdout
    assert "diverged" in status.stdout

    again = cli("resume", "--db", str(db))  # nothing left to do: no Ray, no new trials
    assert again.returncode == 0 and "complete" in again.stdout
    assert trial_states(db) == {"completed": 2, "failed": 2}


@pytest.mark.slow
@needs_mnist()
def test_a_relative_mnist_root_works_inside_ray(tmp_path):
    """The README runs `MNIST_ROOT=../shared/data rbm-study launch ...`; Ray's workers start elsewhere."""
    config = write_config(tmp_path, search={"num_samples": 1})
    relative = os.path.relpath(MNIST.resolve(), tmp_path)
    run = cli("launch", str(config), "--db", "study.db", cwd=tmp_path,
              extra_env={"MNIST_ROOT": relative, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert trial_states(tmp_path / "study.db") == {"completed": 1}


@pytest.mark.slow
@needs_mnist()
def test_the_lab_config_runs_as_a_study_of_one_trial(tmp_path):
    """configs/lab.yaml (no search section) is a study of one trial: the lab's own settings."""
    db = tmp_path / "lab.db"
    small = ["rbm.epochs=1", "dbn.epochs=1", "finetune.epochs=1", "data.subset=2000", "data.val_size=500",
             "eval.ais_betas=200", "eval.ais_chains=16", "eval.size=200", "eval.raise_images=5",
             "eval.raise_betas=200", "resources.num_cpus=2"]
    run = cli("launch", "configs/lab.yaml", "--db", str(db), *[a for s in small for a in ("--set", s)])
    assert run.returncode == 0, run.stdout + run.stderr
    assert trial_states(db) == {"completed": 1}
    files = {f for (f,) in query(db, "SELECT file_name FROM rbm_weights")}
    assert files == {"zad1_rbm.th", "zad2_dbn.th", "zad3_dbn_ft.th"}
    config = query(db, "SELECT config FROM rbm_trials")[0][0]
    assert '"cd_k": 1' in config and '"hidden_size": 100' in config  # the handout's settings, kept
