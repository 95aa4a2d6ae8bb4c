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
class StackConfig:
    dir: str = ".stack"  # state, logs, env file, SQLite store and artifacts
    host: str = "127.0.0.1"  # the address Ray binds to: loopback, or one of this machine's (then with token auth)
    # both services must be healthy within this
    startup_timeout_s: Annotated[float, Range(0, exclusive_low=True)] = 180.0
    ray: RayHeadConfig = field(default_factory=RayHeadConfig)  # the Ray head
    mlflow: MlflowServerConfig = field(default_factory=MlflowServerConfig)  # the MLflow tracking server

    def __post_init__(self) -> None:
        try:
            unspecified = ipaddress.ip_address(self.host).is_unspecified
        except ValueError:
            unspecified = True
        if unspecified:
            raise ConfigError("host", f"must be one IP address of this machine (127.0.0.1: loopback only; another "
                                      f"one: Ray with token auth), got {self.host!r}")
        ports = {"ray.port": self.ray.port, "ray.dashboard_port": self.ray.dashboard_port,
                 "ray.client_port": self.ray.client_port, "ray.dashboard_agent_port": self.ray.dashboard_agent_port,
                 "mlflow.port": self.mlflow.port}
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
    def storage_path(self) -> Path:
        """Where jobs keep checkpoints, sweep state and interpretability outputs (CRATE_STORAGE_PATH)."""
        return self.root / RUNS_DIR

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
        env = {"RAY_USAGE_STATS_ENABLED": "0", "CRATE_STORAGE_PATH": str(self.storage_path)}
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
        return self.mlflow.artifacts_destination or str(self.root / "artifacts")

    def exports(self) -> dict[str, str]:
        """What a shell (or a test) exports to use the stack."""
        return {
            "RAY_ADDRESS": self.ray_address,  # drivers (ray.init) and the jobs CLI
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,  # the jobs CLI/SDK prefer it over RAY_ADDRESS
            "MLFLOW_TRACKING_URI": self.tracking_uri,
        } | self.ray_env()


STACK_FLAGS = [Flag("--dir", "dir", "the stack directory", "text", "DIR")]
