"""Build a small but real study database for the analysis tests, without Ray.

Tiny models are really trained with `core.pipeline.run_lab` (k in {1, 2} x seeds {0, 1}), and
their metrics and weight files are written through `study.storage`, the study service's own
writer; a matching Optuna study lives in the same file. Also usable
by hand: `python -m tests.analysis.builddb OUT.db`.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import optuna
from rbm_study.core.config import load_config
from rbm_study.study.storage import StudyStorage

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


def train_all(ks=(1, 2), seeds=(0, 1), mnist_root: str | None = None) -> list[dict]:
    """Run the lab for each (k, seed); returns dicts with params, config, metrics, epochs, weights."""
    from rbm_study.core.data import load_mnist
    from rbm_study.core.pipeline import run_lab

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
    objectives: tuple[str, ...] = (OBJECTIVE,),
) -> None:
    """Write one study into the file at `path` (created if missing) the way the driver does:
    our rows through `study.storage.StudyStorage`, Optuna's through Optuna, in the same file.

    `extra_states`: (state, error) of trials without results appended after the runs, e.g.
    ("failed", "FloatingPointError: ...") or ("running", None). `objectives`: maximised, as the
    study service stores several (comma-separated, the first is the trial's objective value).
    """
    storage = StudyStorage(path, create=True)  # ours first: Optuna's tables alone make a foreign file
    config = runs[0]["config"] if runs else load_config(None, TINY)
    search = {"rbm.cd_k": [1, 2], "seed": [0, 1]}
    info = storage.create_study(name, {"lab": config, "search": search}, len(runs) + len(extra_states),
                                ",".join(objectives), ",".join("max" for _ in objectives), "test")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = optuna.create_study(storage=storage.url, study_name=name, directions=["maximize"] * len(objectives))
    distributions = {key: optuna.distributions.CategoricalDistribution(values) for key, values in search.items()}
    for run in runs:
        ostudy.add_trial(optuna.trial.create_trial(
            params=run["params"], distributions=distributions, values=[run["metrics"][o] for o in objectives],
            state=optuna.trial.TrialState.COMPLETE,
        ))
        trial = storage.start_trial(info.id, ray_trial_id=f"t{len(ostudy.trials) - 1}",
                                    optuna_trial_number=len(ostudy.trials) - 1, params=run["params"],
                                    config=run["config"])
        storage.set_trial_node(trial.id, "localhost")
        by_epoch: dict[tuple[str, int], dict[str, float]] = {}
        for stage, epoch, metric, value in run["epochs"]:
            by_epoch.setdefault((stage, epoch), {})[metric] = value
        for (stage, epoch), values in by_epoch.items():
            storage.add_epoch_metrics(trial.id, stage, epoch, values)
        storage.finish_trial(trial.id, "completed", objective_value=run["metrics"][objectives[0]],
                             final_metrics=run["metrics"], weights=run["weights"])
    for i, (state, error) in enumerate(extra_states):
        ostate = {"failed": optuna.trial.TrialState.FAIL, "pruned": optuna.trial.TrialState.PRUNED}.get(state)
        if ostate is not None:
            ostudy.add_trial(optuna.trial.create_trial(params={}, distributions={}, state=ostate))
        trial = storage.start_trial(info.id, ray_trial_id=f"extra{i}", optuna_trial_number=None,
                                    params={"rbm.cd_k": 25, "seed": 0}, config=config)
        storage.set_trial_node(trial.id, "localhost")
        if state != "running":
            storage.finish_trial(trial.id, state, error=error)
    if study_status != "running":
        storage.set_study_status(info.id, study_status)
    storage.close()


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
