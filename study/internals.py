"""Every use of Ray's private code, in one place, pinned to ray==2.58.0 (tests/study/test_internals.py
fails when one of them changes).

1. `OptunaSearch`'s trial bookkeeping. `study.search.StudySearch` defers Optuna's `tell` until the
   database has a trial (the reason is in that module), so it must find the Optuna trial Ray asked
   for a Tune trial, and mark it told, in the searcher's own dicts: Ray has no public accessor.
2. Ray's address resolution. Ray replaces 127.0.0.1/localhost, wherever it is given, by the
   machine's external IP, and then listens on all interfaces; only a node whose IP is literally
   127.0.0.1 binds its servers to loopback alone. A single-machine cluster (tests, a laptop) should
   not be reachable from the network, so every rbm-study process that starts or joins Ray keeps
   loopback hosts as they are (`keep_loopback`); nothing changes for any other address.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing Ray's search module is slow; callers hold a searcher already
    import optuna
    from ray.tune.search.optuna import OptunaSearch


# --- 1. OptunaSearch --------------------------------------------------------------------------------
def optuna_trial(searcher: OptunaSearch, trial_id: str) -> optuna.Trial | None:
    """The Optuna trial the searcher asked for Tune trial `trial_id`, unless already told."""
    if trial_id in searcher._completed_trials:
        return None
    return searcher._ot_trials.get(trial_id)


def asked_number(searcher: OptunaSearch, trial_id: str) -> int | None:
    trial = searcher._ot_trials.get(trial_id)
    return None if trial is None else trial.number


def optuna_study(searcher: OptunaSearch) -> optuna.Study:
    return searcher._ot_study


def mark_told(searcher: OptunaSearch, trial_id: str) -> None:
    searcher._completed_trials.add(trial_id)


# --- 2. loopback stays loopback ---------------------------------------------------------------------
def keep_loopback() -> None:
    """Make Ray's address resolution leave loopback hosts alone (idempotent)."""
    import ray._private.services as services
    from ray._common.network_utils import is_localhost

    if getattr(services.resolve_ip_for_localhost, "_rbm_study", False):
        return
    original = services.resolve_ip_for_localhost

    def resolve(host: str) -> str:
        return "127.0.0.1" if host and is_localhost(host) else original(host)

    resolve._rbm_study = True  # type: ignore[attr-defined]
    services.resolve_ip_for_localhost = resolve


def loopback_kept() -> Any:
    import ray._private.services as services

    return getattr(services.resolve_ip_for_localhost, "_rbm_study", False)
