"""How `study.raynode` starts a head: the environment it hands to Ray's own processes (fast, no
cluster; tests/study/test_jobs.py runs a head with it)."""

from __future__ import annotations

from rbm_study.study.raynode import JOB_STOP_WAIT_S, head_environment, is_loopback_address


def test_a_loopback_head_keeps_its_dashboard_and_job_server_on_loopback():
    for args in (["--head", "--node-ip-address", "127.0.0.1"], ["--head", "--node-ip-address=localhost"]):
        assert head_environment(args) == {"RAY_JOB_STOP_WAIT_TIME_S": JOB_STOP_WAIT_S,
                                          "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def test_other_heads_only_give_stopped_jobs_time_to_end_cleanly():
    for args in (["--head", "--node-ip-address", "10.0.0.1"], ["--head"], ["--head", "--node-ip-address"]):
        assert head_environment(args) == {"RAY_JOB_STOP_WAIT_TIME_S": JOB_STOP_WAIT_S}
    assert int(JOB_STOP_WAIT_S) > 3  # Ray's own default


def test_loopback_addresses():
    assert is_loopback_address("127.0.0.1:6379") and is_loopback_address("localhost:1")
    assert is_loopback_address("[::1]:6379")
    assert not is_loopback_address("10.0.0.1:6379") and not is_loopback_address(None)
    assert not is_loopback_address("")
