"""One study trial as a Ray Tune function trainable: the three lab tasks through the shared core.

Runs wherever Ray places it (any node of a cluster) and never touches the database: everything
goes back to the driver through `tune.report`:

    per epoch   {"kind": "epoch", "stage", "epoch", "node", <metric>, "<stage>.<metric>", ...}
    at the end  {"kind": "final", "node", <final metrics, dotted names>, "weights": {file: bytes}}
    or          {"kind": "failed", "node", "error": "..."}   a diverged run or bad input

The weight files travel inside the final result, not as a Tune checkpoint, so a cluster needs no
shared filesystem: the bytes reach the driver over Ray's object transfer and the driver stores
them. Divergence (NaN weights) and user errors (MNIST missing on a node) are reported as a
`failed` result instead of raised, because raising would make Tune retry a trial that can only
fail the same way; crashes and dead workers do raise, and Tune retries those (bounded).
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any

from core.errors import UserError
from study.config import StudyConfig

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

    from core.pipeline import run_lab

    study = StudyConfig(study_config or {}, [])
    cpus = study.config.get("resources", {}).get("cpus_per_trial", 1)
    torch.set_num_threads(max(1, int(cpus)))
    node = node_name()
    params = trial_params(config, searched or [])

    def on_epoch(stage: str, epoch: int, metrics: dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        tune.report({
            "kind": "epoch", "stage": stage, "epoch": epoch, "node": node,
            **values, **{f"{stage}.{k}": v for k, v in values.items()},
        })

    try:
        lab = study.lab_config(params)
        result = run_lab(lab, on_epoch=on_epoch)
    except FloatingPointError as err:
        tune.report({"kind": "failed", "node": node, "error": f"diverged (NaN weights): {err}"})
        return
    except UserError as err:
        tune.report({"kind": "failed", "node": node, "error": f"{type(err).__name__}: {err}"})
        return
    except Exception:
        traceback.print_exc()
        raise
    tune.report({
        "kind": "final", "node": node, "lab_seconds": result.seconds,
        **{k: float(v) for k, v in result.metrics.items()},
        "weights": result.weight_files(),
    })



