"""The schema of a study database, SQLite or PostgreSQL (SQLAlchemy Core tables), and nothing else.

One file holds everything a study produces, so that a report needs only the `.db`:

    rbm_meta            key/value: the schema version and the application's name
    rbm_studies         one row a study: name, full config (JSON), status, times, code version
    rbm_trials          one row a trial: params, full config, state, node, times, error, objective
    rbm_epoch_metrics   long format: (trial, stage, epoch, name) -> value, one row a metric
    rbm_final_metrics   long format: (trial, name) -> value, e.g. 'rbm.test.log_likelihood'
    rbm_weights         the lab's weight files of a finished trial, as torch.save bytes
    rbm_checkpoints     the last stage checkpoint of a trial that has not finished (at most one a
                        trial, deleted when it finishes): what an interrupted or retried trial
                        resumes from, keyed for lookup by its config key (`study.checkpoints`)
    rbm_drivers         the study's driver lease (schema version 2): who drives it (host, pid,
                        start), its heartbeat, and a token that is NULL once released

Optuna's own tables (`studies`, `trials`, ...) live in the same file, which is why ours carry the
`rbm_` prefix. Every other module talks to the database through `study.storage`; only the driver
process that holds the study's lease writes. A change to these tables raises SCHEMA_VERSION and adds
a step to `study.migrations`.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

SCHEMA_VERSION = 2
APP_NAME = "rbm-study"

# States a trial moves through; 'interrupted' marks a trial that was running when its driver died.
TRIAL_STATES = ("running", "completed", "failed", "pruned", "interrupted")
STUDY_STATES = ("running", "completed", "failed", "interrupted")

# Core tables, not ORM classes: every caller gets frozen records from `study.storage` anyway, and
# `status` must start fast (the ORM's import and mapping cost more than the command's own work).
metadata = MetaData()


def _required(name: str, *args: object, **kwargs: object) -> Column:
    """A NOT NULL column (Core's columns are nullable unless told otherwise)."""
    return Column(name, *args, nullable=False, **kwargs)


meta = Table(
    "rbm_meta", metadata,
    Column("key", String(64), primary_key=True),
    _required("value", Text),
)

studies = Table(
    "rbm_studies", metadata,
    Column("id", Integer, primary_key=True),
    _required("name", String(200), unique=True),
    _required("config", JSON),
    _required("status", String(16), default="running"),
    _required("num_samples", Integer),
    _required("objective_metric", String(200)),
    # "max" or, multi-objective, "max,min,...": SQLite ignores a length, PostgreSQL enforces it
    _required("objective_mode", String(200)),
    _required("code_version", String(100)),
    _required("created_at", DateTime),
    _required("updated_at", DateTime),
    Column("finished_at", DateTime),
)

trials = Table(
    "rbm_trials", metadata,
    Column("id", Integer, primary_key=True),
    _required("study_id", ForeignKey("rbm_studies.id")),
    _required("number", Integer),  # 0, 1, ... within the study, in order of start
    Column("ray_trial_id", String(64)),
    Column("optuna_trial_number", Integer),
    _required("params", JSON),  # the searched values only, dotted keys
    _required("config", JSON),  # the full config the trial ran with
    _required("state", String(16), default="running"),
    Column("node", String(200)),
    _required("attempt", Integer, default=1),
    Column("objective_value", Float),
    Column("error", Text),
    _required("started_at", DateTime),
    Column("finished_at", DateTime),
    UniqueConstraint("study_id", "number"),
)

epoch_metrics = Table(
    "rbm_epoch_metrics", metadata,
    Column("id", Integer, primary_key=True),
    _required("trial_id", ForeignKey("rbm_trials.id"), index=True),
    _required("stage", String(16)),  # rbm, dbn, finetune
    _required("epoch", Integer),  # from 1
    _required("name", String(100)),
    _required("value", Float),
    UniqueConstraint("trial_id", "stage", "epoch", "name"),
)

final_metrics = Table(
    "rbm_final_metrics", metadata,
    Column("trial_id", ForeignKey("rbm_trials.id"), primary_key=True),
    Column("name", String(200), primary_key=True),
    _required("value", Float),
)

weights = Table(
    "rbm_weights", metadata,
    Column("trial_id", ForeignKey("rbm_trials.id"), primary_key=True),
    Column("file_name", String(64), primary_key=True),  # zad1_rbm.th, ...
    _required("data", LargeBinary),
)

checkpoints = Table(
    "rbm_checkpoints", metadata,
    Column("trial_id", ForeignKey("rbm_trials.id"), primary_key=True),
    _required("stage", String(16)),  # the last finished stage: rbm or dbn
    _required("config_key", String(64), index=True),  # sha256 hex, study.checkpoints.config_key
    _required("data", LargeBinary),  # study.checkpoints.pack: epoch rows + LabCheckpoint bytes
    _required("created_at", DateTime),
)

# The lease of a study's one live driver: taken by `launch`/`resume`, renewed by a heartbeat,
# released (token NULL) on a clean stop. A driver is alive while its heartbeat is fresh and, on its
# own host, its pid runs (`study.lease`).
drivers = Table(
    "rbm_drivers", metadata,
    Column("study_id", ForeignKey("rbm_studies.id"), primary_key=True),
    _required("host", String(255)),
    _required("pid", Integer),
    _required("started_at", DateTime),
    _required("heartbeat_at", DateTime),
    Column("token", String(32)),  # NULL: released
)
