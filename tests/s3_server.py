"""A real S3-compatible server for the tests: moto's standalone server (`moto[server]`, from
PyPI), started as its own process on 127.0.0.1, so that the sweep's processes (Ray workers
included) reach it over HTTP as they would reach S3. Nothing of our own code is mocked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups (seconds of timeouts)
}
"""The environment a client of the test server needs (moto accepts any credentials)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's S3 server on a free port of 127.0.0.1; yields its `host:port`."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **S3_ENV},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)  # noqa: S310
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def bucket_uri(endpoint: str, bucket: str, prefix: str = "sweeps") -> str:
    """The `storage_path` of a prefix in a bucket of the test server (created if missing)."""
    import pyarrow.fs

    query = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
    fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{bucket}?{query}&allow_bucket_creation=true")
    fs.create_dir(bucket)
    return f"s3://{bucket}/{prefix}?{query}"
