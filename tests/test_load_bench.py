"""`unclip bench load` against a gateway on 127.0.0.1 over the shipped stages in this process,
in plaintext and over (mutual) TLS."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from servers import BackgroundServer

from gateway.app import build_gateway
from unclip import certs
from unclip.load_bench import run_load
from unclip.tls import GATEWAY_CLIENT, GATEWAY_SERVER, CertificateDirectory, TlsFiles, channel_credentials

pytestmark = pytest.mark.slow
FAST = dict(prior_steps=2, decoder_steps=2, size=32)


@pytest.fixture(scope="module")
def gateway(local_stages):
    with BackgroundServer(lambda: build_gateway(local_stages, host="127.0.0.1", port=0, http_port=None, storage=None)) as server:
        yield server.address


def test_every_request_is_answered_and_measured(gateway):
    report = asyncio.run(run_load(gateway, concurrency=2, requests=3, n=2, **FAST))
    assert (report.answered, report.images, report.errors) == (3, 6, {})
    assert len(report.latencies_s) == 3 and report.images_per_second > 0
    assert report.percentile(50) <= report.percentile(95) <= report.percentile(99) == max(report.latencies_s)
    figures = report.as_dict()
    assert figures["latency_s"]["p99"] == max(report.latencies_s) and figures["parameters"]["n"] == 2


def test_failures_are_counted_by_status_code(gateway):
    report = asyncio.run(run_load(gateway, concurrency=2, requests=2, decoder_steps=0, size=32))
    assert (report.answered, report.errors) == (0, {"INVALID_ARGUMENT": 2})
    assert report.percentile(50) is None and "INVALID_ARGUMENT 2" in report.table()


def test_an_open_loop_offers_requests_at_the_rate(gateway):
    report = asyncio.run(run_load(gateway, concurrency=3, requests=3, rate=2.0, **FAST))
    assert report.answered == 3 and report.seconds >= 1.0  # started at 0, 0.5 and 1 s


def test_the_command_prints_and_writes_its_figures(gateway, tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, "-m", "unclip", "bench", "load", "--server", gateway, "--concurrency", "2", "--requests", "2",
         "--steps", "2", "--size", "32", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "answered   2 of 2" in done.stdout and "p95" in done.stdout
    figures = json.loads(out.read_text())
    assert figures["answered"] == 2 and figures["errors"] == {} and len(figures["latencies_s"]) == 2


@pytest.fixture(scope="module")
def tls_gateway(local_stages, tmp_path_factory):
    """A gateway whose public endpoint serves TLS and asks for a client certificate its CA signed."""
    path = tmp_path_factory.mktemp("load-tls") / "certs"
    certs.init(path)
    files = CertificateDirectory(path)
    public = TlsFiles(*files.pair(GATEWAY_SERVER), ca=files.ca)
    make = lambda: build_gateway(local_stages, host="127.0.0.1", port=0, http_port=None, storage=None, tls=public)
    with BackgroundServer(make) as server:
        yield server.address, files


def test_the_command_loads_a_gateway_that_serves_tls(tls_gateway, tmp_path):
    address, files = tls_gateway
    client_cert, client_key = files.pair(GATEWAY_CLIENT)
    argv = [sys.executable, "-m", "unclip", "bench", "load", "--server", address, "--concurrency", "2",
            "--requests", "2", "--steps", "2", "--size", "32", "--json", str(tmp_path / "load.json")]  # fmt: skip
    mutual = ["--tls-ca", str(files.ca), "--tls-cert", str(client_cert), "--tls-key", str(client_key)]
    done = subprocess.run([*argv, *mutual], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "answered   2 of 2" in done.stdout
    assert json.loads((tmp_path / "load.json").read_text())["errors"] == {}
    # Without the client certificate the gateway's handshake refuses every request: counted, exit code 1.
    refused = subprocess.run([*argv, "--tls-ca", str(files.ca)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "answered   0 of 2" in refused.stdout, refused.stderr
    assert json.loads((tmp_path / "load.json").read_text())["errors"] == {"UNAVAILABLE": 2}
    # Half a client certificate is one line, not a traceback.
    half = subprocess.run([*argv, "--tls-ca", str(files.ca), "--tls-cert", str(client_cert)], capture_output=True, text=True)
    assert half.returncode == 1 and half.stderr.startswith("unclip bench load:") and "its key" in half.stderr


def test_run_load_takes_channel_credentials(tls_gateway):
    address, files = tls_gateway
    credentials = channel_credentials(ca=files.ca, cert=files.pair(GATEWAY_CLIENT)[0], key=files.pair(GATEWAY_CLIENT)[1])
    report = asyncio.run(run_load(address, concurrency=1, requests=1, credentials=credentials, **FAST))
    assert (report.answered, report.errors) == (1, {})
    plaintext = asyncio.run(run_load(address, concurrency=1, requests=1, timeout=10, **FAST))
    assert (plaintext.answered, plaintext.errors) == (0, {"UNAVAILABLE": 1})


def test_the_command_sends_an_api_key(local_stages, tmp_path):
    """A gateway with API keys on: the bench's requests are refused without a key, counted as
    UNAUTHENTICATED, and answered with --api-key (or $UNCLIP_API_KEY, which the process list does not show)."""
    from gateway.auth import Access, KeyRing, KeysFile

    keys = tmp_path / "keys.json"
    _, key = KeysFile(keys).create("bench")
    make = lambda: build_gateway(
        local_stages, host="127.0.0.1", port=0, http_port=None, storage=None, access=Access(KeyRing(keys))
    )
    with BackgroundServer(make) as server:
        out = tmp_path / "load.json"
        argv = [sys.executable, "-m", "unclip", "bench", "load", "--server", server.address, "--concurrency", "1",
                "--requests", "2", "--steps", "2", "--size", "32", "--json", str(out)]  # fmt: skip
        refused = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1 and json.loads(out.read_text())["errors"] == {"UNAUTHENTICATED": 2}, refused.stderr
        done = subprocess.run([*argv, "--api-key", key], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "answered   2 of 2" in done.stdout, done.stderr
        from_env = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=os.environ | {"UNCLIP_API_KEY": key})
        assert from_env.returncode == 0 and json.loads(out.read_text())["errors"] == {}, from_env.stderr
