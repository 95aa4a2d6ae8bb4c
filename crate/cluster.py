"""How every job reaches Ray: the cluster in RAY_ADDRESS (`ray job submit` sets it), the instance this process
already joined, or a fresh local one. Ray is imported on first use, so torch-only hosts can import the callers.

A local instance started here listens on loopback only, every one of its processes (GCS, raylet, object manager,
dashboard and its agents, runtime-env agent, workers): Ray binds its gRPC servers to the node's address, and turns a
requested 127.0.0.1 into the host's network address unless its multi-node support is off
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read by every Ray process at import). With nothing beyond 127.0.0.1 to
reach it, its token auth is off unless RAY_AUTH_MODE says otherwise. docs/security.md has the whole picture."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# What keeps a Ray instance on loopback, for every process it starts (they inherit the environment).
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def keep_ray_on_loopback() -> None:
    """Make the Ray instance this process starts (and its children) take 127.0.0.1 as the node's address."""
    os.environ.update(LOOPBACK_RAY_ENV)
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: this process may have imported Ray already


def connect_ray(**local_options) -> bool:
    """Join the cluster in RAY_ADDRESS (or the one already initialised); else start a local, loopback-only
    instance with `local_options` (ray.init keywords). Returns True when the instance was started here."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return False
    keep_ray_on_loopback()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    log.info("starting a local Ray instance on %s (token auth %s)", LOOPBACK, os.environ["RAY_AUTH_MODE"])
    ray.init(**local_options, _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK)
    return True
