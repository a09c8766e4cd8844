"""Prometheus metrics of every unclip server process, defined once.

The gateway serves them at /metrics on its HTTP port; a stage service serves them on its own
metrics port (`unclip serve STAGE --metrics-port`). Names follow Prometheus' conventions: a
unit suffix, `_total` on counters (added by prometheus_client), base units (seconds).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

import unclip

# From a single small network call to a whole generation at Karlo's size on a CPU.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "unclip_requests", "Requests answered, by protocol (grpc, http), method and status code.", ["protocol", "method", "code"]
)
REQUEST_SECONDS = Histogram(
    "unclip_request_duration_seconds", "Time to answer a request, by protocol and method.", ["protocol", "method"],
    buckets=SECONDS_BUCKETS,
)  # fmt: skip
IN_FLIGHT = Gauge("unclip_requests_in_flight", "Requests being answered, by protocol.", ["protocol"])
STAGE_SECONDS = Histogram(
    "unclip_stage_duration_seconds", "Time a pipeline run spent in each stage, as the caller of the stage sees it.",
    ["stage"], buckets=SECONDS_BUCKETS,
)  # fmt: skip
QUEUE_DEPTH = Gauge("unclip_stage_queue_depth", "Calls a stage has accepted and not yet answered.", ["stage"])
NETWORK_ROWS = Histogram(
    "unclip_network_call_rows", "Rows (images x guidance passes) in one network evaluation, padding excluded.", ["stage"],
    buckets=ROWS_BUCKETS,
)  # fmt: skip
MODEL_LOAD_SECONDS = Gauge("unclip_model_load_seconds", "Time the stage's model took to load.", ["stage"])
IMAGES = Counter("unclip_images_generated", "Images answered, by operation.", ["operation"])
BUILD_INFO = Gauge(
    "unclip_build_info", "1, labelled with the unclip version and the weights version a stage serves.",
    ["version", "stage", "weights"],
)  # fmt: skip


def set_build_info(stage: str, weights: str) -> None:
    BUILD_INFO.labels(unclip.__version__, stage, weights).set(1)


@contextmanager
def measured_request(protocol: str, method: str) -> Iterator[list[str]]:
    """Count and time one request. The caller puts its status code in the yielded list; a
    request left without one is counted as INTERNAL (gRPC) or 500 (HTTP)."""
    code: list[str] = []
    IN_FLIGHT.labels(protocol).inc()
    started = time.perf_counter()
    try:
        yield code
    finally:
        IN_FLIGHT.labels(protocol).dec()
        REQUEST_SECONDS.labels(protocol, method).observe(time.perf_counter() - started)
        REQUESTS.labels(protocol, method, code[-1] if code else ("INTERNAL" if protocol == "grpc" else "500")).inc()


async def scrape(request: Any) -> Any:
    """aiohttp handler of GET /metrics: every metric of this process, as Prometheus text."""
    from aiohttp import web

    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})
