"""Ray nodes and addresses: start a node the way the containers do (`python -m
rbm_study.study.raynode start ...` = `ray start ...`, loopback kept loopback: `study.internals`),
and find how a driver joins the cluster at an address (`driver_node_ip`).
"""

from __future__ import annotations

import socket
import sys

from rbm_study.core.errors import UserError
from rbm_study.study.internals import keep_loopback


def is_loopback_address(address: str | None) -> bool:
    if not address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


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


def main(argv: list[str] | None = None) -> None:
    keep_loopback()
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *(sys.argv[1:] if argv is None else argv)]
    ray_main()


if __name__ == "__main__":
    main()
