"""Prometheus metrics of every unclip server process, defined once.

The gateway serves them at /metrics on its HTTP port; a stage service serves them on its own
metrics port (`unclip serve STAGE --metrics-port`). Names follow Prometheus' conventions: a
unit suffix, `_total` on counters (added by prometheus_client), base units (seconds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

import unclip

# From a single small network call to a whole generation at Karlo's size on a CPU.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Definition:
    """One metric: what both backends (prometheus_client here, ray.serve.metrics under Ray
    Serve) build it from."""

    kind: type  # Counter, Gauge or Histogram (prometheus_client's)
    name: str  # a counter's without "_total", which prometheus_client adds
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None


DEFINITIONS: dict[str, Definition] = {}


def _define(variable: str, kind: type, name: str, help: str, labels: list[str], buckets: tuple[float, ...] | None = None) -> Any:
    DEFINITIONS[variable] = Definition(kind, name, help, tuple(labels), buckets)
    return kind(name, help, labels, **({"buckets": buckets} if buckets else {}))


REQUESTS = _define(
    "REQUESTS", Counter, "unclip_requests", "Requests answered, by protocol (grpc, http), method and status code.",
    ["protocol", "method", "code"],
)  # fmt: skip
REQUEST_SECONDS = _define(
    "REQUEST_SECONDS", Histogram, "unclip_request_duration_seconds", "Time to answer a request, by protocol and method.",
    ["protocol", "method"], SECONDS_BUCKETS,
)  # fmt: skip
IN_FLIGHT = _define("IN_FLIGHT", Gauge, "unclip_requests_in_flight", "Requests being answered, by protocol.", ["protocol"])
STAGE_SECONDS = _define(
    "STAGE_SECONDS", Histogram, "unclip_stage_duration_seconds",
    "Time a pipeline run spent in each stage, as the caller of the stage sees it.", ["stage"], SECONDS_BUCKETS,
)  # fmt: skip
QUEUE_DEPTH = _define(
    "QUEUE_DEPTH", Gauge, "unclip_stage_queue_depth", "Calls a stage has accepted and not yet answered.", ["stage"]
)
NETWORK_ROWS = _define(
    "NETWORK_ROWS", Histogram, "unclip_network_call_rows",
    "Rows (images x guidance passes) in one network evaluation, padding excluded.", ["stage"], ROWS_BUCKETS,
)  # fmt: skip
MODEL_LOAD_SECONDS = _define(
    "MODEL_LOAD_SECONDS", Gauge, "unclip_model_load_seconds", "Time the stage's model took to load.", ["stage"]
)
IMAGES = _define("IMAGES", Counter, "unclip_images_generated", "Images answered, by operation.", ["operation"])
BUILD_INFO = _define(
    "BUILD_INFO", Gauge, "unclip_build_info", "1, labelled with the unclip version and the weights version a stage serves.",
    ["version", "stage", "weights"],
)  # fmt: skip


class _RayMetric:
    """A metric of `ray.serve.metrics` with prometheus_client's `labels(...)` interface, so the
    code that records metrics is the same in both modes. Ray exports it on each node's metrics
    port, named `ray_<name>` and tagged with the Serve application, deployment and replica."""

    def __init__(self, definition: Definition):
        from ray.serve import metrics as ray_metrics

        self.definition = definition
        tags: Any = definition.labels  # ray annotates tag_keys as tuple[str]
        if definition.kind is Counter:
            # Named with "_total" as exported, so Ray does not also export a deprecated gauge.
            self.metric: Any = ray_metrics.Counter(f"{definition.name}_total", definition.help, tag_keys=tags)
        elif definition.kind is Gauge:
            self.metric = ray_metrics.Gauge(definition.name, definition.help, tag_keys=tags)
        else:
            self.metric = ray_metrics.Histogram(definition.name, definition.help, list(definition.buckets or ()), tag_keys=tags)
        self._values: dict[tuple[str, ...], float] = {}  # gauges: Ray's only set, so inc/dec add up here
        self._lock = threading.Lock()

    def labels(self, *values: str) -> _RayLabelled:
        return _RayLabelled(self, tuple(str(v) for v in values))

    def report_again(self) -> None:
        """Set a gauge's current values again (see `use_ray_serve`)."""
        with self._lock:
            current = list(self._values.items())
        for values, value in current:
            self.metric.set(value, tags=dict(zip(self.definition.labels, values, strict=True)))


class _RayLabelled:
    def __init__(self, parent: _RayMetric, values: tuple[str, ...]):
        self.parent = parent
        self.values = values
        self.tags = dict(zip(parent.definition.labels, values, strict=True))

    def inc(self, amount: float = 1.0) -> None:
        if self.parent.definition.kind is Gauge:
            self._add(amount)
        else:
            self.parent.metric.inc(amount, tags=self.tags)

    def dec(self, amount: float = 1.0) -> None:
        self._add(-amount)

    def _add(self, amount: float) -> None:
        with self.parent._lock:
            value = self.parent._values[self.values] = self.parent._values.get(self.values, 0.0) + amount
        self.parent.metric.set(value, tags=self.tags)

    def set(self, value: float) -> None:
        with self.parent._lock:
            self.parent._values[self.values] = value
        self.parent.metric.set(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.parent.metric.observe(value, tags=self.tags)


def use_ray_serve(refresh_seconds: float = 1.0) -> None:
    """Record every metric of this process through `ray.serve.metrics` (in a Serve replica,
    before anything records): Ray exports them with its own and Serve's.

    Ray's agent forgets a gauge value that was not reported again within two report intervals
    (seen with Ray 2.60: a model's load time set once was gone from the endpoint 15 s later),
    so a thread reports every gauge's current values again each `refresh_seconds`."""
    gauges = []
    for variable, definition in DEFINITIONS.items():
        globals()[variable] = metric = _RayMetric(definition)
        if definition.kind is Gauge:
            gauges.append(metric)

    def refresh() -> None:
        while True:
            time.sleep(refresh_seconds)
            for gauge in gauges:
                gauge.report_again()

    threading.Thread(target=refresh, name="unclip-gauges", daemon=True).start()


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


def exposition() -> tuple[bytes, str]:
    """Every metric of this process as Prometheus text, and its Content-Type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


async def scrape(request: Any) -> Any:
    """aiohttp handler of GET /metrics (a stage's metrics port)."""
    from aiohttp import web

    body, content_type = exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})
