"""`analysis.overview`: what the report ranks agrees with what `rbm-study status` says (fast, no data)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pandas as pd
import pytest

from rbm_study.analysis import overview
from rbm_study.study.progress import best_trial
from rbm_study.study.storage import StudyInfo, TrialInfo

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _trial(number: int, value: float | None, state: str = "completed") -> TrialInfo:
    return TrialInfo(id=10 + number, number=number, ray_trial_id=None, optuna_trial_number=number,
                     params={"rbm.cd_k": number + 1}, state=state, node=None, attempt=1, objective_value=value,
                     error=None, started_at=NOW, finished_at=NOW, config={"rbm": {"cd_k": number + 1}, "seed": 0})


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_status_and_the_report_name_the_same_best_trial_when_objectives_tie(mode: str, order: list[int]):
    """Trials 1 and 3 tie for the best value (equal configs do, e.g. a grid point run twice): both
    commands name trial 1, however the rows come out of the database."""
    best, worse = (-99.0, -120.0) if mode == "max" else (1.0, 5.0)
    values = {0: worse, 1: best, 2: None, 3: best}
    trials = [_trial(n, values[n], "completed" if values[n] is not None else "failed") for n in order]
    study = StudyInfo(id=1, name="s", config={}, status="completed", num_samples=4,
                      objective_metric="final.val.log_likelihood", objective_mode=mode, code_version="x",
                      created_at=NOW, updated_at=NOW, finished_at=NOW)
    table = overview.trials_table(pd.DataFrame([dataclasses.asdict(t) for t in trials]),
                                  pd.DataFrame(columns=["trial_id", "name", "value"]))

    assert best_trial(study, trials).number == 1
    assert list(overview.ranked(table, mode)["number"]) == [1, 3, 0]
    assert list(overview.best_trials(table, mode, n=2)["number"]) == [1, 3]
