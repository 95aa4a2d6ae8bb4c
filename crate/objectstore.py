"""The S3-compatible object store every node shares: its settings in one place, and a local one on loopback.

On a cluster of several nodes, checkpoints, sweep state, interpretability outputs and MLflow artifacts live in
an object store, because no node can read another's disk. The names below are the only place the buckets, their
URIs and the environment variables that point clients at the store are spelled: the code, the tests, the local
stack (`platform/stack up --nodes N`) and the KubeRay manifests (k8s/, checked by tests/test_platform.py) use them.
Clients (pyarrow, which Ray Train and every job use; boto3, which MLflow uses) take the endpoint and credentials
from the environment, so a job needs nothing but `train.storage_path=s3://...` and these variables.

`LocalObjectStore` is a real S3 server on 127.0.0.1 (moto's, the one Ray's own tests use for S3 storage) with the
buckets created: tests start it in-process; `python -m crate.objectstore --state-dir DIR` runs it as a service
(the stack does), restoring the buckets from DIR at start and writing them back there at every change (checked
every `snapshot_interval_s`) and at exit, since moto keeps its objects in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

CHECKPOINT_BUCKET = "crate-checkpoints"  # Ray Train checkpoints, sweep state, interpretability outputs
ARTIFACT_BUCKET = "crate-mlflow"  # the MLflow server's artifact root
BUCKETS = (CHECKPOINT_BUCKET, ARTIFACT_BUCKET)
STORAGE_URI = f"s3://{CHECKPOINT_BUCKET}/runs"  # CRATE_STORAGE_PATH on a cluster: train.storage_path's default
ARTIFACTS_URI = f"s3://{ARTIFACT_BUCKET}/artifacts"  # MLFLOW_ARTIFACTS_DESTINATION

STORAGE_VAR = "CRATE_STORAGE_PATH"  # where jobs keep checkpoints and outputs (a path every node sees, or a URI)
ARTIFACTS_VAR = "MLFLOW_ARTIFACTS_DESTINATION"  # the MLflow server's artifact root
ENDPOINT_VAR = "AWS_ENDPOINT_URL"  # pyarrow, boto3 and so Ray Train: the store's URL (unset: AWS itself)
MLFLOW_ENDPOINT_VAR = "MLFLOW_S3_ENDPOINT_URL"  # MLflow's own name for it
ACCESS_KEY_VAR = "AWS_ACCESS_KEY_ID"
SECRET_KEY_VAR = "AWS_SECRET_ACCESS_KEY"
REGION_VAR = "AWS_DEFAULT_REGION"
CREDENTIALS_SECRET = "crate-s3"  # the Kubernetes Secret holding ACCESS_KEY_VAR and SECRET_KEY_VAR
CREDENTIAL_VARS = (ACCESS_KEY_VAR, SECRET_KEY_VAR)

LOCAL_ACCESS_KEY = "crate-local"  # moto accepts any; these name the local store in logs and env files
LOCAL_SECRET_KEY = "crate-local-secret"
LOCAL_REGION = "us-east-1"
MANIFEST = "manifest.json"  # in a state dir: every object's bucket, key and ETag


def client_env(endpoint: str, access_key: str = LOCAL_ACCESS_KEY, secret_key: str = LOCAL_SECRET_KEY,
               region: str = LOCAL_REGION) -> dict[str, str]:
    """What a process exports to reach the store at `endpoint` (pyarrow, Ray Train, boto3, MLflow)."""
    return {ENDPOINT_VAR: endpoint, MLFLOW_ENDPOINT_VAR: endpoint, ACCESS_KEY_VAR: access_key,
            SECRET_KEY_VAR: secret_key, REGION_VAR: region}


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for `uri`; an `s3://` one reaches the store named by the environment
    (ENDPOINT_VAR and the credentials), plain HTTP for a loopback endpoint."""
    import pyarrow.fs

    if not uri.startswith("s3://"):
        return pyarrow.fs.FileSystem.from_uri(uri)
    endpoint = os.environ.get(ENDPOINT_VAR)
    options = {"region": os.environ.get(REGION_VAR, LOCAL_REGION)}
    if endpoint:
        scheme, _, address = endpoint.partition("://")
        options |= {"endpoint_override": address or scheme, "scheme": scheme if address else "https"}
    return pyarrow.fs.S3FileSystem(**options), uri.removeprefix("s3://").rstrip("/")


def list_files(uri: str) -> list[str]:
    """Every file under `uri`, as paths relative to it, sorted."""
    import pyarrow.fs

    fs, root = filesystem(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(info.path[len(root) + 1:] for info in infos if info.type == pyarrow.fs.FileType.File)


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


class LocalObjectStore:
    """moto's S3 server on 127.0.0.1 in a thread of this process, with `buckets` created."""

    def __init__(self, port: int = 0, buckets: Sequence[str] = BUCKETS):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.buckets = tuple(buckets)
        for bucket in self.buckets:
            self.client().create_bucket(Bucket=bucket)

    @property
    def env(self) -> dict[str, str]:
        return client_env(self.endpoint)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=LOCAL_ACCESS_KEY,
                            aws_secret_access_key=LOCAL_SECRET_KEY, region_name=LOCAL_REGION)

    def objects(self) -> dict[tuple[str, str], str]:
        """(bucket, key) -> ETag of every object."""
        client, found = self.client(), {}
        for bucket in (b["Name"] for b in client.list_buckets()["Buckets"]):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                found.update({(bucket, o["Key"]): o["ETag"] for o in page.get("Contents", [])})
        return found

    def save(self, state_dir: Path, previous: dict[tuple[str, str], str] | None = None) -> dict[tuple[str, str], str]:
        """Write every bucket into `state_dir` (objects changed since `previous` only) and return what was saved.
        The manifest is replaced last, atomically: a save cut short leaves the previous state readable."""
        objects, previous = self.objects(), previous or {}
        client, files = self.client(), state_dir / "objects"
        for (bucket, key), etag in objects.items():
            target = files / bucket / key
            if previous.get((bucket, key)) != etag and not key.endswith("/"):  # "dir/": pyarrow's folder markers
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(target))
        for bucket, key in previous.keys() - objects.keys():
            (files / bucket / key).unlink(missing_ok=True)
        manifest = {"buckets": sorted({b["Name"] for b in client.list_buckets()["Buckets"]}),
                    "objects": [[bucket, key, etag] for (bucket, key), etag in sorted(objects.items())]}
        tmp = state_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, state_dir / MANIFEST)
        return objects

    def restore(self, state_dir: Path) -> dict[tuple[str, str], str]:
        """Load the buckets saved in `state_dir` (nothing if it holds none); returns what was loaded."""
        manifest_file = state_dir / MANIFEST
        if not manifest_file.is_file():
            return {}
        manifest, client = json.loads(manifest_file.read_text()), self.client()
        existing = {b["Name"] for b in client.list_buckets()["Buckets"]}
        for bucket in set(manifest["buckets"]) - existing:
            client.create_bucket(Bucket=bucket)
        for bucket, key, _ in manifest["objects"]:
            if key.endswith("/"):
                client.put_object(Bucket=bucket, Key=key, Body=b"")
            else:
                client.upload_file(str(state_dir / "objects" / bucket / key), bucket, key)
        log.info("restored %d objects from %s", len(manifest["objects"]), state_dir)
        return self.objects()

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> "LocalObjectStore":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(port: int, state_dir: Path, snapshot_interval_s: float = 5.0) -> None:
    """Run the local store until SIGTERM/SIGINT, its buckets kept in `state_dir` (see the module docstring)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    store = LocalObjectStore(port)
    saved = store.restore(state_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("S3 store on %s, state in %s", store.endpoint, state_dir)
    print(f"serving {store.endpoint}", flush=True)
    while not stop.wait(snapshot_interval_s):
        if store.objects() != saved:
            saved = store.save(state_dir, saved)
    store.save(state_dir, saved)
    store.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crate.objectstore",
                                     description="A local S3 store on 127.0.0.1 whose buckets persist in a folder.")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--snapshot-interval-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.port, args.state_dir, args.snapshot_interval_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
