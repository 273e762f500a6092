"""study.checkpoints: keys, packing, and large values travelling through the store as blobs."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from study.checkpoints import pack, receive_blob, send_blob, start_store, unpack


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

    from study.raynode import keep_loopback

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

    from study.checkpoints import find_store

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
