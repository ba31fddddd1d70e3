"""Which Ray instance a simulation uses, checked before Ray is asked to join it.

`ray.init()` with no address joins whatever cluster the machine's cluster file names
(`<ray temp dir>/ray_current_cluster`), and when that head has died it retries the dead address for
minutes, deaf to SIGTERM. So a local simulation always starts its own Ray instance (`address="local"`),
and a named cluster must answer a TCP connect within a bounded time before Ray is called.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

CONNECT_TIMEOUT_S = 10.0


class RayClusterUnreachable(RuntimeError):
    """The Ray cluster named by `--ray-address` does not exist or does not answer."""


def _cluster_file() -> Path:
    from ray._private.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def resolve_address(address: str) -> tuple[str, str]:
    """(host:port, where it came from) of `--ray-address` (auto, host:port or ray://host:port)."""
    if address == "auto":
        if os.environ.get("RAY_ADDRESS"):
            return os.environ["RAY_ADDRESS"], "the RAY_ADDRESS environment variable"
        file = _cluster_file()
        if not file.is_file() or not file.read_text().strip():
            raise RayClusterUnreachable(f"--ray-address auto: no Ray cluster runs on this machine ({file} does "
                                        "not name one); start one with `ray start --head`, or leave "
                                        "--ray-address out to simulate on a local Ray instance")
        return file.read_text().strip(), str(file)
    return address.removeprefix("ray://"), "--ray-address"


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RayClusterUnreachable unless the cluster's head accepts a TCP connection in `timeout_s`."""
    target, source = resolve_address(address)
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise RayClusterUnreachable(f"--ray-address {address!r}: {target!r} (from {source}) is not host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise RayClusterUnreachable(
            f"--ray-address {address!r}: the Ray head at {target} (from {source}) did not answer within "
            f"{timeout_s:.0f} s ({err.strerror or err}); is the cluster running? Leave --ray-address out to "
            "simulate on a local Ray instance") from None


def ray_init_args(address: str) -> dict[str, str]:
    """`ray.init` arguments: a fresh local instance when no address is given, else the checked cluster."""
    if not address:
        return {"address": "local"}
    check_reachable(address)
    return {"address": address}


def keep_flower_simulation_local() -> None:
    """Under `flwr run`, Flower's Simulation Engine calls `ray.init()` with no address in the
    `flwr-simulation` process, just after loading the ClientApp; Ray would then join the cluster the
    machine's cluster file names, and sit retrying a head that died. Unless the user names a cluster
    with RAY_ADDRESS, that call starts a local instance instead."""
    if Path(sys.argv[0]).name == "flwr-simulation":
        os.environ.setdefault("RAY_ADDRESS", "local")
