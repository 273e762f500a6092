"""The driver: one process that starts or joins Ray, runs the trials with Tune and Optuna, and alone
writes the study database.

Resume scheme (and why not `Tuner.restore`): Ray Tune saves its experiment state every few seconds,
so after a SIGKILL it can be behind the database in either direction, and restoring it would re-run
trials the database already holds (counted twice) or forget ones it does not. The database is
written in one transaction per event and is therefore always the truth. So every run of the driver,
`launch` or `resume`, does the same thing:

1. trials the file still calls `running` belonged to a dead driver: mark them `interrupted`;
2. `study.search.reconcile` makes Optuna's history agree with the file and queues the params of
   the interrupted trials, so they run again first and take over their old row (no new trial),
   and of any trial Tune had asked for but not yet started (so a grid loses no point);
3. start the checkpoint store (`study.checkpoints`), seeded with the last stage checkpoint the
   file holds for each interrupted trial (`rbm_checkpoints`), so each of them carries on after
   its last finished stage (rbm or dbn) instead of from scratch; on the CPU that gives the same
   weights and metrics as a run that was never interrupted;
4. run a fresh Tune experiment for exactly `num_samples - finished` trials, where finished means
   completed, failed (diverged, or out of retries) or pruned (ASHA).

Completed trials are thus never re-run, every trial is counted once, and Optuna keeps its whole
history (interrupted attempts stay in it as FAIL, tagged `rbm_study_interrupted`). A trial that
Ray retries after its worker died resumes the same way, from the store, which lives on the head
node. A trial's checkpoint row is deleted once it finishes. Ray's own folder (`<db>.ray/` beside a
file, `~/ray_results/rbm-study/` for a server's database) only holds logs and per-attempt state;
deleting it loses nothing a report needs.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from rbm_study.core.data import ENV_VAR as MNIST_ENV
from rbm_study.core.errors import UserError
from rbm_study.core.metrics import STAGES
from rbm_study.study import lease
from rbm_study.study.config import StudyConfig, stored_config
from rbm_study.study.storage import FINISHED_STATES, StudyInfo, StudyStorage, Target

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


def ray_storage_path(db: Target) -> Path:
    """Ray's folder for a study's database: beside a file; for a server's, under the user's
    ~/ray_results (one folder per host, port and database)."""
    if db.url is None:
        return Path(f"{Path(db.path or '').resolve()}.ray")
    where = f"{db.url.host or 'localhost'}-{db.url.port or 5432}-{db.url.database}"
    return Path.home() / "ray_results" / "rbm-study" / _safe(where)


# --- Ray ------------------------------------------------------------------------------------------
def cluster_address(address: str | None) -> str | None:
    """The cluster a driver joins: `address`, else $RAY_ADDRESS; None for a local Ray ("local")."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def start_ray(address: str | None, study: StudyConfig) -> str:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local one bound to loopback."""
    for key, value in _TUNE_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    from rbm_study.study.internals import keep_loopback
    from rbm_study.study.raynode import driver_node_ip

    keep_loopback()
    address = cluster_address(address)
    if address:
        claimed = driver_node_ip(address)
        node_ip = {"_node_ip_address": claimed} if claimed else {}
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **node_ip)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot join the Ray cluster at {address}: {err}".splitlines()[0]) from None
        return f"cluster at {ray.get_runtime_context().gcs_address}"  # what "auto" found, too
    cpus = local_cpus(study)
    gpus = None if study.resources.gpus_per_trial > 0 else 0
    ray.init(
        address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
        _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING,
    )
    return f"local Ray, {cpus} CPUs"


def trial_slots(study: StudyConfig) -> int:
    """How many trials fit in the cluster at once; the default concurrency.

    Bounding concurrency keeps Optuna from proposing every trial up front (which would make TPE a
    random search) and keeps few trials in flight when the driver dies. At least one: a trial that
    fits no node yet waits for one to join (`unplaced` says so).
    """
    import ray

    res = ray.cluster_resources()
    r = study.resources
    slots = math.floor(res.get("CPU", 1) / r.cpus_per_trial + 1e-9)
    if r.gpus_per_trial > 0:
        slots = min(slots, math.floor(res.get("GPU", 0) / r.gpus_per_trial + 1e-9))
    return max(1, slots)


def unplaced(study: StudyConfig, nodes: list[dict[str, Any]]) -> str | None:
    """Why no trial can start on a cluster of `nodes` (as `ray.nodes()` lists them) now, or None
    where a live node has the CPUs and GPUs one trial asks for (they must all sit on one node).
    Tune then waits, for an autoscaler or a `ray start` elsewhere, so the driver says so once."""
    r = study.resources
    for node in nodes:
        has = node.get("Resources", {})
        if (node.get("Alive") and has.get("CPU", 0) + 1e-9 >= r.cpus_per_trial
                and has.get("GPU", 0) + 1e-9 >= r.gpus_per_trial):
            return None
    asked = f"{r.cpus_per_trial:g} CPUs" + (f" and {r.gpus_per_trial:g} GPUs" if r.gpus_per_trial else "")
    return (f"no node of the cluster has {asked} for one trial now; the trials wait until such a node "
            "joins (Ctrl-C stops the study, `rbm-study resume` carries on)")


def _max_training_iterations(study: StudyConfig) -> int:
    """Upper bound of epochs a trial reports (ASHA's max_t), searched epochs included."""
    total = 0
    by_key = {p.key: p for p in study.params}
    for stage in STAGES:
        p = by_key.get(f"{stage}.epochs")
        if p is None:
            total += getattr(study, stage).epochs
        else:
            total += int(max(p.values) if p.kind == "categorical" else p.high)
    return max(1, total)


# --- launch / resume ------------------------------------------------------------------------------
def _finished(storage: StudyStorage, study_id: int) -> int:
    counts = storage.counts(study_id)
    return sum(counts[s] for s in FINISHED_STATES)


def _absolute_data_paths(study: StudyConfig) -> StudyConfig:
    """Trials run in Ray's own working directory, so a relative MNIST path (from $MNIST_ROOT or
    data.root, meant relative to where the user typed the command) is made absolute here. Workers
    that Ray starts locally inherit the environment; remote workers keep their own MNIST_ROOT."""
    env = os.environ.get(MNIST_ENV)
    if env and not Path(env).is_absolute():
        os.environ[MNIST_ENV] = str(Path(env).resolve())
    root = study.data.root
    if root and not Path(root).is_absolute():
        return study.with_values({"data.root": str(Path(root).resolve())})
    return study


def local_cpus(study: StudyConfig) -> int:
    """The CPUs a local Ray is given: resources.num_cpus, else the machine's."""
    return study.resources.num_cpus or os.cpu_count() or 1


def preflight(study: StudyConfig, address: str | None) -> None:
    """On a local Ray, refuse before anything is stored or run a study whose trials could never
    start or would all fail: MNIST missing where the driver looks (the trials look there too), or a
    trial asking for more CPUs or GPUs than the machine has (Tune would wait for them forever).
    A cluster's workers, data and autoscaler cannot be judged from here. Trials on the CPU find
    the compiled CD step built (here, once, in view, rather than by the first trials at once)."""
    if cluster_address(address) is not None:
        return
    from rbm_study.core.data import ensure_downloaded, resolve_root

    ensure_downloaded(resolve_root(study.data.root))
    r, cpus = study.resources, local_cpus(study)
    if r.cpus_per_trial > cpus:
        raise UserError(
            f"resources.cpus_per_trial is {r.cpus_per_trial:g} but the local Ray has {cpus} CPUs "
            f"(resources.num_cpus or this machine's), so no trial could start; launch with --set "
            f"resources.cpus_per_trial={cpus} or less, or run on a Ray cluster with --address"
        )
    if r.gpus_per_trial > 0:
        import torch

        gpus = torch.cuda.device_count()
        if r.gpus_per_trial > gpus:
            raise UserError(
                f"resources.gpus_per_trial is {r.gpus_per_trial:g} but this machine has {gpus} CUDA "
                f"GPUs, so no trial could start; launch with --set resources.gpus_per_trial=0, or run "
                f"on a Ray cluster with GPUs with --address"
            )
    else:
        from rbm_study.core import cpu_cd

        cpu_cd.extension()


def launch(db: Target, study: StudyConfig, name: str, address: str | None, progress: bool = True) -> int:
    study = _absolute_data_paths(study)
    preflight(study, address)
    storage = StudyStorage(db, create=True)
    claim = lease.this_driver()
    info = storage.create_study(
        name, study.to_dict(), study.num_samples, ",".join(study.metrics), ",".join(study.modes), code_version(), claim
    )
    print(f"study {name}: {study.num_samples} trials, objective {', '.join(study.metrics)}; database {db.display}")
    return run_study(storage, info, study, address, lease.adopt(storage, info.id, claim), progress)


def resume(db: Target, name: str | None, address: str | None, progress: bool = True) -> int:
    storage = StudyStorage(db)
    info = storage.get_study(name)
    held, dead = lease.acquire(storage, info.id, info.name)  # refused (exit 2) while a driver lives
    if dead is not None:
        print(f"  taking over from the driver on {dead.host} (pid {dead.pid}), silent since "
              f"{dead.heartbeat_at:%H:%M:%S} UTC")
    try:
        study = _absolute_data_paths(stored_config(info.config))
        preflight(study, address)
        done = _finished(storage, info.id)
    except BaseException:
        held.release()
        raise
    print(f"study {info.name}: {done}/{info.num_samples} trials finished before this resume; "
          f"database {db.display}")
    return run_study(storage, info, study, address, held, progress)


def run_study(storage: StudyStorage, info: StudyInfo, study: StudyConfig, address: str | None,
              held: lease.Lease, progress: bool = True) -> int:
    """Run the study's remaining trials while holding its lease; the lease is released on any exit
    (the end, an error, Ctrl-C, SIGTERM) except a lost one, whose new owner now drives the study."""
    previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    try:
        return _run_remaining(storage, info, study, address, held, progress)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        held.release()


def _sigterm_as_sigint(signum: int, frame: Any) -> None:
    """SIGTERM stops the study as Ctrl-C does: Tune ends its trials, the database marks them
    interrupted and the lease is released, so `resume` carries on."""
    os.kill(os.getpid(), signal.SIGINT)


def _run_remaining(storage: StudyStorage, info: StudyInfo, study: StudyConfig, address: str | None,
                   held: lease.Lease, progress: bool) -> int:
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

    from rbm_study.study.callbacks import DatabaseCallback, LeaseLostStopper, ProgressCallback
    from rbm_study.study.checkpoints import start_store
    from rbm_study.study.progress import summary_line
    from rbm_study.study.trainable import run_trial

    started = time.perf_counter()
    try:
        slots = study.search.max_concurrent or trial_slots(study)
        print(f"  {remaining} trial(s) to run on {where}, up to {slots} at a time")
        waiting = unplaced(study, ray.nodes())
        if waiting:
            print(f"  {waiting}")
        seed = storage.checkpoints_for_interrupted(info.id)
        store = start_store(seed)  # held until Tune is done: the trials look it up by name
        if seed:
            print(f"  {len(seed)} interrupted trial config(s) carry on from their last stage checkpoint")
        searcher = StudySearch(study, info.name, optuna_storage(storage.url))
        callbacks: list = [DatabaseCallback(storage, info, study, searcher)]
        if progress and study.resources.progress:
            callbacks.append(ProgressCallback(storage, info))
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, study_config=study.to_dict(), searched=[p.key for p in study.params]),
            {"cpu": study.resources.cpus_per_trial, "gpu": study.resources.gpus_per_trial},
        )
        scheduler = None
        if study.search.scheduler == "asha":
            a = study.search.asha
            # Time is the epoch across stages (`lab_epoch`, see study.trainable): checkpoint and final
            # results carry none, so they are no step, and a resumed trial's epochs keep their count.
            # A trial that reaches max_t ends by itself, with its final result (Tune stopping it
            # there would lose that result and count a finished trial as pruned).
            scheduler = tune.schedulers.ASHAScheduler(
                time_attr="lab_epoch", metric=a.metric, mode=a.mode, grace_period=a.grace_period,
                reduction_factor=a.reduction_factor, max_t=_max_training_iterations(study),
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
                storage_path=str(ray_storage_path(storage.target)),
                failure_config=tune.FailureConfig(max_failures=study.resources.max_failures),
                callbacks=callbacks,
                stop=LeaseLostStopper(held.lost),
                verbose=0,
                log_to_file=True,
            ),
        )
        # Tune's result grid looks for result.json files we chose not to write (the database has it all).
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        tuner.fit()
        del store
    except BaseException:
        if not held.lost.is_set():
            storage.interrupt_running(info.id)
            storage.set_study_status(info.id, "interrupted")
        raise
    finally:
        ray.shutdown()
    if held.lost.is_set():
        raise UserError(
            f"this driver lost study {info.name!r} to another driver (its heartbeat was silent for over "
            f"{lease.TIMEOUT_S:.0f} s); it stopped without writing more; see `rbm-study status`"
        )
    storage.interrupt_running(info.id)  # none should be left; if Tune stopped early, say so
    finished = _finished(storage, info.id)
    status = "completed" if finished >= study.num_samples else "interrupted"
    storage.set_study_status(info.id, status)
    info = storage.get_study(info.name)
    print(summary_line(info, storage.trials(info.id)))
    print(f"{time.perf_counter() - started:.1f} s in Ray; study {status}")
    if status != "completed":
        print(f"continue with: rbm-study resume --db {storage.display} --name {info.name}")
        return 1
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
