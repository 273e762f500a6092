"""The driver's Tune callbacks: the one that writes the database (and tells Optuna), the live
display, and the stopper that ends a study whose lease was lost.

Tune calls these in the driver process only. Every event that matters becomes one transaction in
the database, and Optuna hears of a finished trial only after the database has it (see
`study.search`), so after any crash the database is ahead or equal, never behind.

What Optuna's dashboard shows of a trial (set while the trial runs, since Optuna freezes a finished
trial): intermediate values, the per-epoch `train_recon_error` at step `lab_epoch` (epochs counted
across the stages: the RBM's epochs 1..R, the second RBM's R+1..R+D, fine-tuning's after those),
and user attributes `rbm_study_trial` (the trial's number, as `status` and the report show it),
`node`, the final metrics by name, or `error` for a failed trial.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from optuna.trial import TrialState
from ray.tune import Callback, Stopper

from rbm_study.study.checkpoints import find_store, forget_blobs, receive_blob
from rbm_study.study.config import StudyConfig
from rbm_study.study.messages import TrialMessage
from rbm_study.study.progress import running_detail, summary_line
from rbm_study.study.search import StudySearch, objective_values
from rbm_study.study.storage import StudyInfo, StudyStorage
from rbm_study.study.trainable import trial_params

log = logging.getLogger(__name__)

INTERMEDIATE_METRIC = "train_recon_error"
"""The per-epoch metric each trial reports to Optuna as its intermediate value (every stage has it)."""
NUMBER_ATTR = "rbm_study_trial"


def _error_text(trial: Any) -> str:
    try:
        path = trial.error_file
        if path and Path(path).exists():
            text = Path(path).read_text(errors="replace").strip()
            if text:
                return text[-4000:]
    except Exception:
        pass
    try:
        return str(trial.get_error() or "trial failed")[-4000:]
    except Exception:
        return "trial failed (no error text from Ray)"


class DatabaseCallback(Callback):
    """Writes each trial's start, epochs, checkpoints and end to the database, then tells Optuna."""

    def __init__(self, storage: StudyStorage, info: StudyInfo, study: StudyConfig, searcher: StudySearch):
        self.storage, self.info, self.study, self.searcher = storage, info, study, searcher
        self.searched = [p.key for p in study.params]
        self.asha = study.search.scheduler == "asha"
        self.rows: dict[str, int] = {}  # Ray trial id -> database row id
        self.nodes: dict[str, str] = {}
        self.final: dict[str, TrialMessage] = {}  # the final/failed message, until the trial completes
        self.keys: dict[str, str] = {}  # Ray trial id -> config key (study.checkpoints)

    def _clear_store(self, trial_id: str) -> None:
        """Drop what a finished trial left in the store: blobs it sent but never reported, and its
        checkpoint, unless a trial with the same config is still under way (a retry of it may need
        it). By name: no actor handle here, since Tune pickles its callbacks. The store is a cache;
        the database decides."""
        forget_blobs(trial_id)
        key = self.keys.pop(trial_id, None)
        store = find_store() if key is not None and key not in self.keys.values() else None
        if store is not None:
            try:
                store.remove.remote(key)
            except Exception as err:
                log.warning("could not drop checkpoint %s from the store: %s", key[:12], err)

    def _finish(self, trial_id: str, state: str, optuna_state: TrialState, values: list[float] | None = None,
                **fields: Any) -> None:
        """The database row first, then Optuna's attributes and state."""
        row = self.storage.finish_trial(self.rows[trial_id], state, **fields)
        attrs: dict[str, Any] = dict(fields.get("final_metrics") or {})
        if fields.get("error"):
            attrs["error"] = str(fields["error"])[-2000:]
        self.searcher.set_user_attrs(trial_id, {NUMBER_ATTR: row.number, "state": state, **attrs})
        self.searcher.tell(trial_id, optuna_state, values)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = trial_params(trial.config, self.searched)
        row = self.storage.start_trial(
            self.info.id, ray_trial_id=trial.trial_id, optuna_trial_number=self.searcher.optuna_number(trial.trial_id),
            params=params, config=self.study.lab_config(params).to_dict(),
        )
        self.rows[trial.trial_id] = row.id
        self.nodes.pop(trial.trial_id, None)
        self.final.pop(trial.trial_id, None)
        self.searcher.set_user_attrs(trial.trial_id, {NUMBER_ATTR: row.number, "attempt": row.attempt})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = self.rows.get(trial.trial_id)
        message = TrialMessage.from_result(result)
        if row is None or message is None:
            return
        TrialMessage.drop_blob(result)  # Tune keeps the last result in its state: keep it small
        if message.node and self.nodes.get(trial.trial_id) != message.node:
            self.storage.set_trial_node(row, message.node)
            self.searcher.set_user_attrs(trial.trial_id, {"node": message.node})
            self.nodes[trial.trial_id] = message.node
        if message.config_key:
            self.keys[trial.trial_id] = message.config_key
        if message.kind == "checkpoint":
            data = receive_blob(message.blob)
            if isinstance(data, bytes) and data and message.stage and message.config_key:
                self.storage.save_checkpoint(row, message.stage, message.config_key, data)
        elif message.kind == "epoch":
            self.storage.add_epoch_metrics(row, str(message.stage), int(message.epoch or 0), message.metrics)
            value = message.metrics.get(INTERMEDIATE_METRIC)
            if value is not None and message.lab_epoch is not None:
                self.searcher.report(trial.trial_id, value, int(message.lab_epoch))
        else:  # final or failed: stored when the trial completes
            message.blob = receive_blob(message.blob)
            self.final[trial.trial_id] = message

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id not in self.rows:
            return
        message = self.final.pop(trial.trial_id, None)
        self._clear_store(trial.trial_id)  # finish_trial deletes its row in the database
        if message is None:
            if self.asha:
                self._finish(trial.trial_id, "pruned", TrialState.PRUNED)
            else:
                self._finish(trial.trial_id, "failed", TrialState.FAIL, error="the trial ended without a final result")
            return
        metrics = message.metrics
        if message.kind == "failed":
            self._finish(trial.trial_id, "failed", TrialState.FAIL, final_metrics=metrics, error=message.error)
            return
        weights = message.blob if isinstance(message.blob, dict) else {}
        if not weights:  # a completed trial without its files is no result
            error = "the weight files were lost on their way to the driver (see the log)"
            self._finish(trial.trial_id, "failed", TrialState.FAIL, final_metrics=metrics, error=error)
            return
        values = objective_values(self.study, metrics)
        if values is None:
            error = f"objective {', '.join(self.study.metrics)} missing or not finite in the final metrics"
            self._finish(trial.trial_id, "failed", TrialState.FAIL, final_metrics=metrics, weights=weights,
                         error=error)
            return
        self._finish(trial.trial_id, "completed", TrialState.COMPLETE, values, objective_value=values[0],
                     final_metrics=metrics, weights=weights)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        forget_blobs(trial.trial_id)  # the failed run's; the retry has not started yet

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id not in self.rows:
            return
        self.final.pop(trial.trial_id, None)
        self._clear_store(trial.trial_id)
        self._finish(trial.trial_id, "failed", TrialState.FAIL, error=_error_text(trial))


class ProgressCallback(Callback):
    """Prints a one-line summary (and each running trial's stage/epoch) at most every `every` s,
    and a line whenever a trial finishes; from the database, as `status` does."""

    def __init__(self, storage: StudyStorage, study: StudyInfo, every: float = 15.0, out: TextIO | None = None):
        self.storage, self.study, self.every = storage, study, every
        self.out = out or sys.stdout
        self._last = 0.0

    def _print(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        trials = self.storage.trials(self.study.id)
        detail = running_detail(self.study, trials)
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {summary_line(self.study, trials)}" + (f" | {detail}" if detail else ""),
              file=self.out, flush=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._print()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(force=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._print(force=True)


class LeaseLostStopper(Stopper):
    """Ends the whole experiment once another driver has taken the study (`study.lease.Lease.lost`)."""

    def __init__(self, lost: threading.Event | None = None):
        self.lost = lost or threading.Event()

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.lost.is_set()

    def stop_all(self) -> bool:
        return self.lost.is_set()

    def __reduce__(self) -> tuple:
        return (LeaseLostStopper, ())  # Tune pickles its stopper; the lease lives in this process only
