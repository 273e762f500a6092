"""Ray nodes and addresses: start a node the way the containers do (`python -m
rbm_study.study.raynode start ...` = `ray start ...`, loopback kept loopback: `study.internals`;
a head's environment for its dashboard and job server: `head_environment`), and find how a driver
joins the cluster at an address (`driver_node_ip`).
"""

from __future__ import annotations

import os
import socket
import sys

from rbm_study.core.errors import UserError
from rbm_study.study.internals import keep_loopback


def is_loopback_host(host: str | None) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def is_loopback_address(address: str | None) -> bool:
    return bool(address) and is_loopback_host(address.rsplit(":", 1)[0].strip("[]"))


def _answers(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def driver_node_ip(address: str) -> str | None:
    """The node IP a driver must claim to join the cluster at `address` ('auto' or HOST:PORT), or
    None to let Ray choose; UserError (one line, before anything starts) when nothing answers.

    Two kinds of head exist on one machine. `ray start --head` (what users type) serves on every
    interface and registers the machine's IP, so a driver must register that IP too, whatever host
    it dialled (127.0.0.1, localhost, the IP). A head started through `keep_loopback` (our
    entrypoint and tests) serves on 127.0.0.1 only, and a driver must register 127.0.0.1 to find
    its raylet. A plain TCP probe of the head's port tells them apart, without asking Ray.
    """
    if address == "auto":
        return None  # Ray reads the address of the head started on this machine
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit():
        raise UserError(f"--address {address!r} must be HOST:PORT (e.g. 127.0.0.1:6379) or auto")
    port = int(port_text)
    hint = (f"start a head there with `ray start --head --port {port}` (or `docker/entrypoint.sh head`), "
            "or omit --address to run a local Ray")
    if not is_loopback_address(address):
        if not _answers(host, port):
            raise UserError(f"nothing answers at {address}; {hint}")
        return None
    from ray.util import get_node_ip_address

    if _answers(get_node_ip_address(), port):
        return None  # a head on every interface
    if _answers("127.0.0.1", port):
        return "127.0.0.1"  # a loopback-only head
    raise UserError(f"nothing answers at {address}; {hint}")


# A job that `ray job stop` interrupts gets this long (Ray's default: 3 s) between SIGTERM and
# SIGKILL, to end its trials, mark them in the database and hand the study's lease back.
JOB_STOP_WAIT_S = "60"


def _option(args: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in a command line."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def head_environment(args: list[str]) -> dict[str, str]:
    """What a head started with `args` passes to every process it starts (Ray's own included).

    Every head: RAY_JOB_STOP_WAIT_TIME_S, read by the job server's supervisors (a user's own
    setting wins). A head on loopback alone: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's public
    switch for single-machine Ray, under which "127.0.0.1" stays 127.0.0.1 in the processes that
    `keep_loopback` cannot reach (the dashboard's modules, the job server, the jobs' drivers);
    without it they dial the machine's external IP, where nothing listens, and hang.
    """
    env = {"RAY_JOB_STOP_WAIT_TIME_S": JOB_STOP_WAIT_S}
    if "--head" in args and is_loopback_host(_option(args, "--node-ip-address")):
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if "--head" in args:
        for key, value in head_environment(args).items():
            os.environ.setdefault(key, value)
    keep_loopback()
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *args]
    ray_main()


if __name__ == "__main__":
    main()
