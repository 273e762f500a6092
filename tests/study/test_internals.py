"""The private Ray code `study.internals` relies on is still there and behaves as assumed (fast, no
cluster). A Ray upgrade that moves any of it fails here, not in the middle of a study."""

from __future__ import annotations

import optuna
from optuna.distributions import CategoricalDistribution
from ray.tune.search.optuna import OptunaSearch

from rbm_study.study import internals


def test_optuna_search_bookkeeping_is_where_we_read_it():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearch(space={"x": CategoricalDistribution([1, 2])}, metric="m", mode="max",
                            sampler=optuna.samplers.RandomSampler(seed=0))
    suggestion = searcher.suggest("trial-a")
    assert suggestion is not None and suggestion["x"] in (1, 2)
    asked = internals.optuna_trial(searcher, "trial-a")
    assert isinstance(asked, optuna.Trial) and internals.asked_number(searcher, "trial-a") == asked.number == 0
    assert isinstance(internals.optuna_study(searcher), optuna.Study)
    assert internals.optuna_trial(searcher, "never-asked") is None
    internals.mark_told(searcher, "trial-a")
    assert internals.optuna_trial(searcher, "trial-a") is None  # told trials are not touched again


def test_loopback_hosts_stay_loopback():
    import ray._private.services as services

    internals.keep_loopback()
    internals.keep_loopback()  # idempotent
    assert internals.loopback_kept()
    assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
    assert services.resolve_ip_for_localhost("localhost") == "127.0.0.1"
    assert services.resolve_ip_for_localhost("10.1.2.3") == "10.1.2.3"
