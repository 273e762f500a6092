"""What the report reads: one consistent, read-only snapshot of a study database, as DataFrames.

Everything comes through `study.storage` (`storage.snapshot`: a private copy made in one read
transaction, of a file or of a server's database, so a running study can be reported on and its
database is never written), and the same
schema-version policy holds as for every other command: an older database is read as it is, a
newer or foreign one is refused with one line. Here the records become pandas DataFrames, the
shape the figures and tables want.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rbm_study.core.errors import UserError
from rbm_study.study.storage import StudyStorage, parse_db, snapshot


@dataclass
class Snapshot:
    """Everything the report reads, from one consistent state of the database."""

    path: str  # the database as messages name it: a file path, or a URL with its password hidden
    storage: StudyStorage  # read-only, on the private copy
    meta: dict[str, str]
    studies: pd.DataFrame
    trials: pd.DataFrame  # one row a trial of every study; params and config as dicts
    epoch_metrics: pd.DataFrame  # trial_id, stage, epoch, name, value
    final_metrics: pd.DataFrame  # trial_id, name, value
    weight_index: pd.DataFrame  # trial_id, file_name, bytes
    optuna_tables: bool
    _exit: ExitStack = field(repr=False, default_factory=ExitStack)

    @property
    def copy(self) -> Path:
        return Path(self.storage.path or "")

    # --- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- selection --------------------------------------------------------------------------
    def study(self, name: str | None = None) -> pd.Series:
        """The study row by name, or the only study in the file."""
        if self.studies.empty:
            raise UserError(f"{self.path} holds no study yet")
        if name is not None:
            match = self.studies[self.studies["name"] == name]
            if match.empty:
                known = ", ".join(self.studies["name"])
                raise UserError(f"no study named {name!r} in {self.path}; studies there: {known}")
            return match.iloc[0]
        if len(self.studies) > 1:
            known = ", ".join(self.studies["name"])
            raise UserError(f"{self.path} holds {len(self.studies)} studies; pick one with --name ({known})")
        return self.studies.iloc[0]

    def trial(self, study_id: int, number: int) -> pd.Series:
        """Trial `number` of a study (its number as `status` and the report show it)."""
        match = self.trials[(self.trials["study_id"] == study_id) & (self.trials["number"] == number)]
        if match.empty:
            known = ", ".join(str(n) for n in self.trials[self.trials["study_id"] == study_id]["number"])
            raise UserError(f"no trial {number} in this study; its trials are numbered {known or '(none yet)'}")
        return match.iloc[0]

    def study_trials(self, study_id: int) -> pd.DataFrame:
        return self.trials[self.trials["study_id"] == study_id].reset_index(drop=True)

    def weights(self, trial_id: int) -> dict[str, bytes]:
        """The lab files of a trial (by its database row id), by file name."""
        return self.storage.weights(int(trial_id))

    def optuna_study(self, name: str) -> Any:
        """Optuna's study of that name from the snapshot, or None when the file has none."""
        if not self.optuna_tables:
            return None
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            return optuna.load_study(study_name=name, storage=self.storage.url)
        except KeyError:
            return None


_TRIAL_COLUMNS = ["id", "study_id", "number", "ray_trial_id", "optuna_trial_number", "params", "config", "state",
                  "node", "attempt", "objective_value", "error", "started_at", "finished_at"]


def open_snapshot(db: str | Path, name: str | None = None) -> Snapshot:
    """Snapshot the database `db` (a path or a URL) and read it into DataFrames; UserError for a
    missing or foreign database. `name`: the study the report is about (a server's snapshot holds
    the rows of that study only; with no name, of the only one)."""
    target = parse_db(db)
    exit_stack = ExitStack()
    try:
        storage = exit_stack.enter_context(snapshot(target, name))
        studies = storage.studies()
        trials, finals, epochs, weights = [], [], [], []
        for study in studies:
            trials += [{**asdict(t), "params": t.params or {}, "config": t.config or {}}
                       for t in storage.trials(study.id)]
            finals += storage.final_metric_rows(study.id)
            epochs += storage.epoch_metric_rows(study.id)
            weights += storage.weight_sizes(study.id)
        trial_frame = pd.DataFrame(trials, columns=[*_TRIAL_COLUMNS, "last_stage", "last_epoch"])[_TRIAL_COLUMNS]
        for column in ("started_at", "finished_at"):
            trial_frame[column] = pd.to_datetime(trial_frame[column], errors="coerce")
        return Snapshot(
            path=target.display,
            storage=storage,
            meta=storage.meta(),
            studies=pd.DataFrame([asdict(s) for s in studies], columns=[
                "id", "name", "config", "status", "num_samples", "objective_metric", "objective_mode", "code_version",
                "created_at", "updated_at", "finished_at"]),
            trials=trial_frame.sort_values(["study_id", "number"]).reset_index(drop=True),
            epoch_metrics=pd.DataFrame(epochs, columns=["trial_id", "stage", "epoch", "name", "value"]),
            final_metrics=pd.DataFrame(finals, columns=["trial_id", "name", "value"]),
            weight_index=pd.DataFrame(weights, columns=["trial_id", "file_name", "bytes"]),
            optuna_tables=storage.has_optuna_tables(),
            _exit=exit_stack,
        )
    except BaseException:
        exit_stack.close()
        raise
