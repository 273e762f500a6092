"""One study trial as a Ray Tune function trainable: the three lab tasks through the shared core.

Runs wherever Ray places it (any node of a cluster) and never touches the database: everything
goes back to the driver as `study.messages.TrialMessage`s through `tune.report` (an epoch's metrics,
each stage checkpoint, the final metrics and weight files, or the error of a failed run).

`lab_epoch` counts epochs across the stages (rbm, then dbn, then finetune), whatever attempt
reports them: it is ASHA's time attribute, so the checkpoint and final results, which lack it,
never count as a step. The weight files and checkpoints are not Tune checkpoints, so a cluster
needs no shared filesystem: they go to the study's store on the head node and the result names
them (`study.checkpoints.send_blob`; large results must not wait on a node that may die), and the
driver fetches and stores them.

Stage checkpoints (`study.checkpoints`): before training, the trial asks the study's checkpoint
store for one of its config and, if there is one, carries on after that stage; it first sends the
epoch metrics of the stages the checkpoint holds again (same values, so the database keeps one
row each), and its final result says where it started: `trial.resumed_after_stage` 0 (from
scratch), 1 (after rbm) or 2 (after dbn). Each new checkpoint goes into the store at once, so a
retry after a worker death finds it, and to the driver, which writes it to the database.

Divergence (`core.pipeline` raises FloatingPointError for NaN weights or NaN metrics) and
user errors (MNIST missing on a node) are reported as a `failed` result instead of raised, because
raising would make Tune retry a trial that can only fail the same way; crashes and dead workers do
raise, and Tune retries those (bounded).
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any

from rbm_study.core.config import validate
from rbm_study.core.errors import UserError
from rbm_study.core.metrics import STAGES
from rbm_study.study.checkpoints import EpochRow, config_key, find_store, pack, send_blob, store_get, store_put, unpack
from rbm_study.study.config import StudyConfig
from rbm_study.study.messages import TrialMessage

NODE_ENV = "RBM_STUDY_NODE"  # optional human name of a node, set by docker/entrypoint.sh


def node_name() -> str:
    """Which Ray node runs this: its name if the entrypoint gave one, host and Ray node id."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    name = os.environ.get(NODE_ENV)
    base = f"{name}@{socket.gethostname()}" if name else socket.gethostname()
    return f"{base}/{node_id[:12]}"


def trial_params(config: dict[str, Any], searched: list[str]) -> dict[str, Any]:
    """The searched values out of a Tune trial config (Optuna's names are the dotted keys)."""
    return {key: config[key] for key in searched if key in config}


def run_trial(config: dict[str, Any], study_config: dict | None = None, searched: list[str] | None = None) -> None:
    """The function Tune calls. `config` holds the searched values under their dotted keys."""
    import torch
    from ray import tune

    from rbm_study.core.pipeline import LabCheckpoint, run_lab

    study = validate(StudyConfig, study_config or {})
    cpus = study.resources.cpus_per_trial
    # the most threads the trial uses: training epochs drop to one thread whenever that is faster,
    # e.g. while another process holds one of the cores (core.threads.AdaptiveThreads)
    torch.set_num_threads(max(1, int(cpus)))
    node = node_name()
    params = trial_params(config, searched or [])
    key: str | None = None
    epochs: list[EpochRow] = []  # every epoch so far, for the next checkpoint
    offsets: dict[str, int] = {}

    def on_epoch(stage: str, epoch: int, metrics: dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        epochs.append((stage, epoch, values))
        tune.report(TrialMessage("epoch", node, key, stage, epoch, offsets.get(stage, 0) + epoch, values).to_result())

    def on_checkpoint(checkpoint: LabCheckpoint) -> None:
        data = pack(checkpoint.to_bytes(), epochs)
        store_put(store, key, data)
        blob = send_blob(store, data, trial_id)
        tune.report(TrialMessage("checkpoint", node, key, stage=checkpoint.stage, blob=blob).to_result())

    store = find_store()
    trial_id = (tune.get_context().get_trial_id() or "") if store is not None else ""
    try:
        lab = study.lab_config(params)
        key = config_key(lab)
        for i, stage in enumerate(STAGES):
            offsets[stage] = sum(getattr(lab, s).epochs for s in STAGES[:i])
        resume_from = _resume_point(store_get(store, key))
        resumed_after = 0
        if resume_from is not None:
            resume_from, replay = resume_from
            resumed_after = STAGES.index(resume_from.stage) + 1
            for stage, epoch, values in replay:
                on_epoch(stage, epoch, values)
        result = run_lab(lab, on_epoch=on_epoch, resume_from=resume_from, on_checkpoint=on_checkpoint)
    except FloatingPointError as err:
        tune.report(TrialMessage("failed", node, key, error=f"diverged: {err}").to_result())
        return
    except UserError as err:
        tune.report(TrialMessage("failed", node, key, error=f"{type(err).__name__}: {err}").to_result())
        return
    except Exception:
        traceback.print_exc()
        raise
    metrics = {**result.metrics, "lab_seconds": result.seconds, "trial.resumed_after_stage": resumed_after}
    weights = send_blob(store, result.weight_files(), trial_id)
    tune.report(TrialMessage("final", node, key, metrics=metrics, blob=weights).to_result())


def _resume_point(data: bytes | None) -> tuple[Any, list[EpochRow]] | None:
    """(LabCheckpoint, epoch rows to send again) from the store's bytes, or None to start afresh."""
    from rbm_study.core.pipeline import LabCheckpoint

    if data is None:
        return None
    try:
        lab_bytes, replay = unpack(data)
        return LabCheckpoint.from_bytes(lab_bytes), replay
    except Exception as err:  # unreadable (e.g. written by another version): not worth failing for
        print(f"ignoring an unreadable stage checkpoint, starting from scratch: {err}", flush=True)
        return None
