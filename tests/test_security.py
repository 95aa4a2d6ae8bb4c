"""No open door: every Ray instance the platform starts on this machine listens on loopback only, in every one of
its processes (GCS, raylet and its object manager, dashboard and its agents, runtime-env agent, workers), not
only in the driver. The local stack's instance is checked the same way in tests/test_stack.py."""

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration  # Ray instances and training in subprocesses, their sockets scanned

REPO = Path(__file__).resolve().parents[1]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:  # ::ffff:127.0.0.1
        address = address.ipv4_mapped
    return address.is_loopback


def session_processes(session_dir: str, roots: list[int]) -> dict[int, psutil.Process]:
    """Every live process of the Ray session in `session_dir`: the roots and all their descendants, and any process
    whose command line, working directory or open files point into the session (a process that outlived or left
    its parent; Ray's agents rewrite their title and environment, not their open log files)."""
    found: dict[int, psutil.Process] = {}
    for pid in roots:
        root = psutil.Process(pid)
        found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
    for proc in psutil.process_iter():
        try:
            paths = [proc.cwd(), *proc.cmdline(), *(f.path for f in proc.open_files())]
        except psutil.Error:
            continue
        if any(session_dir in path for path in paths):
            found.setdefault(proc.pid, proc)
    return found


def listening_sockets(processes: dict[int, psutil.Process]) -> list[tuple[str, str]]:
    """(process, address) of every TCP socket listening and every UDP socket bound by these processes."""
    sockets = []
    for proc in processes.values():
        try:
            name = f"{proc.pid} {proc.name()}"
            connections = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN or (conn.type == 2 and conn.laddr and not conn.raddr):  # SOCK_DGRAM
                sockets.append((name, f"{conn.laddr.ip}:{conn.laddr.port}"))
    return sockets


def assert_loopback_only(session_dir: str, roots: list[int], expect: tuple[str, ...]) -> None:
    processes = session_processes(session_dir, roots)
    names = " ".join(p.name() for p in processes.values())
    for part in expect:  # the collection found the session's processes, not only the driver
        assert part in names, f"no {part} among the session's processes: {names}"
    sockets = listening_sockets(processes)
    assert len(sockets) >= len(expect), sockets
    exposed = [f"{name} on {address}" for name, address in sockets if not is_loopback(address.rsplit(":", 1)[0])]
    assert not exposed, f"{len(exposed)} of {len(sockets)} sockets not on loopback: " + "; ".join(exposed)


RAY_PROCESSES = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent")

INTERPRETABILITY_ACTORS = """
import json, os, sys
import ray
from crate.interp.config import BackendConfig, WorkersConfig
from crate.interp.distributed import ScoringPool

pool = ScoringPool(BackendConfig(), WorkersConfig(actors=1, concurrency=1, cpus_per_actor=0.5), seed=0)
print(json.dumps({"session": ray._private.worker._global_node.get_session_dir_path(), "pid": os.getpid()}), flush=True)
sys.stdin.readline()
"""


def test_interpretability_actors_instance_listens_on_loopback_only():
    """The scoring pool's actors reach Ray through crate.cluster.connect_ray: a fresh process starts its instance."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PYTHONPATH": str(REPO)}
    job = subprocess.Popen([sys.executable, "-c", INTERPRETABILITY_ACTORS], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = job.stdout.readline()
        assert line, f"the actors' process exited with {job.wait(60)}"
        started = json.loads(line)
        assert_loopback_only(started["session"], [started["pid"]], RAY_PROCESSES + ("ray::ScoringWorker",))
    finally:
        job.communicate("\n", timeout=120)


def test_local_instance_listens_on_loopback_only(ray_cluster):
    """The fixture's instance is a job's local instance (connect_ray), with a task's worker and an actor running."""
    import ray

    @ray.remote(num_cpus=0.5)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0.5)
    def task_pid() -> int:
        return os.getpid()

    probe = Probe.remote()
    assert ray.get(probe.pid.remote()) != os.getpid() != ray.get(task_pid.remote())
    session = ray._private.worker._global_node.get_session_dir_path()
    assert_loopback_only(session, [os.getpid()], RAY_PROCESSES + ("ray::Probe",))
    ray.kill(probe)


SINGLE_PROCESS_TRAINING = """
import psutil, sys
from crate.config import load_config
from crate.train import PretrainConfig, launch
launch(load_config(PretrainConfig, "smoke", ["train.launcher=local", "data.engine=local", "train.max_steps=2",
                                             f"train.storage_path={sys.argv[1]}", f"tracking.uri=sqlite:///{sys.argv[1]}/m.db"]))
print([f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections("inet") if c.status == "LISTEN"])
"""


def test_single_process_training_listens_on_loopback_only(tmp_path):
    """torch.distributed's env:// rendezvous store listens on every interface ('::'), whatever MASTER_ADDR says;
    the single-process runtime's DeepSpeed group rendezvous through a file instead."""
    import ast
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SINGLE_PROCESS_TRAINING, str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    listening = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    exposed = [a for a in listening if not is_loopback(a.rsplit(":", 1)[0])]
    assert not exposed, f"listening beyond loopback after training: {exposed}"


def test_ray_train_workers_listen_on_loopback_only(ray_cluster, tmp_path):
    """A two-worker Ray Train run, scanned while it trains: torch.distributed's rendezvous store on rank 0 and
    gloo's connections of every rank, beside Ray's own processes."""
    import threading

    import ray

    from crate.config import load_config
    from crate.train import PretrainConfig, launch

    session = ray._private.worker._global_node.get_session_dir_path()
    seen: set[tuple[str, str]] = set()  # (process, address), over the whole run
    done = threading.Event()

    def scan() -> None:
        while not done.wait(0.5):
            seen.update(listening_sockets(session_processes(session, [os.getpid()])))

    scanner = threading.Thread(target=scan, daemon=True)
    scanner.start()
    try:
        launch(load_config(PretrainConfig, "smoke", [
            "train.num_workers=2", "train.cpus_per_worker=0.5", "data.read_cpus=0.25", "train.max_steps=4",
            "train.checkpoint_interval=4", "train.controller_failure_limit=0", "tracking.system_metrics=false",
            f"train.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]))
    finally:
        done.set()
        scanner.join()
    assert any("RayTrainWorker" in name for name, _ in seen), seen  # the scan saw the workers' own sockets
    exposed = sorted(f"{name} on {address}" for name, address in seen if not is_loopback(address.rsplit(":", 1)[0]))
    assert not exposed, f"{len(exposed)} of {len(seen)} sockets not on loopback: " + "; ".join(exposed)
