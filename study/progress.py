"""What a study looks like to a person: `rbm-study status` and the live display of the driver.

Both read the database only (never Ray), so `status` in another terminal, the live display and a
report after the fact all say the same thing, and `status` works while the driver runs (WAL lets
readers in during writes) or after it died.
"""

from __future__ import annotations

from typing import Any

from rbm_study.core.metrics import STAGES
from rbm_study.study import lease
from rbm_study.study.storage import FINISHED_STATES, TRIAL_STATES, StudyInfo, StudyStorage, TrialInfo


def trial_epochs(study: StudyInfo, trial: TrialInfo) -> dict[str, int]:
    """Epochs per stage of one trial: the study's, unless the trial searched them.

    `status` reads the stored config as the mapping it is, without validating it into a
    `StudyConfig`: that would load pydantic and torch, and `status` must answer at once."""
    config = study.config
    return {
        stage: int(trial.params.get(f"{stage}.epochs", config.get(stage, {}).get("epochs", 0)))
        for stage in STAGES
    }


def rank_key(mode: str, objective: float, number: int) -> tuple[float, int]:
    """Sorting by this key puts the best trial first: the better objective under `mode` ("max" or
    "min"), and between equal objectives the lower trial number (equal configs tie, e.g. a grid
    point run twice). `status`, the live display and the report all rank by it, so they name the
    same best trial."""
    return (-objective if mode == "max" else objective, number)


def best_trial(study: StudyInfo, trials: list[TrialInfo]) -> TrialInfo | None:
    mode = study.objective_mode.split(",")[0]
    done = [t for t in trials if t.state == "completed" and t.objective_value is not None]
    return min(done, key=lambda t: rank_key(mode, t.objective_value, t.number), default=None)


def summary_line(study: StudyInfo, trials: list[TrialInfo]) -> str:
    counts = {s: sum(t.state == s for t in trials) for s in ("running", "completed", "failed", "pruned", "interrupted")}
    finished = sum(counts[s] for s in FINISHED_STATES)
    line = (
        f"{study.name}: {finished}/{study.num_samples} finished ({counts['completed']} completed, "
        f"{counts['failed']} failed, {counts['pruned']} pruned), {counts['running']} running"
    )
    if counts["interrupted"]:
        line += f", {counts['interrupted']} interrupted (will run again on resume)"
    best = best_trial(study, trials)
    if best is not None:
        line += f" | best {study.objective_metric.split(',')[0]} {best.objective_value:.4g} (trial {best.number})"
    return line


def _where(t: TrialInfo, epochs: dict[str, int]) -> str:
    if t.last_stage is None:
        return "starting"
    return f"{t.last_stage} epoch {t.last_epoch}/{epochs.get(t.last_stage, '?')}"


def running_detail(study: StudyInfo, trials: list[TrialInfo]) -> str:
    """'#3 rbm epoch 4/15; #4 starting' for the running trials."""
    return "; ".join(f"#{t.number} {_where(t, trial_epochs(study, t))}" for t in trials if t.state == "running")


def effective_status(study: StudyInfo, driver_alive: bool) -> str:
    """The study's status as a reader should take it: 'running' only while a driver lives."""
    return "interrupted" if study.status == "running" and not driver_alive else study.status


def render_status(storage: StudyStorage, name: str | None) -> str:
    """The full status report of one study, from the database alone."""
    study = storage.get_study(name)
    trials = storage.trials(study.id)
    driver = storage.driver(study.id)
    alive = lease.is_alive(driver)
    lines = [
        f"study {study.name} in {storage.display}",
        f"  status {effective_status(study, alive)}; created {study.created_at:%Y-%m-%d %H:%M:%S} UTC, "
        f"last update {study.updated_at:%Y-%m-%d %H:%M:%S} UTC"
        + (f", finished {study.finished_at:%Y-%m-%d %H:%M:%S} UTC" if study.finished_at else ""),
        f"  {lease.describe(driver, study.status)}",
        f"  objective {study.objective_metric} ({study.objective_mode}); sampler "
        f"{study.config.get('search', {}).get('sampler', 'tpe')}; code {study.code_version}",
        "  " + summary_line(study, trials),
    ]
    if trials:
        lines.append("")
        lines.append(f"  {'#':>3}  {'state':<11} {'objective':>11}  {'att':>3}  {'progress':<22} {'node':<28} params")
    for t in trials:
        epochs = trial_epochs(study, t)
        value = "" if t.objective_value is None else f"{t.objective_value:.4f}"
        progress = t.state if t.last_stage is None and t.state != "running" else _where(t, epochs)
        params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
        node = (t.node or "-")[:28]
        lines.append(f"  {t.number:>3}  {t.state:<11} {value:>11}  {t.attempt:>3}  {progress:<22} {node:<28} {params}")
        if t.error and t.state in ("failed", "interrupted"):
            lines.append(f"       {t.error.splitlines()[-1][:160] if t.error.strip() else t.error}")
    return "\n".join(lines)


def status_document(storage: StudyStorage, name: str | None) -> dict[str, Any]:
    """`status --json`: the same facts as `render_status`, for scripts and monitors."""
    study = storage.get_study(name)
    trials = storage.trials(study.id)
    driver = storage.driver(study.id)
    alive = lease.is_alive(driver)
    best = best_trial(study, trials)
    counts = {state: sum(t.state == state for t in trials) for state in TRIAL_STATES}
    return {
        "study": study.name,
        "database": storage.display,
        "schema_version": storage.schema_version,
        "status": effective_status(study, alive),
        "num_samples": study.num_samples,
        "finished": sum(counts[s] for s in FINISHED_STATES),
        "counts": counts,
        "objective": {"metric": study.objective_metric, "mode": study.objective_mode},
        "best": None if best is None else {"trial": best.number, "value": best.objective_value, "params": best.params},
        "driver": {
            "alive": alive,
            "host": driver.host if driver else None,
            "pid": driver.pid if driver else None,
            "heartbeat_age_s": round(lease.heartbeat_age(driver), 1) if driver else None,
            "heartbeat_timeout_s": lease.TIMEOUT_S,
            "summary": lease.describe(driver, study.status),
        },
        "trials": [
            {
                "trial": t.number, "state": t.state, "objective": t.objective_value, "attempt": t.attempt,
                "stage": t.last_stage, "epoch": t.last_epoch, "node": t.node, "params": t.params,
                "error": t.error.strip().splitlines()[-1] if t.error and t.error.strip() else None,
                "started_at": t.started_at.isoformat() + "Z",
                "finished_at": t.finished_at.isoformat() + "Z" if t.finished_at else None,
            }
            for t in trials
        ],
    }


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
