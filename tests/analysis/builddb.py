"""Build a small but real study database for the analysis tests, without Ray.

Tiny models are really trained with `core.pipeline.run_lab` (k in {1, 2} x seeds {0, 1}), and
their metrics and weight files are written with the SQLAlchemy models of `study/schema.py`, the
same rows the study service writes; a matching Optuna study lives in the same file. Also usable
by hand: `python -m tests.analysis.builddb OUT.db`.
"""

from __future__ import annotations

import copy
import sys
from datetime import datetime, timedelta
from pathlib import Path

import optuna
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from core.config import load_config
from study.schema import (
    APP_NAME,
    SCHEMA_VERSION,
    Base,
    EpochMetric,
    FinalMetric,
    Meta,
    Study,
    Trial,
    Weights,
)

TINY = [
    "data.subset=1000",
    "rbm.epochs=2",
    "dbn.epochs=1",
    "finetune.epochs=1",
    "eval.ais_betas=200",
    "eval.ais_chains=16",
    "eval.size=200",
    "rbm.hidden_size=17",  # exact log Z (<= 20 units) and a sampled DBN bound (> 16 units): fast
    "dbn.hidden_size=16",
    "device=cpu",
]
OBJECTIVE = "final.val.log_likelihood"
T0 = datetime(2026, 1, 1, 12, 0, 0)


def train_all(ks=(1, 2), seeds=(0, 1), mnist_root: str | None = None) -> list[dict]:
    """Run the lab for each (k, seed); returns dicts with params, config, metrics, epochs, weights."""
    from core.data import load_mnist
    from core.pipeline import run_lab

    base = load_config(None, TINY + ([f"data.root={mnist_root}"] if mnist_root else []))
    data = load_mnist(base["data"]["root"], "cpu", base["data"]["val_size"], base["data"]["subset"])
    runs = []
    for k in ks:
        for seed in seeds:
            config = copy.deepcopy(base)
            config["rbm"]["cd_k"], config["seed"] = k, seed
            epochs: list[tuple[str, int, str, float]] = []

            def on_epoch(stage, epoch, values, epochs=epochs):
                epochs.extend((stage, epoch, name, float(v)) for name, v in values.items())

            result = run_lab(config, on_epoch=on_epoch, data=data)
            runs.append({
                "params": {"rbm.cd_k": k, "seed": seed},
                "config": config,
                "metrics": dict(result.metrics),
                "epochs": epochs,
                "weights": result.weight_files(),
                "seconds": result.seconds,
            })
    return runs


def write_study(
    path: Path,
    name: str,
    runs: list[dict],
    extra_states: tuple[tuple[str, str | None], ...] = (),
    study_status: str = "completed",
) -> None:
    """Write one study (our tables and Optuna's) into the file at `path` (created if missing).

    `extra_states`: (state, error) of trials without results appended after the runs, e.g.
    ("failed", "FloatingPointError: ...") or ("running", None).
    """
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = optuna.create_study(storage=f"sqlite:///{path}", study_name=name, direction="maximize")
    distributions = {
        "rbm.cd_k": optuna.distributions.CategoricalDistribution(
            sorted({r["params"]["rbm.cd_k"] for r in runs} or {1})),
        "seed": optuna.distributions.CategoricalDistribution(sorted({r["params"]["seed"] for r in runs} or {0})),
    }
    config = runs[0]["config"] if runs else load_config(None, TINY)
    # Optuna's rows first: its storage opens its own connection to the same file
    for run in runs:
        ostudy.add_trial(optuna.trial.create_trial(
            params=run["params"], distributions=distributions, value=run["metrics"][OBJECTIVE],
            state=optuna.trial.TrialState.COMPLETE,
        ))
    for state, _ in extra_states:
        if state in ("failed", "pruned"):
            ostate = optuna.trial.TrialState.FAIL if state == "failed" else optuna.trial.TrialState.PRUNED
            ostudy.add_trial(optuna.trial.create_trial(params={}, distributions={}, state=ostate))
    with Session(engine) as session:
        if session.get(Meta, "schema_version") is None:
            session.add_all([Meta(key="schema_version", value=str(SCHEMA_VERSION)),
                             Meta(key="app", value=APP_NAME)])
        study = Study(
            name=name, config={"lab": config, "search": {"rbm.cd_k": [1, 2], "seed": [0, 1]}},
            status=study_status, num_samples=len(runs) + len(extra_states), objective_metric=OBJECTIVE,
            objective_mode="max", code_version="test", created_at=T0, updated_at=T0,
            finished_at=T0 + timedelta(hours=1) if study_status == "completed" else None,
        )
        session.add(study)
        session.flush()
        number = 0
        for run in runs:
            start = T0 + timedelta(minutes=number)
            trial = Trial(
                study_id=study.id, number=number, ray_trial_id=f"t{number}", optuna_trial_number=number,
                params=run["params"], config=run["config"], state="completed", node="localhost",
                objective_value=run["metrics"][OBJECTIVE], started_at=start,
                finished_at=start + timedelta(seconds=run["seconds"]),
            )
            session.add(trial)
            session.flush()
            session.add_all(EpochMetric(trial_id=trial.id, stage=s, epoch=e, name=n, value=v)
                            for s, e, n, v in run["epochs"])
            session.add_all(FinalMetric(trial_id=trial.id, name=n, value=float(v))
                            for n, v in run["metrics"].items())
            session.add_all(Weights(trial_id=trial.id, file_name=f, data=b) for f, b in run["weights"].items())
            number += 1
        for state, error in extra_states:
            start = T0 + timedelta(minutes=number)
            session.add(Trial(
                study_id=study.id, number=number, optuna_trial_number=None, params={"rbm.cd_k": 25, "seed": 0},
                config=config, state=state, node="localhost", objective_value=None, error=error,
                started_at=start, finished_at=None if state == "running" else start + timedelta(seconds=5),
            ))
            number += 1
        session.commit()
    engine.dispose()


if __name__ == "__main__":
    import pickle

    out = Path(sys.argv[1])
    out.unlink(missing_ok=True)
    cache = Path("/tmp/tiny_runs.pkl")
    if cache.exists():
        runs = pickle.loads(cache.read_bytes())
    else:
        runs = train_all()
        cache.write_bytes(pickle.dumps(runs))
    write_study(out, "tiny", runs, extra_states=(("failed", "FloatingPointError: diverged"),
                                                 ("pruned", "pruned at epoch 1: val_recon_error")))
    print(out)
