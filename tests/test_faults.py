"""`unclip serve all` under faults, on 127.0.0.1: a stage killed mid-request, a stalled stage,
the object store gone, a client that hangs up, the gateway told to stop mid-request. The test
starts serve all (with SeaweedFS as its store), finds each service's process by its port, and
hurts it with signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from conftest import FAST_STEPS
from s3server import running_s3_server
from scrape import scrape, value
from servers import serve_all_process
from test_e2e import _free_port_block

from unclip.client import Client, UnclipError
from unclip.launcher import check_health
from unclip.stage import Stage

pytestmark = pytest.mark.slow

PROMPT = "a blue square in the middle"
# Enough decoder steps that a request is still in the decoder a second after it was sent.
SLOW = dict(prior_steps=2, decoder_steps=200, upsampler_steps=1, size=32)


def _pid_listening(port: int) -> int:
    """The pid of the process listening on 127.0.0.1:port (from /proc: no psutil here)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            return int(entry.name)
    raise LookupError(f"nothing listens on port {port}")


class Cluster:
    def __init__(self, port: int, process: subprocess.Popen, output: list[str], s3) -> None:
        self.port, self.process, self.output, self.s3 = port, process, output, s3
        self.address = f"127.0.0.1:{port}"

    def stage_address(self, stage: Stage) -> str:
        return f"127.0.0.1:{stage.port_next_to(self.port)}"

    def wait(self, condition, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s\n" + "".join(self.output[-30:])
            time.sleep(0.2)

    def objects(self, prefix: str = "") -> list[str]:
        client = self.s3.client()
        if not client.bucket_exists("unclip"):  # made at the first save
            return []
        return sorted(o.object_name for o in client.list_objects("unclip", prefix=prefix, recursive=True))


@pytest.fixture(scope="module")
def cluster():
    port = _free_port_block(10)
    with ExitStack() as stack:
        s3 = stack.enter_context(running_s3_server())
        env = os.environ | {"UNCLIP_S3_ENDPOINT": s3.endpoint, "UNCLIP_S3_ACCESS_KEY": s3.access_key,
                            "UNCLIP_S3_SECRET_KEY": s3.secret_key}  # fmt: skip
        args = ["--http-port", str(port + 5), "--metrics-port", str(port + 5), "--shutdown-grace", "20"]
        process, output = stack.enter_context(serve_all_process(args, port, env=env, stop_timeout=90))
        yield Cluster(port, process, output, s3)


def test_a_killed_stage_fails_its_request_and_comes_back(cluster):
    decoder = cluster.stage_address(Stage.DECODER)
    pid = _pid_listening(Stage.DECODER.port_next_to(cluster.port))
    with Client(cluster.address, timeout=60, retries=0) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.generate, PROMPT, seed=1, idempotency_key="killed-1", response_format="url", **SLOW)
        time.sleep(2.0)  # in the decoder by now
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(UnclipError) as failed:
            pending.result(timeout=60)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 10
    assert "127.0.0.1" not in str(failed.value.details)  # no internal addresses in answers
    assert not cluster.objects("results/")  # nothing stored for the failed request
    # The gateway says so while the decoder is gone, and the launcher starts it again.
    cluster.wait(lambda: not check_health(cluster.address, timeout=1.0), "gateway NOT_SERVING", 30)
    cluster.wait(lambda: check_health(decoder, timeout=1.0), "decoder restarted")
    cluster.wait(lambda: check_health(cluster.address, timeout=1.0), "gateway SERVING again", 30)
    assert any("decoder exited with code -9; starting it again" in line for line in cluster.output)
    assert _pid_listening(Stage.DECODER.port_next_to(cluster.port)) != pid
    # The SDK's retry with the same idempotency key now succeeds, and is stored once.
    with Client(cluster.address, timeout=120) as client:
        first = client.generate(PROMPT, seed=1, idempotency_key="killed-1", response_format="url", **SLOW)
        again = client.generate(PROMPT, seed=1, idempotency_key="killed-1", response_format="url", **SLOW)
    assert first[0].request_id == again[0].request_id
    stored = [key.rsplit("/", 1)[1] for key in cluster.objects(f"results/{first[0].request_id}/")]
    assert sorted(name for name in stored if name != "lease.json") == ["image-0.png", "record.json"]  # once


def test_a_stalled_stage_is_a_deadline_exceeded(cluster):
    pid = _pid_listening(Stage.PRIOR.port_next_to(cluster.port))
    os.kill(pid, signal.SIGSTOP)
    try:
        with Client(cluster.address, timeout=4, retries=0) as client, pytest.raises(UnclipError) as failed:
            client.generate(PROMPT, seed=2, size=32, **FAST_STEPS)
        assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        os.kill(pid, signal.SIGCONT)
    with Client(cluster.address, timeout=60) as client:
        assert client.generate(PROMPT, seed=2, size=32, **FAST_STEPS)[0].width == 32


def test_a_client_that_hangs_up_cancels_the_stage_work(cluster):
    """Over HTTP: the gateway cancels the request's work, and the decoder sees the call cancelled."""
    decoder_metrics = f"127.0.0.1:{Stage.DECODER.port_next_to(cluster.port + 5)}"
    before = value(scrape(decoder_metrics), "unclip_requests_total", protocol="grpc", method="Decode", code="CANCELLED")
    body = json.dumps({"prompt": PROMPT, "response_format": "b64_json", "seed": 3, **SLOW, "size": "32x32"}).encode()
    with socket.create_connection(("127.0.0.1", cluster.port + 5), timeout=10) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        time.sleep(2.0)  # in the decoder by now
    cluster.wait(
        lambda: (
            value(scrape(decoder_metrics), "unclip_requests_total", protocol="grpc", method="Decode", code="CANCELLED") > before
        ),
        "the decoder's call cancelled",
        30,
    )


def test_without_the_object_store_images_still_come_and_urls_do_not(cluster):
    with Client(cluster.address, timeout=120) as client:  # the bucket exists: the saves below fail mid-write
        client.generate(PROMPT, seed=4, size=32, response_format="url", **FAST_STEPS)
    cluster.s3.process.send_signal(signal.SIGSTOP)  # the store stops answering
    try:
        with Client(cluster.address, timeout=120, retries=0) as client:
            images = client.generate(PROMPT, seed=4, size=32, **FAST_STEPS)
            assert images[0].png  # answered in full; the record is skipped with a warning
            with pytest.raises(UnclipError) as failed:
                client.generate(PROMPT, seed=5, size=32, response_format="url", **FAST_STEPS)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert "object store is unavailable" in failed.value.details
        assert cluster.s3.endpoint not in failed.value.details and "unclip" not in failed.value.details.split(":")[-1]
    finally:
        cluster.s3.process.send_signal(signal.SIGCONT)

    # Once the store is back, no object is left without its result's record: the failed saves'
    # objects, and puts that timed out but landed when the store resumed, are removed by the
    # store's retries of their cleanup (never served meanwhile: no record points at them).
    def without_record() -> list[str]:
        keys = cluster.objects("results/")
        complete = {key.rsplit("/", 1)[0] for key in keys if key.endswith("/record.json")}  # results/<id>
        return [key for key in keys if "/".join(key.split("/")[:2]) not in complete]

    cluster.wait(lambda: not without_record(), "objects without a record removed", 90)
    assert any("removing them again in the background" in line for line in cluster.output)


def test_a_gateway_told_to_stop_finishes_its_request(cluster):
    pid = _pid_listening(cluster.port)
    with Client(cluster.address, timeout=120, retries=0) as client, ThreadPoolExecutor(1) as pool:
        # Well inside the 20 s grace serve all was given, even on a busy machine.
        pending = pool.submit(client.generate, PROMPT, seed=6, **(SLOW | {"decoder_steps": 40}))
        time.sleep(1.0)
        os.kill(pid, signal.SIGTERM)
        images = pending.result(timeout=120)
    assert images[0].width == 32
    # It refused new work meanwhile, exited, and the launcher started it again.
    cluster.wait(lambda: any("gateway exited with code 0" in line for line in cluster.output), "gateway exited", 60)
    cluster.wait(lambda: check_health(cluster.address, timeout=1.0), "gateway back", 120)
