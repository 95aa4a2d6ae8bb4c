"""How every job reaches Ray: the cluster in RAY_ADDRESS (`ray job submit` sets it), the instance this process
already joined, or a fresh local one. Ray is imported on first use, so torch-only hosts can import the callers."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect_ray(**local_options) -> bool:
    """Join the cluster in RAY_ADDRESS (or the one already initialised); else start a local instance with
    `local_options` (ray.init keywords). Returns True when the instance was started here."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return False
    # A fresh local instance in Ray 2.60 enables token auth; it listens on loopback only, so turn it off and say so.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    log.info("starting a local Ray instance (token auth %s)", os.environ["RAY_AUTH_MODE"])
    ray.init(**local_options)
    return True
