"""Build study databases for the analysis tests, without Ray.

`train_all`: tiny models really trained with `core.pipeline.run_lab` (k in {1, 2} x seeds {0, 1}).
`constructed_run`: a trial whose final and per-epoch metrics are given, not trained (no weights), so
a test can set the numbers the k-comparison must judge. Either kind is written by `write_study`
through `study.storage`, the study service's own writer; a matching Optuna study lives in the same
file. Also usable by hand: `python -m tests.analysis.builddb OUT.db`.
"""

from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path

import optuna

from rbm_study.core.config import load_config, set_dotted
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
    # RAISE and the likelihood curves on, at a cost the tiny runs can afford
    "eval.raise_images=40",
    "eval.raise_chains=4",
    "eval.raise_betas=200",
    "eval.curve_every=1",
    "eval.curve_chains=8",
    "eval.curve_betas=100",
    "eval.curve_images=100",
]
OBJECTIVE = "final.val.log_likelihood"


def train_all(ks=(1, 2), seeds=(0, 1), mnist_root: str | None = None) -> list[dict]:
    """Run the lab for each (k, seed); returns dicts with params, config, metrics, epochs, weights."""
    from rbm_study.core.data import load_mnist
    from rbm_study.core.pipeline import run_lab

    base = load_config(None, TINY + ([f"data.root={mnist_root}"] if mnist_root else []))
    data = load_mnist(base.data.root, "cpu", base.data.val_size, base.data.subset)
    runs = []
    for k in ks:
        for seed in seeds:
            config = base.with_values({"rbm.cd_k": k, "seed": seed})
            epochs: list[tuple[str, int, str, float]] = []

            def on_epoch(stage, epoch, values, epochs=epochs):
                epochs.extend((stage, epoch, name, float(v)) for name, v in values.items())

            result = run_lab(config, on_epoch=on_epoch, data=data)
            runs.append({
                "params": {"rbm.cd_k": k, "seed": seed},
                "config": config.to_dict(),
                "metrics": dict(result.metrics),
                "epochs": epochs,
                "weights": result.weight_files(),
                "seconds": result.seconds,
            })
    return runs


# The estimator settings a constructed trial reports (the shape of the metrics core.pipeline stores).
SETTINGS = {"eval.ais_chains": 100, "eval.ais_betas": 14_500, "eval.ais_repeats": 3, "eval.raise_chains": 10,
            "eval.raise_betas": 1_000, "eval.raise_images": 1_000}
_BASE_CONFIG: dict = {}


def constructed_run(
    k: int, seed: int, rbm: float | None, dbn: float | None = None, finetune: float | None = None, *,
    halfwidth: float = 0.5, stderr: float = 0.3, raise_gap: float | None = 0.8, dbn_raise_gap: float | None = None,
    recon: float = 23.7, seconds: float = 1.0, params: dict | None = None, curve: list[float] | None = None,
    curve_every: int = 5,
    drop: tuple[str, ...] = (), extra: dict[str, float] | None = None,
) -> dict:
    """A trial with the given test (and val) numbers, as `write_study` takes it.

    rbm, dbn, finetune: the AIS log-likelihood / bounds (None: not recorded); halfwidth: each side of
    AIS's interval; stderr: the test-set standard error; raise_gap: AIS minus RAISE for the RBM (None:
    no RAISE), stored as the pipeline does (the estimate, and the paired gap RAISE minus AIS);
    dbn_raise_gap: the same for both DBN stages (None: AIS's side only, as older code); curve:
    val_log_likelihood every `curve_every` epochs; params: other searched parameters
    (dotted lab keys, also set in the config); drop: metric names (or name endings such as "_raise")
    to leave out, as an older database would; extra: metrics to add or override."""
    if not _BASE_CONFIG:
        _BASE_CONFIG.update(load_config(None, TINY).to_dict())
    params = {"rbm.cd_k": k, "seed": seed, **(params or {})}
    config = copy.deepcopy(_BASE_CONFIG)
    for key, value in params.items():
        set_dotted(config, key, value)
    metrics: dict[str, float] = dict(SETTINGS)
    for stage, value in (("rbm", rbm), ("dbn", dbn), ("finetune", finetune)):
        if value is None:
            continue
        metrics[f"{stage}.log_z"] = 200.0
        metrics[f"{stage}.log_z_low"], metrics[f"{stage}.log_z_high"] = 200.0 - halfwidth, 200.0 + halfwidth
        metrics[f"{stage}.log_z_sd"] = 0.05
        metrics[f"{stage}.ais_seconds"] = 60.0
        for split in ("val", "test"):
            name = f"{stage}.{split}.log_likelihood"
            metrics[name] = value
            metrics[f"{name}_low"], metrics[f"{name}_high"] = value - halfwidth, value + halfwidth
            metrics[f"{name}_stderr"] = stderr
            metrics[f"{stage}.{split}.recon_error"] = recon
    for stage, value, gap in (("rbm", rbm, raise_gap), ("dbn", dbn, dbn_raise_gap),
                              ("finetune", finetune, dbn_raise_gap)):
        if value is None or gap is None:
            continue
        name = f"{stage}.test.log_likelihood"
        metrics[f"{name}_raise"], metrics[f"{name}_raise_stderr"] = value - gap, stderr
        metrics[f"{name}_raise_gap"], metrics[f"{name}_raise_gap_stderr"] = -gap, 0.05
        metrics[f"{stage}.raise_seconds"] = 30.0
    metrics["rbm.seconds_per_epoch"] = seconds
    epochs: list[tuple[str, int, str, float]] = []
    for i, value in enumerate(curve or []):
        epochs.append(("rbm", (i + 1) * curve_every, "val_log_likelihood", value))
        epochs.append(("rbm", (i + 1) * curve_every, "curve_seconds", 1.0))
    metrics["eval.curve_every"] = curve_every if curve else 0  # the pipeline records it, 0 when off
    if curve:
        metrics.update({"eval.curve_chains": 32, "eval.curve_betas": 2_000, "eval.curve_images": 1_000,
                        "rbm.curve_seconds": float(len(curve))})
    metrics.update(extra or {})
    metrics = {n: v for n, v in metrics.items() if not any(n == d or n.endswith(d) for d in drop)}
    last = finetune if finetune is not None else dbn if dbn is not None else rbm
    metrics[OBJECTIVE] = last if last is not None else 0.0
    return {"params": params, "config": config, "metrics": metrics, "epochs": epochs, "weights": {},
            "seconds": 600.0}


def write_study(
    path: Path | str,
    name: str,
    runs: list[dict],
    extra_states: tuple[tuple[str, str | None], ...] = (),
    study_status: str = "completed",
    objectives: tuple[str, ...] = (OBJECTIVE,),
    sampler: str = "grid",
) -> None:
    """Write one study into the database at `path` (a file, created if missing, or a server's URL)
    the way the driver does: our rows through `study.storage.StudyStorage`, Optuna's through Optuna,
    in the same database.

    `extra_states`: (state, error) of trials without results appended after the runs, e.g.
    ("failed", "FloatingPointError: ...") or ("running", None). `objectives`: maximised, as the
    study service stores several (comma-separated, the first is the trial's objective value).
    `sampler`: the study config's search.sampler; the search space is the runs' params' values.
    """
    storage = StudyStorage(path, create=True)  # ours first: Optuna's tables alone make a foreign file
    config = runs[0]["config"] if runs else load_config(None, TINY).to_dict()
    search: dict[str, list] = {"rbm.cd_k": [1, 2], "seed": [0, 1]} if not runs else {}
    for run in runs:
        for key, value in run["params"].items():
            if value not in search.setdefault(key, []):
                search[key].append(value)
    study_config = {"lab": config, "search": {"sampler": sampler, "space": search}}
    info = storage.create_study(name, study_config, len(runs) + len(extra_states),
                                ",".join(objectives), ",".join("max" for _ in objectives), "test")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = optuna.create_study(storage=storage.url, study_name=name, directions=["maximize"] * len(objectives))
    distributions = {key: optuna.distributions.CategoricalDistribution(values) for key, values in search.items()}
    for run in runs:
        ostudy.add_trial(optuna.trial.create_trial(
            params=run["params"], distributions={key: distributions[key] for key in run["params"]},
            values=[run["metrics"][o] for o in objectives],
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
    # Optuna's engine holds a connection until it is collected; closing the last one folds SQLite's
    # write-ahead log into the file, which must happen here and not, at random, during a later read
    del ostudy
    gc.collect()


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
