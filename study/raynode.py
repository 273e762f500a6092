"""Start a Ray node the way the containers do (`python -m study.raynode start ...` = `ray start ...`),
with one fix: loopback addresses stay loopback.

Ray 2.58 replaces 127.0.0.1/localhost, wherever it is given (`--node-ip-address`, `--address`,
`ray.init(address=...)`), by the machine's external IP, and then listens on all interfaces. Only a
node whose IP is literally 127.0.0.1 binds its servers to loopback alone. A single-machine cluster
(our tests, a laptop) should not be reachable from the network, so every rbm-study process that
starts or joins Ray keeps loopback addresses as they are (`keep_loopback`); for any other address
nothing changes.
"""

from __future__ import annotations

import sys


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


def is_loopback_address(address: str | None) -> bool:
    if not address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def main(argv: list[str] | None = None) -> None:
    keep_loopback()
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *(sys.argv[1:] if argv is None else argv)]
    ray_main()


if __name__ == "__main__":
    main()
