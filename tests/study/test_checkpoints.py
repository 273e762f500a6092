"""study.checkpoints: keys, packing, and large values travelling through the store as blobs."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from rbm_study.study.checkpoints import pack, receive_blob, send_blob, start_store, unpack


def test_pack_round_trip_keeps_bytes_and_epoch_rows():
    rows = [("rbm", 1, {"recon_error": 0.5}), ("rbm", 2, {"recon_error": 0.25})]
    assert unpack(pack(b"\x00lab\xff", rows)) == (b"\x00lab\xff", rows)
    with pytest.raises(ValueError, match="not an rbm-study checkpoint"):
        unpack(b"something else")


def test_without_a_store_the_value_itself_is_reported():
    value = {"zad1_rbm.th": b"x" * 10}
    assert send_blob(None, value) is value
    assert receive_blob(value) is value


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    from rbm_study.study.internals import keep_loopback

    keep_loopback()
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_a_trial_reports_a_short_name_and_the_driver_takes_the_bytes_once(local_ray):
    """A result above Ray's 100 KB inline limit would wait in the trial node's object store, where
    a node death makes Tune's controller raise; the trial must report a short name instead."""
    import ray

    from rbm_study.study.checkpoints import find_store

    store = start_store({})
    weights = {"zad1_rbm.th": bytes(range(256)) * 4096, "zad2_dbn.th": b"\x01" * 300_000}

    @ray.remote(num_cpus=0)
    def trial(value: dict) -> object:
        return send_blob(find_store(), value)

    reported = ray.get(trial.remote(weights))
    assert isinstance(reported, str) and len(reported) < 100
    assert receive_blob(reported) == weights
    assert receive_blob(reported) is None  # taken once: the store does not keep it
    ray.kill(store)


def test_the_store_drops_only_the_blobs_of_the_given_owner():
    from rbm_study.study.checkpoints import CheckpointStore

    store = CheckpointStore()
    for name in ("rbm-study-blob:t1/a", "rbm-study-blob:t1/b", "rbm-study-blob:t10/c", "rbm-study-blob:/d"):
        store.put_blob(name, name.encode())
    assert store.drop_blobs("t1") == 2
    assert store.take_blob("rbm-study-blob:t1/a") is None
    assert store.take_blob("rbm-study-blob:t10/c") == b"rbm-study-blob:t10/c"  # t1 is not a prefix of t10
    assert store.take_blob("rbm-study-blob:/d") == b"rbm-study-blob:/d"


def test_the_driver_forgets_what_a_trial_sent_but_never_reported(local_ray):
    """A trial that dies between sending a blob and reporting it leaves the blob in the store; the
    driver drops it when the trial ends (or is retried), and other trials' blobs stay."""
    import ray

    from rbm_study.study.checkpoints import forget_blobs

    store = start_store({})
    orphan = send_blob(store, b"\x02" * 200_000, owner="trial_7")
    other = send_blob(store, b"\x03" * 10, owner="trial_8")
    assert orphan.startswith("rbm-study-blob:trial_7/")
    forget_blobs("trial_7")  # not waited for; the store handles its calls in order
    assert receive_blob(orphan) is None
    assert receive_blob(other) == b"\x03" * 10
    ray.kill(store)
