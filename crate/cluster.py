"""How every job reaches Ray: the cluster in RAY_ADDRESS (`ray job submit` sets it), the instance this process
already joined, or a fresh local one. Ray is imported on first use, so torch-only hosts can import the callers."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
STARTED_HERE = "CRATE_RAY_STARTED_HERE"  # the address of the local instance this process started (RAY_ADDRESS too)


def connect_ray(**local_options) -> bool:
    """Join the cluster in RAY_ADDRESS (or the one already initialised); else start a local instance with
    `local_options` (ray.init keywords). Returns True when the instance was started here."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS") and os.environ["RAY_ADDRESS"] != os.environ.get(STARTED_HERE):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return False
    # A fresh local instance in Ray 2.60 enables token auth; it listens on loopback only, so turn it off and say so.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    log.info("starting a local Ray instance (token auth %s)", os.environ["RAY_AUTH_MODE"])
    # Ray's own components (Ray Train's placement-group cleaner) find their instance through RAY_ADDRESS, else by
    # scanning the host, which fails when another Ray instance runs there ("Found multiple active Ray
    # instances"). So the instance gets a known GCS port and every process it starts inherits its address;
    # address="local" starts it whatever RAY_ADDRESS says.
    port = _free_port()
    os.environ["RAY_ADDRESS"] = os.environ[STARTED_HERE] = f"127.0.0.1:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(address="local", **local_options)
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT")
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
