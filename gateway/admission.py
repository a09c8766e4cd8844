"""Admission control in the gateway: which requests it takes on, for gRPC and HTTP alike.

`ImageAPI` applies these to every operation, so both protocols (and Ray Serve's replicas, each
with its own ImageAPI) share one bound per gateway process:

- a bound on concurrent requests: one more is refused at once with RESOURCE_EXHAUSTED (HTTP 429
  with Retry-After), never queued, so a burst cannot pile up work the stages will not reach
  before the callers' deadlines;
- a cap on each request's cost (`unclip.cost`): above it, INVALID_ARGUMENT (HTTP 400) naming the
  cap and the request's cost, before any work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from unclip.cost import DEFAULT_MAX_REQUEST_COST
from unclip.errors import ResourceExhausted
from unclip.limits import DEFAULT_TIMEOUT_SECONDS

# How long an HTTP request's body may take to arrive: a client that trickles it in would hold a
# connection and the request's buffers for as long as it likes (408 past it).
DEFAULT_BODY_TIMEOUT_SECONDS = 60.0

# Requests one gateway process works on at once: twice a stage's default queue (32), since
# requests spend part of their time in the other stages.
DEFAULT_MAX_CONCURRENT_REQUESTS = 64
# What a refused caller is told to wait: a request's slot frees as soon as any request ends.
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class GatewayLimits:
    """A gateway's limits (`unclip serve gateway|all` flags of the same names; None: no limit):
    concurrent requests and the cost cap (applied by ImageAPI), the deadline of gRPC calls that
    bring none (`unclip.limits`), and how long an HTTP body may take to arrive (`gateway.http_api`)."""

    max_concurrent_requests: int | None = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_request_cost: int | None = DEFAULT_MAX_REQUEST_COST
    default_timeout: float | None = DEFAULT_TIMEOUT_SECONDS
    body_timeout: float = DEFAULT_BODY_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        for name in ("max_concurrent_requests", "max_request_cost", "default_timeout", "body_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be positive, got {value}")

    def serve_flags(self, *, gateway: bool) -> list[str]:
        """These limits as `unclip serve` flags (what `serve all` passes its processes; 0 is "no
        limit"): the gateway takes them all, a stage the default timeout only."""
        flags = ["--default-timeout", str(self.default_timeout or 0)]
        if gateway:
            flags += ["--max-concurrent-requests", str(self.max_concurrent_requests or 0)]
            flags += ["--max-request-cost", str(self.max_request_cost or 0), "--body-timeout", str(self.body_timeout)]
        return flags


class ConcurrencyLimit:
    """Counts the requests in flight; `admitted()` refuses one past `limit` (None: no limit).
    Everything runs on one event loop, so a plain counter is enough."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.in_flight = 0

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        if self.limit is not None and self.in_flight >= self.limit:
            raise ResourceExhausted(
                f"the gateway is working on its limit of {self.limit} concurrent requests; retry in {RETRY_AFTER_SECONDS} s",
                retry_after=RETRY_AFTER_SECONDS,
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
