"""The driver: one process that starts or joins Ray, runs the trials with Tune and Optuna, and alone
writes the study database.

Resume scheme (and why not `Tuner.restore`): Ray Tune saves its experiment state every few seconds,
so after a SIGKILL it can be behind the database in either direction, and restoring it would re-run
trials the database already holds (counted twice) or forget ones it does not. The database is
written in one transaction per event and is therefore always the truth. So every run of the driver,
`launch` or `resume`, does the same thing:

1. trials the file still calls `running` belonged to a dead driver: mark them `interrupted`;
2. `study.search.reconcile` makes Optuna's history agree with the file and queues the params of
   the interrupted trials, so they run again first and take over their old row (no new trial);
3. start the checkpoint store (`study.checkpoints`), seeded with the last stage checkpoint the
   file holds for each interrupted trial (`rbm_checkpoints`), so each of them carries on after
   its last finished stage (rbm or dbn) instead of from scratch; on the CPU that gives the same
   weights and metrics as a run that was never interrupted;
4. run a fresh Tune experiment for exactly `num_samples - finished` trials, where finished means
   completed, failed (diverged, or out of retries) or pruned (ASHA).

Completed trials are thus never re-run, every trial is counted once, and Optuna keeps its whole
history (interrupted attempts stay in it as FAIL, tagged `rbm_study_interrupted`). A trial that
Ray retries after its worker died resumes the same way, from the store, which lives on the head
node. A trial's checkpoint row is deleted once it finishes. Ray's own folder (`<db>.ray/`) only
holds logs and per-attempt state; deleting it loses nothing a report needs.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from rbm_study.core.data import ENV_VAR as MNIST_ENV
from rbm_study.core.errors import UserError
from rbm_study.study.config import STUDY_SECTIONS, StudyConfig, check_study_config
from rbm_study.study.storage import FINISHED_STATES, StudyInfo, StudyStorage

log = logging.getLogger(__name__)

# Tune must not insist that every (per-epoch) result carries the final objective, and its JSON/CSV
# loggers would keep a second copy of every result beside the database, which alone is the record.
_TUNE_ENV = {
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
}


def code_version() -> str:
    """Package version and, in a git checkout, the commit (with '+dirty' for local changes)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = f"rbm-study {version('rbm-study')}"
    except PackageNotFoundError:
        text = "rbm-study (not installed)"
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty=+dirty"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        if commit:
            text += f" git {commit}"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def ray_storage_path(db: Path) -> Path:
    return Path(f"{db.resolve()}.ray")


# --- Ray ------------------------------------------------------------------------------------------
def start_ray(address: str | None, study: StudyConfig) -> str:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one bound to loopback."""
    for key, value in _TUNE_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    from rbm_study.study.raynode import is_loopback_address, keep_loopback

    keep_loopback()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        # On a loopback cluster the driver attaches to the raylet on 127.0.0.1 (the head first).
        node_ip = {"_node_ip_address": "127.0.0.1"} if is_loopback_address(address) else {}
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **node_ip)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot join the Ray cluster at {address}: {err}".splitlines()[0]) from None
        return f"cluster at {address}"
    cpus = study.config["resources"]["num_cpus"] or os.cpu_count() or 1
    gpus = None if study.config["resources"]["gpus_per_trial"] > 0 else 0
    ray.init(
        address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
        _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING,
    )
    return f"local Ray, {cpus} CPUs"


def trial_slots(study: StudyConfig) -> int:
    """How many trials fit in the cluster at once; the default concurrency.

    Bounding concurrency keeps Optuna from proposing every trial up front (which would make TPE a
    random search) and keeps few trials in flight when the driver dies.
    """
    import ray

    res = ray.cluster_resources()
    r = study.config["resources"]
    slots = math.floor(res.get("CPU", 1) / r["cpus_per_trial"] + 1e-9)
    if r["gpus_per_trial"] > 0:
        slots = min(slots, math.floor(res.get("GPU", 0) / r["gpus_per_trial"] + 1e-9))
        if slots < 1:
            raise UserError(
                f"resources.gpus_per_trial is {r['gpus_per_trial']} but the Ray cluster has "
                f"{res.get('GPU', 0)} GPUs"
            )
    return max(1, slots)


def _max_training_iterations(study: StudyConfig) -> int:
    """Upper bound of epochs a trial reports (ASHA's max_t), searched epochs included."""
    total = 0
    by_key = {p.key: p for p in study.params}
    for stage in ("rbm", "dbn", "finetune"):
        p = by_key.get(f"{stage}.epochs")
        if p is None:
            total += study.config[stage]["epochs"]
        else:
            total += int(max(p.values) if p.kind == "categorical" else p.high)
    return max(1, total)


# --- the Tune callback that writes the database ---------------------------------------------------
def _error_text(trial: Any) -> str:
    try:
        path = trial.error_file
        if path and Path(path).exists():
            text = Path(path).read_text(errors="replace").strip()
            if text:
                return text[-4000:]
    except Exception:
        pass
    try:
        return str(trial.get_error() or "trial failed")[-4000:]
    except Exception:
        return "trial failed (no error text from Ray)"


def make_database_callback(storage: StudyStorage, info: StudyInfo, study: StudyConfig, searcher: Any):
    from optuna.trial import TrialState
    from ray.tune import Callback
    from rbm_study.study.checkpoints import find_store, forget_blobs, receive_blob
    from rbm_study.study.search import objective_values
    from rbm_study.study.trainable import trial_params

    searched = [p.key for p in study.params]
    asha = study.config["search"]["scheduler"] == "asha"

    class DatabaseCallback(Callback):
        """Every Tune event that matters becomes one transaction in the database (driver only)."""

        def __init__(self) -> None:
            self.rows: dict[str, int] = {}
            self.nodes: dict[str, str] = {}
            self.final: dict[str, dict] = {}
            self.keys: dict[str, str] = {}  # Ray trial id -> config key (study.checkpoints)

        def _clear_store(self, trial_id: str) -> None:
            """Drop what a finished trial left in the store: blobs it sent but never reported, and
            its checkpoint, unless a trial with the same config is still under way (a retry of it
            may need it). By name: no actor handle in the callback, which Tune pickles. The store
            is a cache; the database decides."""
            forget_blobs(trial_id)
            key = self.keys.pop(trial_id, None)
            store = find_store() if key is not None and key not in self.keys.values() else None
            if store is not None:
                try:
                    store.remove.remote(key)
                except Exception as err:
                    log.warning("could not drop checkpoint %s from the store: %s", key[:12], err)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info_: Any) -> None:
            params = trial_params(trial.config, searched)
            row = storage.start_trial(
                info.id, ray_trial_id=trial.trial_id, optuna_trial_number=searcher.optuna_number(trial.trial_id),
                params=params, config=study.lab_config(params),
            )
            self.rows[trial.trial_id] = row.id
            self.nodes.pop(trial.trial_id, None)
            self.final.pop(trial.trial_id, None)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info_: Any) -> None:
            row = self.rows.get(trial.trial_id)
            if row is None:
                return
            node = result.get("node")
            if node and self.nodes.get(trial.trial_id) != node:
                storage.set_trial_node(row, node)
                self.nodes[trial.trial_id] = node
            kind = result.get("kind")
            if isinstance(result.get("config_key"), str):
                self.keys[trial.trial_id] = result["config_key"]
            if kind == "checkpoint":
                # Popped, so Tune's trial state (last_result, pickled with the experiment) stays small.
                data = receive_blob(result.pop("checkpoint", None))
                if isinstance(data, bytes) and data:
                    storage.save_checkpoint(row, str(result["stage"]), str(result["config_key"]), data)
            elif kind == "epoch":
                stage = result["stage"]
                values = {
                    k: v for k, v in result.items()
                    if k.startswith(f"{stage}.") and isinstance(v, (int, float))
                }
                storage.add_epoch_metrics(row, stage, int(result["epoch"]),
                                          {k.split(".", 1)[1]: v for k, v in values.items()})
            elif kind in ("final", "failed"):
                weights = receive_blob(result.pop("weights", None))
                error = result.get("error")
                if kind == "final" and not weights:  # a completed trial without its files is no result
                    kind, error = "failed", "the weight files were lost on their way to the driver (see the log)"
                self.final[trial.trial_id] = {
                    "kind": kind, "error": error, "weights": weights or {},
                    "metrics": {
                        k: float(v) for k, v in result.items()
                        if ("." in k or k == "lab_seconds") and isinstance(v, (int, float)) and not isinstance(v, bool)
                    },
                }

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info_: Any) -> None:
            row = self.rows.get(trial.trial_id)
            if row is None:
                return
            final = self.final.pop(trial.trial_id, None)
            self._clear_store(trial.trial_id)  # finish_trial deletes its row in the database
            if final is None:
                state = "pruned" if asha else "failed"
                storage.finish_trial(row, state, error=None if asha else "the trial ended without a final result")
                searcher.tell(trial.trial_id, TrialState.PRUNED if asha else TrialState.FAIL)
                return
            if final["kind"] == "failed":
                storage.finish_trial(row, "failed", final_metrics=final["metrics"], error=final["error"])
                searcher.tell(trial.trial_id, TrialState.FAIL)
                return
            values = objective_values(study, final["metrics"])
            if values is None:
                storage.finish_trial(
                    row, "failed", final_metrics=final["metrics"], weights=final["weights"],
                    error=f"objective {', '.join(study.metrics)} missing or not finite in the final metrics",
                )
                searcher.tell(trial.trial_id, TrialState.FAIL)
                return
            # The database first, then Optuna: see study.search.
            storage.finish_trial(row, "completed", objective_value=values[0], final_metrics=final["metrics"],
                                 weights=final["weights"])
            searcher.tell(trial.trial_id, TrialState.COMPLETE, values)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info_: Any) -> None:
            forget_blobs(trial.trial_id)  # the failed run's; the retry has not started yet

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info_: Any) -> None:
            row = self.rows.get(trial.trial_id)
            if row is None:
                return
            self.final.pop(trial.trial_id, None)
            self._clear_store(trial.trial_id)
            storage.finish_trial(row, "failed", error=_error_text(trial))
            searcher.tell(trial.trial_id, TrialState.FAIL)

    return DatabaseCallback()


# --- launch / resume ------------------------------------------------------------------------------
def _finished(storage: StudyStorage, study_id: int) -> int:
    counts = storage.counts(study_id)
    return sum(counts[s] for s in FINISHED_STATES)


def _absolute_data_paths(study: StudyConfig) -> None:
    """Trials run in Ray's own working directory, so a relative MNIST path (from $MNIST_ROOT or
    data.root, meant relative to where the user typed the command) is made absolute here. Workers
    that Ray starts locally inherit the environment; remote workers keep their own MNIST_ROOT."""
    env = os.environ.get(MNIST_ENV)
    if env and not Path(env).is_absolute():
        os.environ[MNIST_ENV] = str(Path(env).resolve())
    root = study.config["data"]["root"]
    if root and not Path(root).is_absolute():
        study.config["data"]["root"] = str(Path(root).resolve())


def launch(db: Path, study: StudyConfig, name: str, address: str | None, progress: bool = True) -> int:
    _absolute_data_paths(study)
    storage = StudyStorage(db, create=True)
    info = storage.create_study(
        name, study.config, study.num_samples, ",".join(study.metrics), ",".join(study.modes), code_version()
    )
    print(f"study {name}: {study.num_samples} trials, objective {', '.join(study.metrics)}; database {db}")
    return run_study(storage, info, study, address, progress)


def resume(db: Path, name: str | None, address: str | None, progress: bool = True) -> int:
    storage = StudyStorage(db)
    info = storage.get_study(name)
    study = check_study_config(info.config)
    _absolute_data_paths(study)
    done = _finished(storage, info.id)
    print(f"study {info.name}: {done}/{info.num_samples} trials finished before this resume; database {db}")
    return run_study(storage, info, study, address, progress)


def run_study(storage: StudyStorage, info: StudyInfo, study: StudyConfig, address: str | None,
              progress: bool = True) -> int:
    from rbm_study.study.search import StudySearch, optuna_storage, reconcile

    interrupted = storage.interrupt_running(info.id)
    trials = storage.trials(info.id)
    finals = {t.id: storage.final_metrics(t.id) for t in trials if t.state == "completed"}
    requeued = reconcile(info.name, storage.url, study, trials, finals)
    if interrupted or requeued:
        print(f"  {len(interrupted)} interrupted trial(s) marked; {requeued} queued to run again")
    remaining = study.num_samples - _finished(storage, info.id)
    if remaining <= 0:
        storage.set_study_status(info.id, "completed")
        print(f"study {info.name} is complete: {study.num_samples} trials finished")
        return 0
    storage.set_study_status(info.id, "running")

    where = start_ray(address, study)
    import ray
    from ray import tune
    from rbm_study.study.checkpoints import start_store
    from rbm_study.study.progress import ProgressCallback, summary_line
    from rbm_study.study.trainable import run_trial

    started = time.perf_counter()
    try:
        slots = study.config["search"]["max_concurrent"] or trial_slots(study)
        print(f"  {remaining} trial(s) to run on {where}, up to {slots} at a time")
        seed = storage.checkpoints_for_interrupted(info.id)
        store = start_store(seed)  # held until Tune is done: the trials look it up by name
        if seed:
            print(f"  {len(seed)} interrupted trial config(s) carry on from their last stage checkpoint")
        searcher = StudySearch(study, info.name, optuna_storage(storage.url))
        callbacks: list = [make_database_callback(storage, info, study, searcher)]
        if progress and study.config["resources"]["progress"]:
            callbacks.append(ProgressCallback(storage, info))
        r = study.config["resources"]
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                study_config={k: v for k, v in study.config.items() if k not in STUDY_SECTIONS or k == "resources"},
                searched=[p.key for p in study.params],
            ),
            {"cpu": r["cpus_per_trial"], "gpu": r["gpus_per_trial"]},
        )
        scheduler = None
        if study.config["search"]["scheduler"] == "asha":
            a = study.config["search"]["asha"]
            # Time is the epoch across stages (`lab_epoch`, see study.trainable): checkpoint and final
            # results carry none, so they are no step, and a resumed trial's epochs keep their count.
            # A trial that reaches max_t ends by itself, with its final result (Tune stopping it
            # there would lose that result and count a finished trial as pruned).
            scheduler = tune.schedulers.ASHAScheduler(
                time_attr="lab_epoch", metric=a["metric"], mode=a["mode"], grace_period=a["grace_period"],
                reduction_factor=a["reduction_factor"], max_t=_max_training_iterations(study),
                stop_last_trials=False,
            )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=remaining, max_concurrent_trials=slots,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=f"{_safe(info.name)}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(ray_storage_path(storage.path)),
                failure_config=tune.FailureConfig(max_failures=r["max_failures"]),
                callbacks=callbacks,
                verbose=0,
                log_to_file=True,
            ),
        )
        # Tune's result grid looks for result.json files we chose not to write (the database has it all).
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        tuner.fit()
        del store
    except BaseException:
        storage.interrupt_running(info.id)
        storage.set_study_status(info.id, "interrupted")
        raise
    finally:
        ray.shutdown()
    storage.interrupt_running(info.id)  # none should be left; if Tune stopped early, say so
    finished = _finished(storage, info.id)
    status = "completed" if finished >= study.num_samples else "interrupted"
    storage.set_study_status(info.id, status)
    info = storage.get_study(info.name)
    print(summary_line(info, storage.trials(info.id)))
    print(f"{time.perf_counter() - started:.1f} s in Ray; study {status}")
    if status != "completed":
        print(f"continue with: rbm-study resume --db {storage.path} --name {info.name}")
        return 1
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
