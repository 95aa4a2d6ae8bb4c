"""The local S3 store (crate.objectstore): real S3 on loopback that pyarrow (so Ray Train) and boto3 reach through
the environment alone, and whose buckets survive a restart of the service."""

import os
import signal
import subprocess
import sys
import time

import pytest

from crate.objectstore import (BUCKETS, CHECKPOINT_BUCKET, ENDPOINT_VAR, STORAGE_URI, LocalObjectStore, client_env,
                               filesystem, list_files, read_text)
from ports import free_port

pytestmark = pytest.mark.integration  # a server


def test_pyarrow_reaches_the_store_through_the_environment_alone(monkeypatch):
    import pyarrow.fs

    with LocalObjectStore() as store:
        for key, value in store.env.items():
            monkeypatch.setenv(key, value)
        fs, path = filesystem(f"{STORAGE_URI}/run/a.txt")
        with fs.open_output_stream(path) as out:
            out.write(b"written through crate.objectstore")
        # what Ray Train does with a storage path: pyarrow's own resolution, endpoint from AWS_ENDPOINT_URL
        plain, plain_path = pyarrow.fs.FileSystem.from_uri(f"{STORAGE_URI}/run/b.txt")
        with plain.open_output_stream(plain_path) as out:
            out.write(b"written by plain pyarrow")
        assert list_files(f"{STORAGE_URI}/run") == ["a.txt", "b.txt"]
        assert read_text(f"{STORAGE_URI}/run/b.txt") == "written by plain pyarrow"
        keys = [o["Key"] for o in store.client().list_objects_v2(Bucket=CHECKPOINT_BUCKET)["Contents"]]
        assert {"runs/run/a.txt", "runs/run/b.txt"} <= set(keys)
        assert {b["Name"] for b in store.client().list_buckets()["Buckets"]} == set(BUCKETS)


def start_service(port, state_dir):
    proc = subprocess.Popen([sys.executable, "-m", "crate.objectstore", "--port", str(port), "--state-dir",
                             str(state_dir), "--snapshot-interval-s", "0.5"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("serving http://127.0.0.1:"), "the store did not start"
    return proc


def test_the_service_keeps_its_buckets_across_restarts_and_a_kill(tmp_path, monkeypatch):
    port, state = free_port(), tmp_path / "s3"
    for key, value in client_env(f"http://127.0.0.1:{port}").items():
        monkeypatch.setenv(key, value)
    proc = start_service(port, state)
    try:
        fs, path = filesystem(f"{STORAGE_URI}/kept.txt")
        with fs.open_output_stream(path) as out:
            out.write(b"before a clean stop")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    proc = start_service(port, state)
    try:
        assert read_text(f"{STORAGE_URI}/kept.txt") == "before a clean stop"
        fs, path = filesystem(f"{STORAGE_URI}/second.txt")
        with fs.open_output_stream(path) as out:
            out.write(b"before a kill")
        fs.delete_file(filesystem(f"{STORAGE_URI}/kept.txt")[1])
        time.sleep(2.0)  # several snapshot intervals: the change is on disk before the kill
    finally:
        proc.kill()
        proc.wait(timeout=30)
    proc = start_service(port, state)
    try:
        assert list_files(STORAGE_URI) == ["second.txt"]
        assert os.environ[ENDPOINT_VAR] == f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
