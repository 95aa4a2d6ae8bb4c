"""How every job reaches Ray: the cluster in RAY_ADDRESS (`ray job submit` sets it), the instance this process
already joined, or a fresh local one. Ray is imported on first use, so torch-only hosts can import the callers.

A local instance started here listens on loopback only, every one of its processes (GCS, raylet, object manager,
dashboard and its agents, runtime-env agent, workers): Ray binds its gRPC servers to the node's address, and turns a
requested 127.0.0.1 into the host's network address unless its multi-node support is off
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read by every Ray process at import). With nothing beyond 127.0.0.1 to
reach it, its token auth is off unless RAY_AUTH_MODE says otherwise. docs/security.md has the whole picture.
Its dashboard gets a free port, named in RAY_API_SERVER_ADDRESS for this process and every process of the instance,
so Ray's State API finds this instance even when others run on the machine."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
STARTED_HERE = "CRATE_RAY_STARTED_HERE"  # the address of the local instance this process started (RAY_ADDRESS too)

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
    if os.environ.get("RAY_ADDRESS") and os.environ["RAY_ADDRESS"] != os.environ.get(STARTED_HERE):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return False
    keep_ray_on_loopback()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    options = local_options | {"_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK}
    if options.get("include_dashboard") is False:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    else:
        # Ray's State API (Ray Train's placement-group cleaner, the sweep's check) finds its dashboard through
        # RAY_API_SERVER_ADDRESS, else by looking for *any* instance on the machine, which fails when there are
        # several: name this one's, before its processes start, so that they all inherit it.
        options["dashboard_port"] = options.get("dashboard_port") or _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{options['dashboard_port']}"
    log.info("starting a local Ray instance on %s (token auth %s)", LOOPBACK, os.environ["RAY_AUTH_MODE"])
    # Ray's own components (Ray Train's placement-group cleaner) find their instance through RAY_ADDRESS, else by
    # scanning the host, which fails when another Ray instance runs there ("Found multiple active Ray
    # instances"). So the instance gets a known GCS port and every process it starts inherits its address;
    # address="local" starts it whatever RAY_ADDRESS says.
    port = _free_port()
    os.environ["RAY_ADDRESS"] = os.environ[STARTED_HERE] = f"{LOOPBACK}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        context = ray.init(address="local", **options)
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT")
    if context.dashboard_url and os.environ.get("RAY_API_SERVER_ADDRESS") != f"http://{context.dashboard_url}":
        log.warning("Ray's dashboard took %s, not the port chosen for it", context.dashboard_url)
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{context.dashboard_url}"
    return True


def _free_port() -> int:
    """A free port chosen by the kernel: not 8265, which every other instance starting meanwhile reaches for
    (Ray moves on from a taken default port, but fails on a taken port it was given)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]
