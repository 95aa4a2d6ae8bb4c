"""Shared fixtures and the test tiers.

Ray: one instance per test module (2 CPUs, a small object store), started the way every job starts its local
instance (crate.cluster.connect_ray: loopback only), shut down at its end.

Tiers (markers declared in pyproject.toml): `integration` tests start Ray, DeepSpeed, servers or subprocess jobs;
`e2e` tests drive the local stack, a browser or kubectl. Everything else is the fast tier, the inner loop:
`platform/test -m "not integration and not e2e"`. The guard below keeps it fast: an unmarked test that starts a
process (Ray's, a job's, a server's, a browser's; git alone is allowed) fails, naming the marker it lacks.
"""

import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIERS = ("integration", "e2e")
ALLOWED_IN_FAST_TIER = {"git", "uname"}  # read the checkout, the host (provenance); nothing that lasts
_unmarked_test: list[str] = []  # the node id of the unmarked test running now (empty: none)


def _refuse_processes_in_the_fast_tier(event: str, args: tuple) -> None:
    if event in ("subprocess.Popen", "os.fork", "os.posix_spawn") and _unmarked_test:
        program = Path(str(args[0] or args[1][0])).name if event == "subprocess.Popen" else event
        if program not in ALLOWED_IN_FAST_TIER:
            raise RuntimeError(f"{_unmarked_test[0]} starts a process ({program}) but is not marked "
                               f"integration or e2e (mark it, or the fast tier stops being fast)")


sys.addaudithook(_refuse_processes_in_the_fast_tier)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    unmarked = not any(item.get_closest_marker(tier) for tier in TIERS)
    if unmarked:
        _unmarked_test.append(item.nodeid)
    try:
        return (yield)
    finally:
        if unmarked:
            _unmarked_test.clear()

# What connect_ray exports for the instance it starts; restored when a module's instance is gone, so later
# modules' subprocesses (the stack, the jobs) never look for a dead instance.
RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "CRATE_RAY_STARTED_HERE")


@pytest.fixture(scope="module")
def ray_cluster(request):
    """The module's Ray instance; yields its GCS address (what RAY_ADDRESS takes). A module that runs Tune with
    Train sets `RAY_DASHBOARD = True`: Ray Train frees a stopped trial's placement group through the State API,
    which the dashboard serves (without it the next trial waits forever)."""
    import ray

    from crate.cluster import connect_ray

    os.environ.pop("RAY_ADDRESS", None)  # a shell that sourced a stack's env must not send the tests there
    saved = {key: os.environ.get(key) for key in RAY_ENV}
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")  # 2 busy cores start workers slowly
    assert connect_ray(num_cpus=2, object_store_memory=200 * 2**20,
                       include_dashboard=getattr(request.module, "RAY_DASHBOARD", False)), "Ray was already initialised"
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    gc.collect()  # close abandoned data streams (their Ray Data executors) while Ray is still up
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def copy_repository(target: Path) -> Path:
    """The repository as a clone of it holds it, uncommitted work included (tracked and untracked, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="session")
def repository_copy():
    """`repository_copy(target)`: a fresh copy of the repository at `target`, as a user's clone would be."""
    return copy_repository
