"""Versioned steps that bring an older study database up to `schema.SCHEMA_VERSION`.

Optuna migrates its own tables with Alembic; ours change rarely, and a numbered list of plain steps
says the same in fewer moving parts. Step N takes a database from version N to N + 1 and is frozen:
it creates what version N + 1 added, written out here rather than taken from the current tables in
`study.schema` (which may change again later). `StudyStorage` applies the pending steps on its first
write, all of them and the new `rbm_meta.schema_version` in one transaction, and says so; readers
never migrate (`status` and `report` read an older database as it is).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Column, Connection, DateTime, ForeignKey, Integer, MetaData, String, Table, update

from rbm_study.study.schema import SCHEMA_VERSION, meta


def _add_driver_lease(connection: Connection) -> None:
    metadata = MetaData()
    Table("rbm_studies", metadata, Column("id", Integer, primary_key=True))  # the foreign key's target
    drivers = Table(
        "rbm_drivers", metadata,
        Column("study_id", Integer, ForeignKey("rbm_studies.id"), primary_key=True),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("started_at", DateTime, nullable=False),
        Column("heartbeat_at", DateTime, nullable=False),
        Column("token", String(32), nullable=True),
    )
    drivers.create(connection)


STEPS: dict[int, tuple[str, Callable[[Connection], None]]] = {
    1: ("the driver lease (table rbm_drivers)", _add_driver_lease),
}
"""from-version -> (what the next version adds, the step)."""


def upgrade(connection: Connection, found: int) -> list[str]:
    """Apply the steps from version `found` to SCHEMA_VERSION inside the caller's transaction;
    returns what each step added."""
    added = []
    for version in range(found, SCHEMA_VERSION):
        what, step = STEPS[version]
        step(connection)
        added.append(what)
    connection.execute(update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))
    return added
