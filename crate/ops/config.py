"""The local stack's configuration (`platform/stack up [--config FILE] [key=value ...]`): the Ray head's ports and
resources, the MLflow server's store, where the stack keeps its state, and what every client exports."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from crate.cluster import LOOPBACK, LOOPBACK_RAY_ENV
from crate.config import Flag, Range
from crate.errors import ConfigError
from crate.objectstore import ARTIFACTS_URI, STORAGE_URI, STORAGE_VAR, client_env

TOKEN_FILE = "ray_token"
RUNS_DIR = "runs"


@dataclass
class RayHeadConfig:
    port: Annotated[int, Range(1, 65535)] = 6379  # GCS
    dashboard_port: Annotated[int, Range(1, 65535)] = 8265  # dashboard + job submission server
    client_port: Annotated[int, Range(1, 65535)] = 10001  # Ray Client (ray://)
    dashboard_agent_port: Annotated[int, Range(1, 65535)] = 52365  # the dashboard's agent on the head node
    num_cpus: Annotated[int | None, Range(0)] = None  # default: every core
    num_gpus: Annotated[int | None, Range(0)] = None  # default: every visible GPU
    object_store_memory_mb: Annotated[int | None, Range(1)] = None  # default: Ray's (30% of RAM)


@dataclass
class MlflowServerConfig:
    port: Annotated[int, Range(1, 65535)] = 5000  # the tracking server (always on loopback)
    backend_store_uri: str | None = None  # default: sqlite:///<dir>/mlflow.db; or postgresql://user:pw@host/db
    artifacts_destination: str | None = None  # default: <dir>/artifacts; or s3://bucket/prefix
    workers: Annotated[int, Range(1)] = 1  # server worker processes (each holds a copy of MLflow)

    def __post_init__(self) -> None:
        scheme = (self.backend_store_uri or "sqlite:").split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "mysql"):
            raise ConfigError("backend_store_uri", f"must be a sqlite://, postgresql:// or mysql:// URI, got "
                                                   f"{self.backend_store_uri!r}")


@dataclass
class ObjectStoreConfig:
    """The local S3 store (crate.objectstore, moto) that a stack of several nodes keeps everything in."""

    enabled: bool | None = None  # default: on when the stack has more than one node
    port: Annotated[int, Range(1, 65535)] = 9000  # the S3 endpoint (on loopback)
    # how often a change is written to <dir>/s3 (and always at `down`)
    snapshot_interval_s: Annotated[float, Range(0, exclusive_low=True)] = 5.0


@dataclass
class StackConfig:
    dir: str = ".stack"  # state, logs, env file, SQLite store and artifacts
    host: str = "127.0.0.1"  # the address Ray binds to: loopback, or one of this machine's (then with token auth)
    # both services must be healthy within this
    startup_timeout_s: Annotated[float, Range(0, exclusive_low=True)] = 180.0
    # Ray nodes: the head and nodes - 1 worker nodes, each a raylet of its own on this machine
    nodes: Annotated[int, Range(1)] = 1
    node_cpus: Annotated[int, Range(1)] = 1  # CPUs of each worker node
    ray: RayHeadConfig = field(default_factory=RayHeadConfig)  # the Ray head
    mlflow: MlflowServerConfig = field(default_factory=MlflowServerConfig)  # the MLflow tracking server
    s3: ObjectStoreConfig = field(default_factory=ObjectStoreConfig)  # the S3 store of a stack of several nodes

    def __post_init__(self) -> None:
        if self.nodes > 1 and not self.loopback:
            raise ConfigError("nodes", "worker nodes of the local stack run on loopback only: use host=127.0.0.1 "
                                       "(other machines join a cluster with `ray start --address`)")
        if self.nodes > 1 and self.s3.enabled is False:
            raise ConfigError("s3.enabled", "a stack of several nodes keeps its runs in the S3 store: no node can "
                                            "read another's disk")
        try:
            unspecified = ipaddress.ip_address(self.host).is_unspecified
        except ValueError:
            unspecified = True
        if unspecified:
            raise ConfigError("host", f"must be one IP address of this machine (127.0.0.1: loopback only; another "
                                      f"one: Ray with token auth), got {self.host!r}")
        ports = {"ray.port": self.ray.port, "ray.dashboard_port": self.ray.dashboard_port,
                 "ray.client_port": self.ray.client_port, "ray.dashboard_agent_port": self.ray.dashboard_agent_port,
                 "mlflow.port": self.mlflow.port, **({"s3.port": self.s3.port} if self.object_store else {})}
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise ConfigError(name, f"port {port} is already used by {seen[port]}")
            seen[port] = name

    @property
    def root(self) -> Path:
        return Path(self.dir).resolve()

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def mlflow_host(self) -> str:
        """MLflow has no auth: it listens on loopback, whatever Ray binds to."""
        return self.host if self.loopback else LOOPBACK

    @property
    def token_path(self) -> Path | None:
        """Ray's auth token, when Ray listens beyond loopback."""
        return None if self.loopback else self.root / TOKEN_FILE

    @property
    def object_store(self) -> bool:
        return self.s3.enabled if self.s3.enabled is not None else self.nodes > 1

    @property
    def s3_endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.s3.port}"

    @property
    def storage_path(self) -> str:
        """Where jobs keep checkpoints, sweep state and interpretability outputs (CRATE_STORAGE_PATH): the bucket
        when the stack has its S3 store, else a folder of the stack."""
        return STORAGE_URI if self.object_store else str(self.root / RUNS_DIR)

    def s3_env(self) -> dict[str, str]:
        """What reaches the S3 store (pyarrow, Ray Train, boto3, MLflow); nothing without one."""
        return client_env(self.s3_endpoint) if self.object_store else {}

    @property
    def ray_address(self) -> str:
        return f"{self.host}:{self.ray.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.ray.dashboard_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.mlflow_host}:{self.mlflow.port}"

    def ray_env(self) -> dict[str, str]:
        """What every Ray process and client needs: on loopback no token (nothing beyond 127.0.0.1 can connect)
        and no multi-node support, which is what keeps Ray from swapping 127.0.0.1 for the host's network
        address; beyond loopback, token auth with the stack's token."""
        env = {"RAY_USAGE_STATS_ENABLED": "0", STORAGE_VAR: self.storage_path} | self.s3_env()
        if self.token_path is None:
            return env | {"RAY_AUTH_MODE": "disabled"} | LOOPBACK_RAY_ENV
        # nodes may join: a loopback setting inherited from the shell must not leak in
        return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                      "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}

    @property
    def backend_store_uri(self) -> str:
        return self.mlflow.backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts_destination(self) -> str:
        if self.mlflow.artifacts_destination:
            return self.mlflow.artifacts_destination
        return ARTIFACTS_URI if self.object_store else str(self.root / "artifacts")

    def exports(self) -> dict[str, str]:
        """What a shell (or a test) exports to use the stack."""
        return {
            "RAY_ADDRESS": self.ray_address,  # drivers (ray.init) and the jobs CLI
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,  # the jobs CLI/SDK prefer it over RAY_ADDRESS
            "MLFLOW_TRACKING_URI": self.tracking_uri,
        } | self.ray_env()


STACK_FLAGS = [Flag("--dir", "dir", "the stack directory", "text", "DIR"),
               Flag("--nodes", "nodes", "Ray nodes (the head and N - 1 worker nodes), an S3 store and MLflow with its "
                                        "artifacts there", metavar="N")]
