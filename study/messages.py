"""What a trial tells the driver: one typed message, built by the trainable, read by the callback.

A trial runs wherever Ray places it and never touches the database; everything it produces reaches
the driver as Tune results (`tune.report`), which must be flat dicts of plain values:

    epoch       after every training epoch: its metrics, the stage and epoch, `lab_epoch`
    checkpoint  after the rbm and dbn stages: the stage checkpoint (a blob reference)
    final       at the end: final metrics and the lab's weight files (a blob reference)
    failed      a diverged run or bad input on the node, with the error

`TrialMessage.to_result` flattens a message into a Tune result and `from_result` reads it back, so
the field names live here only. An epoch result also carries its metrics at the top level, bare and
stage-prefixed (`val_recon_error`, `rbm.val_recon_error`), because Tune's schedulers (ASHA) look
metrics up there; `lab_epoch` counts epochs across the stages and is ASHA's time attribute (only
epoch results carry it, so checkpoints and final results are never a step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("epoch", "checkpoint", "final", "failed")
_PREFIX = "rbm_study."  # every field of ours, so none collides with what Tune adds to a result


@dataclass
class TrialMessage:
    kind: str
    node: str = ""
    config_key: str | None = None
    stage: str | None = None
    epoch: int | None = None
    lab_epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # epoch: that epoch's; final: dotted names
    blob: Any = None  # checkpoint bytes or {file name: bytes}, or a store reference to them
    error: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown trial message kind {self.kind!r}")

    def to_result(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            f"{_PREFIX}kind": self.kind, f"{_PREFIX}node": self.node, f"{_PREFIX}config_key": self.config_key,
            f"{_PREFIX}stage": self.stage, f"{_PREFIX}epoch": self.epoch, f"{_PREFIX}blob": self.blob,
            f"{_PREFIX}error": self.error,
            f"{_PREFIX}metrics": sorted(self.metrics),
        }
        result.update({f"{_PREFIX}m.{name}": float(value) for name, value in self.metrics.items()})
        if self.kind == "epoch":
            result["lab_epoch"] = self.lab_epoch
            result.update({name: float(value) for name, value in self.metrics.items()})
            result.update({f"{self.stage}.{name}": float(value) for name, value in self.metrics.items()})
        return result

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> TrialMessage | None:
        """The message in a Tune result, or None for a result that carries none."""
        kind = result.get(f"{_PREFIX}kind")
        if kind not in KINDS:
            return None
        names = result.get(f"{_PREFIX}metrics") or []
        return cls(
            kind=kind,
            node=result.get(f"{_PREFIX}node") or "",
            config_key=result.get(f"{_PREFIX}config_key"),
            stage=result.get(f"{_PREFIX}stage"),
            epoch=result.get(f"{_PREFIX}epoch"),
            lab_epoch=result.get("lab_epoch"),
            metrics={name: float(result[f"{_PREFIX}m.{name}"]) for name in names if f"{_PREFIX}m.{name}" in result},
            blob=result.get(f"{_PREFIX}blob"),
            error=result.get(f"{_PREFIX}error"),
        )

    @staticmethod
    def drop_blob(result: dict[str, Any]) -> None:
        """Forget the blob reference in Tune's copy of a result (Tune keeps the last result of every
        trial in its experiment state; the driver has taken what it needs)."""
        result.pop(f"{_PREFIX}blob", None)
