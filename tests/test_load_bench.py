"""`unclip bench load` against a gateway on 127.0.0.1 over the shipped stages in this process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from servers import BackgroundServer

from gateway.app import build_gateway
from unclip.load_bench import run_load

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
