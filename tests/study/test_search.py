"""`study.search.reconcile`: Optuna's history after a driver stopped (fast: an SQLite file, no Ray)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from rbm_study.study.config import load_study_config
from rbm_study.study.search import INTERRUPTED_ATTR, REQUEUED_ATTR, StudySearch, optuna_storage, reconcile
from tests.study.conftest import write_config

GRID = [1, 2, 3, 4]


def _grid_study(tmp_path):
    config = write_config(tmp_path, search={"num_samples": 4, "sampler": "grid", "space": {"rbm.cd_k": GRID}})
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = load_study_config(str(config))
    return study, url, StudySearch(study, "grid", optuna_storage(url))


def _queued(trials: list[optuna.trial.FrozenTrial]) -> list[dict]:
    return [t.system_attrs["fixed_params"] for t in trials if t.state == TrialState.WAITING]


def _proposed(searcher: StudySearch, trial_id: str) -> int:
    return searcher.suggest(trial_id)["rbm.cd_k"]


def test_a_trial_stopped_before_it_started_runs_again_and_the_grid_keeps_every_point(tmp_path):
    """Tune asked Optuna for a trial, the driver was stopped before the trial reached the database:
    a resume proposes that point again, once, and the grid ends with each point exactly once."""
    study, url, searcher = _grid_study(tmp_path)
    first = _proposed(searcher, "a")
    searcher.tell("a", TrialState.COMPLETE, [-100.0])
    lost = _proposed(searcher, "b")  # RUNNING in Optuna, no row in our tables

    assert reconcile("grid", url, study, [], {}) == 1
    assert reconcile("grid", url, study, [], {}) == 0  # a second resume queues nothing more
    ot_study = optuna.load_study(study_name="grid", storage=url)
    stopped = ot_study.trials[1]
    assert stopped.state == TrialState.FAIL and stopped.system_attrs[INTERRUPTED_ATTR] is True
    assert _queued(ot_study.trials) == [{"rbm.cd_k": lost}]

    resumed = StudySearch(study, "grid", optuna_storage(url))
    rest = [_proposed(resumed, name) for name in ("c", "d", "e")]
    assert rest[0] == lost
    assert sorted([first, *rest]) == GRID


def test_a_resume_killed_while_requeueing_queues_the_point_once(tmp_path):
    """Killed after the enqueue, before the trial was failed: the next resume fails it and finds
    the queued copy instead of queueing a second one."""
    study, url, searcher = _grid_study(tmp_path)
    lost = _proposed(searcher, "a")
    ot_study = optuna.load_study(study_name="grid", storage=url)
    ot_study.enqueue_trial({"rbm.cd_k": lost})  # what the killed resume had done

    assert reconcile("grid", url, study, [], {}) == 0
    trials = optuna.load_study(study_name="grid", storage=url).trials
    assert trials[0].state == TrialState.FAIL and trials[0].system_attrs[REQUEUED_ATTR] is True
    assert _queued(trials) == [{"rbm.cd_k": lost}]
