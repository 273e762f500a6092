"""The schema of a study database, SQLite or PostgreSQL (SQLAlchemy 2 declarative models), and nothing else.

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

from datetime import datetime

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 2
APP_NAME = "rbm-study"

# States a trial moves through; 'interrupted' marks a trial that was running when its driver died.
TRIAL_STATES = ("running", "completed", "failed", "pruned", "interrupted")
STUDY_STATES = ("running", "completed", "failed", "interrupted")


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "rbm_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Study(Base):
    __tablename__ = "rbm_studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="running")
    num_samples: Mapped[int] = mapped_column(Integer)
    objective_metric: Mapped[str] = mapped_column(String(200))
    # "max" or, multi-objective, "max,min,...": SQLite ignores a length, PostgreSQL enforces it
    objective_mode: Mapped[str] = mapped_column(String(200))
    code_version: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    trials: Mapped[list[Trial]] = relationship(back_populates="study", cascade="all, delete-orphan")


class Trial(Base):
    __tablename__ = "rbm_trials"
    __table_args__ = (UniqueConstraint("study_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("rbm_studies.id"))
    number: Mapped[int] = mapped_column(Integer)  # 0, 1, ... within the study, in order of start
    ray_trial_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    optuna_trial_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    params: Mapped[dict] = mapped_column(JSON)  # the searched values only, dotted keys
    config: Mapped[dict] = mapped_column(JSON)  # the full config the trial ran with
    state: Mapped[str] = mapped_column(String(16), default="running")
    node: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    objective_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    study: Mapped[Study] = relationship(back_populates="trials")


class EpochMetric(Base):
    __tablename__ = "rbm_epoch_metrics"
    __table_args__ = (UniqueConstraint("trial_id", "stage", "epoch", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("rbm_trials.id"), index=True)
    stage: Mapped[str] = mapped_column(String(16))  # rbm, dbn, finetune
    epoch: Mapped[int] = mapped_column(Integer)  # from 1
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)


class FinalMetric(Base):
    __tablename__ = "rbm_final_metrics"
    trial_id: Mapped[int] = mapped_column(ForeignKey("rbm_trials.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[float] = mapped_column(Float)


class Weights(Base):
    __tablename__ = "rbm_weights"
    trial_id: Mapped[int] = mapped_column(ForeignKey("rbm_trials.id"), primary_key=True)
    file_name: Mapped[str] = mapped_column(String(64), primary_key=True)  # zad1_rbm.th, ...
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Checkpoint(Base):
    __tablename__ = "rbm_checkpoints"
    trial_id: Mapped[int] = mapped_column(ForeignKey("rbm_trials.id"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16))  # the last finished stage: rbm or dbn
    config_key: Mapped[str] = mapped_column(String(64), index=True)  # sha256 hex, study.checkpoints.config_key
    data: Mapped[bytes] = mapped_column(LargeBinary)  # study.checkpoints.pack: epoch rows + LabCheckpoint bytes
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Driver(Base):
    """The lease of a study's one live driver: taken by `launch`/`resume`, renewed by a heartbeat,
    released (token NULL) on a clean stop. A driver is alive while its heartbeat is fresh and, on
    its own host, its pid runs (`study.lease`)."""

    __tablename__ = "rbm_drivers"
    study_id: Mapped[int] = mapped_column(ForeignKey("rbm_studies.id"), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    token: Mapped[str | None] = mapped_column(String(32), nullable=True)  # NULL: released
