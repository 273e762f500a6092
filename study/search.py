"""Optuna behind Ray Tune: samplers, distributions, and the order in which results are told.

Optuna's history lives in the study database (RDBStorage on the same SQLite file or PostgreSQL
database, study name = ours), so the dashboard and a resume see every trial Optuna ever proposed.

Why a subclass of Ray's `OptunaSearch`: Ray tells Optuna a trial's result *before* the Tune
callbacks run, so a driver killed between the two would leave a trial COMPLETE in Optuna but not
in our tables, and a resume would run it again: one trial counted twice. `StudySearch` defers the
tell; the database callback commits the trial first and then calls `tell`. After a crash the only
possible mismatch is the reverse (ours finished, Optuna's still RUNNING), which `reconcile` repairs
from the database. Intermediate values are not sent to Optuna: early stopping is ASHA's job and
the per-epoch results do not carry the final objective.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, GridSampler, RandomSampler, TPESampler
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from rbm_study.study import internals
from rbm_study.study.config import Param, StudyConfig
from rbm_study.study.storage import TrialInfo, optuna_engine_kwargs, without_password

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

INTERRUPTED_ATTR = "rbm_study_interrupted"
REQUEUED_ATTR = "rbm_study_requeued"  # an interrupted trial the database never saw, queued to run again


class _StudyGridSampler(GridSampler):
    """A grid sampler that never calls `study.stop()`: Tune, not Optuna, decides how many trials
    run, and `stop()` outside `Study.optimize` raises."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def distributions(params: list[Param]) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for p in params:
        if p.kind == "categorical":
            out[p.key] = CategoricalDistribution(list(p.values))
        elif p.kind == "int":
            out[p.key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[p.key] = FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)
    return out


def make_sampler(study: StudyConfig) -> BaseSampler:
    seed = study.search.seed
    if study.search.sampler == "grid":
        return _StudyGridSampler({p.key: p.grid_values() for p in study.params}, seed=seed)
    if study.search.sampler == "random":
        return RandomSampler(seed=seed)
    return TPESampler(seed=seed)


class _RDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage, pickled without the URL's password: Ray Tune writes the searcher (and
    with it this storage) into its experiment folder, and a password must never land on disk."""

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["url"] = without_password(state["url"])
        return state


def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    return _RDBStorage(url, engine_kwargs=optuna_engine_kwargs(url))


def _no_params(_trial: Any) -> None:
    """Define-by-run space of a study with nothing to search (a study of one config)."""
    return None


class StudySearch(OptunaSearch):
    """OptunaSearch whose tell happens when the database says so (see the module docstring)."""

    def __init__(self, study: StudyConfig, name: str, storage: optuna.storages.BaseStorage):
        metrics, modes = study.metrics, study.modes
        single = len(metrics) == 1
        super().__init__(
            space=distributions(study.params) or _no_params,
            metric=metrics[0] if single else metrics,
            mode=modes[0] if single else modes,
            sampler=make_sampler(study),
            study_name=name,
            storage=storage,
        )

    def optuna_number(self, trial_id: str) -> int | None:
        return internals.asked_number(self, trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None  # intermediate values come from the database callback (`report`)

    def report(self, trial_id: str, value: float, step: int) -> None:
        """An intermediate value of a running trial, for Optuna's dashboard."""
        ot_trial = internals.optuna_trial(self, trial_id)
        if ot_trial is None or not math.isfinite(value):
            return
        try:
            ot_trial.report(value, step)
        except Exception as err:  # e.g. a multi-objective study, where Optuna takes no intermediate values
            log.debug("optuna: no intermediate value for trial %s: %s", ot_trial.number, err)

    def set_user_attrs(self, trial_id: str, attrs: dict[str, Any]) -> None:
        """User attributes of a running trial (the dashboard's 'User Attributes')."""
        ot_trial = internals.optuna_trial(self, trial_id)
        if ot_trial is None:
            return
        for key, value in attrs.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # Optuna stores attributes as JSON, which has no inf or nan
            try:
                ot_trial.set_user_attr(key, value)
            except Exception as err:
                log.warning("optuna: could not set %s on trial %s: %s", key, ot_trial.number, err)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        return None  # told by `tell` once the database has the trial

    def tell(self, trial_id: str, state: TrialState, values: Sequence[float] | None = None) -> None:
        ot_trial = internals.optuna_trial(self, trial_id)
        if ot_trial is None:
            return
        _tell(internals.optuna_study(self), ot_trial.number, state, values)
        internals.mark_told(self, trial_id)

    # Tune pickles searchers into its experiment folder; we resume from the database instead.
    def save(self, checkpoint_path: str) -> None:
        return None

    def restore(self, checkpoint_path: str) -> None:
        return None


def _tell(ot_study: optuna.Study, number: int, state: TrialState, values: Sequence[float] | None) -> None:
    if state == TrialState.COMPLETE and (values is None or any(not math.isfinite(v) for v in values)):
        state, values = TrialState.FAIL, None
    try:
        ot_study.tell(number, list(values) if state == TrialState.COMPLETE else None, state=state,
                      skip_if_finished=True)
    except Exception as err:
        log.warning("optuna: could not record trial %s as %s: %s", number, state.name, err)


STATE_OF = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}


def objective_values(study: StudyConfig, final_metrics: dict[str, float]) -> list[float] | None:
    """The objective(s) of a finished trial, or None if one is missing or not finite."""
    values = [final_metrics.get(m) for m in study.metrics]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def reconcile(
    name: str, storage_url: str, study: StudyConfig, trials: list[TrialInfo], final_metrics: dict[int, dict]
) -> int:
    """Make Optuna's history agree with the database after a driver died; returns re-queued trials.

    - an Optuna trial still RUNNING whose database row finished: told what the row says;
    - any other RUNNING Optuna trial: FAIL, tagged interrupted (it stays in the history);
    - every `interrupted` row, and every interrupted Optuna trial the database never saw (asked
      by Tune, stopped before it started): its params are enqueued so the next ask proposes them
      again, unless a WAITING trial with those params is already queued (a resume killed early).
      Without the second kind a grid would lose its point: the grid sampler counts a FAIL as
      visited and, the grid used up, proposes a point twice.
    """
    ot_storage = optuna_storage(storage_url)
    try:
        ot_study = optuna.load_study(study_name=name, storage=ot_storage)
    except KeyError:
        return 0  # the driver died before Optuna's study was created: nothing to repair
    by_number = {t.optuna_trial_number: t for t in trials if t.optuna_trial_number is not None}
    study_id = ot_storage.get_study_id_from_name(name)
    waiting: list[dict] = []
    never_started: list[tuple[int, int, dict]] = []  # (Optuna's trial id, its number, params)
    for ot in ot_study.get_trials(deepcopy=False):
        if ot.state == TrialState.WAITING:
            waiting.append(ot.system_attrs.get("fixed_params", {}))
        if ot.state != TrialState.RUNNING:
            continue
        row = by_number.get(ot.number)
        if row is not None and row.state in STATE_OF:
            values = objective_values(study, final_metrics.get(row.id, {})) if row.state == "completed" else None
            _tell(ot_study, ot.number, STATE_OF[row.state], values)
            continue
        trial_id = ot_storage.get_trial_id_from_study_id_trial_number(study_id, ot.number)
        ot_storage.set_trial_system_attr(trial_id, INTERRUPTED_ATTR, True)
        if row is None and ot.params and not ot.system_attrs.get(REQUEUED_ATTR):
            never_started.append((trial_id, ot.number, ot.params))
        else:
            _tell(ot_study, ot.number, TrialState.FAIL, None)

    def requeue(params: dict) -> int:
        match = next((w for w in waiting if _same_params(params, w)), None)
        if match is not None:
            waiting.remove(match)  # each queued trial stands for one trial to run again
            return 0
        ot_study.enqueue_trial(params)
        return 1

    queued = sum(requeue(row.params) for row in trials if row.state == "interrupted" and row.params)
    for trial_id, number, params in never_started:
        queued += requeue(params)
        # Tagged, then failed, after the enqueue: a resume killed in between finds it still RUNNING,
        # and either its queued copy (WAITING) or the tag that says it has one.
        ot_storage.set_trial_system_attr(trial_id, REQUEUED_ATTR, True)
        _tell(ot_study, number, TrialState.FAIL, None)
    return queued


def _same_params(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    return all(
        math.isclose(a[k], b[k], rel_tol=1e-12) if isinstance(a[k], float) else a[k] == b[k] for k in a
    )
