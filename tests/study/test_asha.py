"""Early stopping: with `search.scheduler: asha` poor trials are pruned, recorded as such, and counted."""

from __future__ import annotations

import pytest

from rbm_study.study.storage import StudyStorage
from tests.study.conftest import cli, needs_mnist, optuna_states, query, trial_states, write_config


@pytest.mark.slow
@needs_mnist()
def test_asha_prunes_the_poor_trials(tmp_path):
    # Good learning rates come first (grid order is fixed by the sampler's seed and checked below),
    # so the two trials at 1e-5 reach the first rung behind them and are stopped there. The two good
    # trials differ only in an evaluation setting, so they train alike and neither can fall behind
    # the other at a rung (with different seeds, whether the second survived was up to chance).
    config = write_config(
        tmp_path,
        rbm={"hidden_size": 25, "epochs": 4},
        search={"num_samples": 4, "sampler": "grid", "seed": 10, "max_concurrent": 1, "scheduler": "asha",
                "asha": {"metric": "val_recon_error", "mode": "min", "grace_period": 1, "reduction_factor": 2},
                "space": {"rbm.learning_rate": [0.1, 1e-5], "eval.ais_chains": [16, 17]}},
    )
    db = tmp_path / "study.db"
    run = cli("launch", str(config), "--db", str(db), "--name", "asha")
    assert run.returncode == 0, run.stdout + run.stderr
    order = [lr for (lr,) in query(db, "SELECT json_extract(params, '$.\"rbm.learning_rate\"') "
                                       "FROM rbm_trials ORDER BY number")]
    assert order[:2] == [0.1, 0.1], f"grid order changed ({order}); pick another search.seed"

    assert trial_states(db) == {"completed": 2, "pruned": 2}
    assert optuna_states(db) == {"COMPLETE": 2, "PRUNED": 2}
    storage = StudyStorage(db, readonly=True)
    for t in storage.trials(storage.get_study("asha").id):
        rbm_epochs = {e for s, e, _, _ in storage.epoch_metrics(t.id) if s == "rbm"}
        if t.state == "pruned":
            assert t.params["rbm.learning_rate"] == 1e-5 and max(rbm_epochs) < 4
            assert not storage.weights(t.id)
        else:
            assert t.params["rbm.learning_rate"] == 0.1 and rbm_epochs == {1, 2, 3, 4}
    assert "4/4 finished (2 completed, 0 failed, 2 pruned)" in cli("status", "--db", str(db)).stdout
