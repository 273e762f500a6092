"""What a study looks like to a person: `rbm-study status` and the live display of the driver.

Both read the database only (never Ray), so `status` in another terminal, the live display and a
report after the fact all say the same thing, and `status` works while the driver runs (WAL lets
readers in during writes) or after it died.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ray.tune import Callback
from rbm_study.study.storage import FINISHED_STATES, StudyInfo, StudyStorage, TrialInfo


def trial_epochs(study: StudyInfo, trial: TrialInfo) -> dict[str, int]:
    """Epochs per stage of one trial: the study's, unless the trial searched them."""
    config = study.config
    return {
        stage: int(trial.params.get(f"{stage}.epochs", config.get(stage, {}).get("epochs", 0)))
        for stage in ("rbm", "dbn", "finetune")
    }


def best_trial(study: StudyInfo, trials: list[TrialInfo]) -> TrialInfo | None:
    done = [t for t in trials if t.state == "completed" and t.objective_value is not None]
    if not done:
        return None
    sign = 1 if study.objective_mode.split(",")[0] == "max" else -1
    return max(done, key=lambda t: sign * t.objective_value)


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


def render_status(storage: StudyStorage, name: str | None) -> str:
    """The full status report of one study, from the database alone."""
    study = storage.get_study(name)
    trials = storage.trials(study.id)
    lines = [
        f"study {study.name} in {storage.path}",
        f"  status {study.status}; created {study.created_at:%Y-%m-%d %H:%M:%S} UTC, "
        f"last update {study.updated_at:%Y-%m-%d %H:%M:%S} UTC"
        + (f", finished {study.finished_at:%Y-%m-%d %H:%M:%S} UTC" if study.finished_at else ""),
        f"  objective {study.objective_metric} ({study.objective_mode}); sampler "
        f"{study.config['search']['sampler']}; code {study.code_version}",
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


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressCallback(Callback):
    """Prints a one-line summary (and each running trial's stage/epoch) at most every `every` s,
    and a line whenever a trial finishes."""

    def __init__(self, storage: StudyStorage, study: StudyInfo, every: float = 15.0, out: TextIO | None = None):
        self.storage, self.study, self.every = storage, study, every
        self.out = out or sys.stdout
        self._last = 0.0

    def _print(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        trials = self.storage.trials(self.study.id)
        running = [t for t in trials if t.state == "running"]
        detail = "; ".join(f"#{t.number} {_where(t, trial_epochs(self.study, t))}" for t in running)
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {summary_line(self.study, trials)}" + (f" | {detail}" if detail else ""),
              file=self.out, flush=True)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._print()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(force=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._print(force=True)
