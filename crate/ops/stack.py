"""The local stack: a real Ray head and a real MLflow tracking server on loopback, for development.

    platform/stack up                     # or: python -m crate.ops.stack up [--config FILE] [key=value ...]
    source .stack/env                     # RAY_ADDRESS, RAY_API_SERVER_ADDRESS, MLFLOW_TRACKING_URI, RAY_AUTH_MODE,
                                          # CRATE_STORAGE_PATH
    ray job submit --working-dir . -- python jobs/pretrain.py --config smoke
    platform/stack status
    platform/stack down

The same two services the cluster runs (k8s/), as local processes:
- Ray: `ray start --head --block` with every process (GCS, raylet, dashboard and agents, workers) on loopback.
  Ray's token auth is switched off (`RAY_AUTH_MODE=disabled`) because nothing listens beyond 127.0.0.1; the
  cluster keeps it on, and so does the stack when asked to bind Ray to another address (`host=10.0.0.5`): then
  `up` writes a token to `<dir>/ray_token` (mode 0600) and hands its path (`RAY_AUTH_TOKEN_PATH`) to every Ray
  process and, through the env file, to every client; MLflow (no auth of its own) stays on 127.0.0.1.
  Ray gets its own short temp dir, so a plain `ray.init()` elsewhere on the machine never attaches to it.
- Jobs get a persistent storage location, `CRATE_STORAGE_PATH=<dir>/runs`, which `train.storage_path` (so
  checkpoints and sweep state) and the interpretability jobs' outputs default to: what a job submitted with
  `ray job submit --working-dir .` writes there survives `down`/`up` (Ray's uploaded working dir does not), so a
  resubmitted `train.run_name` resumes from its last checkpoint.
- MLflow: `mlflow server --workers 1` with job execution off (it would quadruple the server's memory);
  backend SQLite in the stack dir by default or any SQLAlchemy URI (PostgreSQL), artifacts proxied by the
  server into a local dir by default or an S3-compatible store (`MLFLOW_S3_ENDPOINT_URL` and AWS_* pass through).
- `MLFLOW_TRACKING_URI` reaches every Ray process (drivers and Train workers) the way the cluster injects it into
  every pod. `down` stops exactly the stack's processes (never `ray stop`, which would kill every Ray instance on
  the machine): the services it spawned and all their descendants, snapshotted before the first signal, plus any
  process that points into the stack's Ray temp dir (command line, working directory or open log files) or
  carries `CRATE_STACK_ID` in its environment. Ray's agents rewrite their title and environment, and a job's
  driver runs in a session of its own, so no single marker finds them all; SIGKILL follows a grace period.
- `up` is idempotent: a healthy stack is left alone; a half-dead one is cleaned up and started again.
- `up --nodes N` (`nodes=N`): N - 1 worker nodes join the head (crate.ops.raynode: raylets of their own on
  loopback, `node_cpus` CPUs each, their own temp dir and scratch under the stack's Ray temp dir, the resource
  `crate_worker_node`), and the stack adds an S3 store (crate.objectstore, moto, on `s3.port`; its buckets written
  to `<dir>/s3` at every change and at `down`, reloaded at `up`): jobs keep their runs in
  `s3://crate-checkpoints/runs`, MLflow its artifacts in `s3://crate-mlflow/artifacts`, since no node reads
  another's disk. `s3.enabled=true` adds the store to a single-node stack.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from crate.cli import config_parser, parse_config, setup_logging
from crate.cluster import LOOPBACK
from crate.config import load_config
from crate.errors import ConfigError
from crate.files import write_atomic
from crate.ops.config import STACK_FLAGS, StackConfig
from crate.ops.raynode import WORKER_NODE

log = logging.getLogger(__name__)

STACK_ID_VAR = "CRATE_STACK_ID"
STATE_FILE = "stack.json"
ENV_FILE = "env"


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says why and where the logs are."""


# --------------------------------------------------------------------------------------------------
# State: what `up` started, so `status` and `down` need no config.

@dataclass
class StackState:
    stack_id: str
    config: dict
    ray_temp_dir: str
    pids: dict[str, int] = field(default_factory=dict)  # service -> pid of the process we spawned

    @classmethod
    def load(cls, root: Path) -> "StackState | None":
        path = root / STATE_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self, root: Path) -> None:
        write_atomic(root / STATE_FILE, json.dumps(dataclasses.asdict(self), indent=2))

    def stack_config(self) -> StackConfig:
        return load_config(StackConfig, self.config)


# --------------------------------------------------------------------------------------------------
# Health

def _http_ok(url: str, headers: dict[str, str] | None = None, timeout_s: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(url, headers=headers, timeout=timeout_s).ok
    except requests.RequestException:
        return False


def _auth_headers(config: StackConfig) -> dict[str, str]:
    """The dashboard wants the token when Ray runs with token auth."""
    if config.token_path is None or not config.token_path.is_file():
        return {}
    return {"Authorization": f"Bearer {config.token_path.read_text().strip()}"}


HEALTH: dict[str, Callable[[StackConfig], str]] = {
    "s3": lambda c: f"{c.s3_endpoint}/",  # lists the buckets
    "mlflow": lambda c: f"{c.tracking_uri}/health",
    "ray": lambda c: f"{c.dashboard_url}/api/version",  # served by the dashboard that also hosts the job server
}


def services(config: StackConfig) -> list[str]:
    """The stack's services, in start order: the store first (MLflow writes its artifacts there), worker nodes
    last (they join the head)."""
    return ((["s3"] if config.object_store else []) + ["mlflow", "ray"]
            + [f"node{i}" for i in range(1, config.nodes)])


def _alive(pid: int, stack_id: str) -> bool:
    """The process `pid` runs and is the one this stack started (a recorded pid may have been reused since)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.environ().get(STACK_ID_VAR) == stack_id
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def service_status(state: StackState) -> dict[str, str]:
    """service -> "running" | "unhealthy" | "stopped"."""
    config = state.stack_config()
    status = {}
    for service in services(config):
        pid = state.pids.get(service)
        if pid is None or not _alive(pid, state.stack_id):
            status[service] = "stopped"
        elif service not in HEALTH:  # a worker node: it stops itself when one of its processes dies
            status[service] = "running"
        else:
            status[service] = "running" if _http_ok(HEALTH[service](config), _auth_headers(config)) else "unhealthy"
    return status


def stack_processes(state: StackState) -> list:
    """Every live process of this stack: the services it spawned and all their descendants, and any other process
    that points into the stack's Ray temp dir (command line, working directory, open files) or carries the stack's
    `CRATE_STACK_ID`: a process whose parent is gone, a job driver (Ray starts it in a session of its own), Ray's
    agents (they rewrite their title and their environment, not their open log files)."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for pid in state.pids.values():
        if _alive(pid, state.stack_id):
            root = psutil.Process(pid)
            found.update({p.pid: p for p in [root, *_children(root)]})
    for proc in psutil.process_iter():
        if proc.pid not in found and _belongs(proc, state):
            found[proc.pid] = proc
    return [p for p in found.values() if _running(p)]


def _children(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _belongs(proc, state: StackState) -> bool:
    import psutil

    try:
        if proc.environ().get(STACK_ID_VAR) == state.stack_id:
            return True
        paths = [proc.cwd(), *proc.cmdline(), *(f.path for f in proc.open_files())]
    except psutil.Error:
        return False
    return any(path == state.ray_temp_dir or path.startswith(state.ray_temp_dir + os.sep) for path in paths)


def _running(proc) -> bool:
    """Alive and still the process we found (psutil compares the start time, so a reused pid does not count)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --------------------------------------------------------------------------------------------------
# up / down

def up(config: StackConfig) -> StackState:
    """Start the stack, or leave a healthy one alone. Raises StackError (after cleaning up) on failure."""
    root = config.root
    state = StackState.load(root)
    if state is not None:
        if state.stack_config() == config and set(service_status(state).values()) == {"running"}:
            log.info("the stack in %s is already running", root)
            write_env_file(config)
            return state
        if state.stack_config() != config and stack_processes(state):
            raise StackError(f"a stack with another configuration is running from {root}: run `down` first")
        log.info("cleaning up the previous, not fully running stack in %s", root)
        down(root)
    _check_startable(config)

    (root / "logs").mkdir(parents=True, exist_ok=True)
    if not config.object_store:
        Path(config.storage_path).mkdir(parents=True, exist_ok=True)
    if config.token_path is not None:
        _ensure_token(config.token_path)
    stack_id = uuid.uuid4().hex[:8]
    # Short on purpose: Ray puts unix sockets under it and their paths are limited to 107 bytes.
    ray_temp_dir = tempfile.mkdtemp(prefix=f"crate-stack-{stack_id}-", dir="/tmp")
    state = StackState(stack_id, dataclasses.asdict(config), ray_temp_dir)
    env = _service_env(stack_id)
    ray_env = env | config.ray_env() | {"MLFLOW_TRACKING_URI": config.tracking_uri}
    try:
        if config.object_store:  # first: MLflow's artifacts and the nodes' checkpoints go there
            state.pids["s3"] = _spawn(_s3_command(config), env, root / "logs" / "s3.log")
            state.save(root)
            _wait_healthy(config, state, ["s3"])
        state.pids["mlflow"] = _spawn(_mlflow_command(config), env | config.s3_env()
                                      | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, root / "logs" / "mlflow.log")
        state.save(root)
        state.pids["ray"] = _spawn(_ray_command(config, ray_temp_dir), ray_env, root / "logs" / "ray.log")
        state.save(root)
        _wait_healthy(config, state, ["mlflow", "ray"])
        for node in (service for service in services(config) if service not in HEALTH):
            state.pids[node] = _spawn(_node_command(config, ray_temp_dir, node), ray_env, root / "logs" / f"{node}.log")
        state.save(root)
        _wait_for_nodes(config, state)
    except BaseException:
        down(root)
        raise
    write_env_file(config)
    return state


def down(root: Path, grace_s: float = 10.0) -> bool:
    """Stop every process of the stack in `root`; True if one was running. Idempotent.

    Processes get `grace_s` to exit on SIGTERM, then SIGKILL: after a job has run, Ray's raylet can take half a
    minute to finish on its own, and nothing of value is lost by cutting that short (runs, artifacts and
    checkpoints are already written). What to stop is found before the first signal (the process tree is intact
    then) and again on every round, so a process that loses its parent meanwhile is still found."""
    import psutil

    state = StackState.load(root)
    if state is None:
        return False
    known = {p.pid: p for p in stack_processes(state)}
    was_running = bool(known)

    def remaining() -> list:
        known.update({p.pid: p for p in stack_processes(state) if p.pid not in known})
        return [p for p in known.values() if _running(p)]

    # Ray first, worker nodes before the head (its jobs may still be logging to MLflow). `ray start --block` and
    # crate.ops.raynode stop their own processes in order on SIGTERM; the MLflow CLI does not pass SIGTERM on to its
    # uvicorn child, so that one gets its whole group; the S3 store writes its buckets to disk on SIGTERM.
    nodes = [service for service in state.pids if service.startswith("node")]
    for service, stop in [*((node, _signal) for node in nodes), ("ray", _signal), ("mlflow", _signal_group),
                          ("s3", _signal)]:
        pid = state.pids.get(service)
        if pid is not None and _alive(pid, state.stack_id):
            stop(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (procs := remaining()) and time.monotonic() < deadline:
        psutil.wait_procs(procs, timeout=1.0)
    if procs := remaining():
        log.info("SIGKILL to %d processes still stopping after %.0f s: %s", len(procs), grace_s,
                 ", ".join(sorted({_name(p) for p in procs})))
        for proc in procs:
            _kill(proc)
        psutil.wait_procs(procs, timeout=5.0)
    if procs := remaining():
        raise StackError(f"{len(procs)} processes of the stack survived SIGKILL: "
                         + ", ".join(f"{p.pid} {_name(p)}" for p in procs))
    shutil.rmtree(state.ray_temp_dir, ignore_errors=True)
    (root / STATE_FILE).unlink(missing_ok=True)
    (root / ENV_FILE).unlink(missing_ok=True)
    return was_running


def _name(proc) -> str:
    import psutil

    try:
        return proc.name()
    except psutil.Error:
        return "?"


def _kill(proc) -> None:
    import psutil

    try:
        proc.kill()  # psutil checks that the pid still names the process found
    except psutil.Error:
        pass


def _ensure_token(path: Path) -> None:
    """Ray's auth token for a stack that listens beyond loopback: 256 random bits, readable by this user only."""
    if path.is_file() and path.read_text().strip():
        return
    import secrets

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as token:
        token.write(secrets.token_hex(32))


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group `pid` leads: `_spawn` starts every service in a session of its own."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _check_startable(config: StackConfig) -> None:
    """Fail before starting anything: ports taken, drivers for the chosen stores missing."""
    ports = {"ray.port": (config.host, config.ray.port),
             "ray.dashboard_port": (config.host, config.ray.dashboard_port),
             "ray.client_port": (config.host, config.ray.client_port),
             "ray.dashboard_agent_port": (config.host, config.ray.dashboard_agent_port),
             "mlflow.port": (config.mlflow_host, config.mlflow.port),
             **({"s3.port": (LOOPBACK, config.s3.port)} if config.object_store else {})}
    for name, (host, port) in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                raise ConfigError(name, f"port {port} on {host} is in use or not this machine's; choose another "
                                        f"(e.g. {name}={port + 1})") from None
    needs = {"postgresql": ("psycopg2", "mlflow.backend_store_uri"), "mysql": ("pymysql", "mlflow.backend_store_uri"),
             "s3": ("boto3", "mlflow.artifacts_destination")}
    for uri in (config.backend_store_uri, config.artifacts_destination):
        scheme = uri.split(":", 1)[0].split("+", 1)[0]
        if scheme in needs:
            module, name = needs[scheme]
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(name, f"{scheme} needs the `{module}` package: pip install -e '.[platform]'") from None


def _service_env(stack_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env[STACK_ID_VAR] = stack_id
    # Job entrypoints say `python ...`: it must be this interpreter, with this package installed.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for inherited in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # a stale shell export must not redirect Ray
        env.pop(inherited, None)
    return env


def _mlflow_command(config: StackConfig) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server",
            "--host", config.mlflow_host, "--port", str(config.mlflow.port), "--workers", str(config.mlflow.workers),
            "--backend-store-uri", config.backend_store_uri,
            "--artifacts-destination", config.artifacts_destination]


def _s3_command(config: StackConfig) -> list[str]:
    return [sys.executable, "-m", "crate.objectstore", "--port", str(config.s3.port), "--state-dir",
            str(config.root / "s3"), "--snapshot-interval-s", str(config.s3.snapshot_interval_s)]


def _node_command(config: StackConfig, temp_dir: str, node: str) -> list[str]:
    """A worker node (crate.ops.raynode) with its own Ray temp dir and scratch (TMPDIR) under the stack's temp dir,
    and a custom resource named after it (`node1`, ...) that places a task on exactly this node."""
    scratch = Path(temp_dir) / node
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "crate.ops.raynode", "--address", config.ray_address, "--num-cpus",
            str(config.node_cpus), "--temp-dir", str(scratch), "--tmpdir", str(scratch / "tmp"),
            "--resources", json.dumps({node: 1})]


def _ray_command(config: StackConfig, temp_dir: str) -> list[str]:
    ray = config.ray
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address", config.host, "--port", str(ray.port),
               "--include-dashboard", "true", "--dashboard-host", config.host,
               "--dashboard-port", str(ray.dashboard_port), "--ray-client-server-port", str(ray.client_port),
               "--dashboard-agent-listen-port", str(ray.dashboard_agent_port),
               "--temp-dir", temp_dir, "--disable-usage-stats"]
    for flag, value in (("--num-cpus", ray.num_cpus), ("--num-gpus", ray.num_gpus),
                        ("--object-store-memory", ray.object_store_memory_mb and ray.object_store_memory_mb << 20)):
        if value is not None:
            command += [flag, str(value)]
    return command


def _spawn(command: list[str], env: dict[str, str], log_path: Path) -> int:
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return process.pid


def _wait_healthy(config: StackConfig, state: StackState, names: list[str]) -> None:
    deadline = time.monotonic() + config.startup_timeout_s
    pending = {name: HEALTH[name] for name in names}
    while pending:
        for service, health_url in list(pending.items()):
            if not _alive(state.pids[service], state.stack_id):
                raise StackError(f"{service} exited during startup; its log:\n"
                                 f"{_tail(config.root / 'logs' / f'{service}.log')}")
            if _http_ok(health_url(config), _auth_headers(config)):
                log.info("%s is up", service)
                del pending[service]
        if pending and time.monotonic() > deadline:
            raise StackError(f"{', '.join(pending)} not healthy after {config.startup_timeout_s:.0f} s; logs in "
                             f"{config.root / 'logs'}")
        time.sleep(0.5)


def alive_nodes(config: StackConfig) -> int:
    """How many Ray nodes the head's dashboard counts alive (0 when it does not answer)."""
    import requests

    try:
        reply = requests.get(f"{config.dashboard_url}/nodes?view=summary", headers=_auth_headers(config), timeout=5)
        return sum(node["raylet"]["state"] == "ALIVE" for node in reply.json()["data"]["summary"])
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return 0


def _wait_for_nodes(config: StackConfig, state: StackState) -> None:
    deadline = time.monotonic() + config.startup_timeout_s
    while alive_nodes(config) < config.nodes:
        for node in (name for name in state.pids if name.startswith("node")):
            if not _alive(state.pids[node], state.stack_id):
                raise StackError(f"{node} exited during startup; its log:\n{_tail(config.root / 'logs' / f'{node}.log')}")
        if time.monotonic() > deadline:
            raise StackError(f"{alive_nodes(config)} of {config.nodes} Ray nodes alive after "
                             f"{config.startup_timeout_s:.0f} s; logs in {config.root / 'logs'}")
        time.sleep(0.5)
    log.info("%d Ray nodes are up", config.nodes)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def write_env_file(config: StackConfig) -> Path:
    path = config.root / ENV_FILE
    write_atomic(path, "".join(f"export {key}={value}\n" for key, value in config.exports().items()))
    return path


# --------------------------------------------------------------------------------------------------
# CLI

def describe(root: Path) -> tuple[str, int]:
    """A status report and its exit code: 0 all running, 1 degraded, 3 not running (as LSB init scripts)."""
    state = StackState.load(root)
    if state is None:
        return f"no stack in {root}", 3
    config = state.stack_config()
    status = service_status(state)
    lines = [
        f"ray     {status['ray']:<9} pid {state.pids.get('ray')}  GCS {config.ray_address}, "
        f"dashboard + jobs {config.dashboard_url}",
        f"mlflow  {status['mlflow']:<9} pid {state.pids.get('mlflow')}  {config.tracking_uri}  "
        f"(store {config.backend_store_uri}, artifacts {config.artifacts_destination})",
        *([f"s3      {status['s3']:<9} pid {state.pids.get('s3')}  {config.s3_endpoint}  (buckets kept in "
            f"{config.root / 's3'})"] if config.object_store else []),
        *(f"{node:<7} {status[node]:<9} pid {state.pids.get(node)}  Ray worker node ({config.node_cpus} CPUs, "
          f"resources {WORKER_NODE}, {node})" for node in services(config) if node.startswith("node")),
        f"runs    {config.storage_path}  (CRATE_STORAGE_PATH: checkpoints, sweeps, interp outputs; kept by down)",
        "auth    Ray " + (f"token in {config.token_path}" if config.token_path else "off (loopback only)")
        + ", MLflow none (loopback only)",
        f"env     source {root / ENV_FILE}",
    ]
    values = set(status.values())
    return "\n".join(lines), 0 if values == {"running"} else 3 if values == {"stopped"} else 1


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = config_parser(StackConfig, "A real Ray head and MLflow server on loopback (docs/platform.md).",
                           flags=STACK_FLAGS, commands=("up", "down", "status"), prog="platform/stack")
    config, args = parse_config(StackConfig, parser.description, argv, flags=STACK_FLAGS, parser=parser)
    if args.command == "status":
        report, code = describe(config.root)
        print(report)
        return code
    if args.command == "down":
        try:
            print("stopped" if down(config.root) else f"no stack was running in {config.root}")
        except StackError as error:
            print(f"{parser.prog}: {error}", file=sys.stderr)
            return 1
        return 0
    try:
        up(config)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: {error}\n")
    except StackError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 1
    print(describe(config.root)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
