"""One request as an operator sees it: its id, its span, its metrics and its log line.

Every gRPC method (`unclip.serving`) and every HTTP route (`gateway.http_api`) is answered
inside `observed_request`, so the two protocols cannot drift apart:

- the request id comes from the caller's `x-request-id` (when it is 1-128 characters of
  letters, digits and `-._:/+=`) or is made up, and is returned on every answer, errors
  included (HTTP header, gRPC trailing metadata) and forwarded to the stages it calls;
- a server span continues the caller's trace (W3C `traceparent`) when tracing is on;
- `unclip.metrics` counts and times it by method and status;
- one log line (logger `unclip.requests`) ends it, with request id, trace id, method, status
  and duration.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from opentelemetry.trace import Span, SpanKind

from unclip import metrics, tracing
from unclip.transport import REQUEST_ID_HEADER

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_request_id: ContextVar[str | None] = ContextVar("unclip_request_id", default=None)
log = logging.getLogger("unclip.requests")


def current_request_id() -> str | None:
    """The id of the request being answered in this context (None outside one)."""
    return _request_id.get()


def request_id_from(headers: Mapping[str, str]) -> str:
    """The caller's request id if it is a usable one, else a new one (an id with spaces or
    control characters would corrupt log lines and headers, so it is replaced, not refused)."""
    given = headers.get(REQUEST_ID_HEADER)
    return given if given is not None and _VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def forwarded() -> list[tuple[str, str]]:
    """Headers (gRPC metadata) a call to the next hop carries: the request id and the trace."""
    request_id = _request_id.get()
    return ([(REQUEST_ID_HEADER, request_id)] if request_id else []) + tracing.inject()


# The gRPC codes OpenTelemetry's conventions count as a server's failure; the rest are the caller's.
_GRPC_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


def _is_server_error(protocol: str, status: str) -> bool:
    return status in _GRPC_SERVER_ERRORS if protocol == "grpc" else not status.isdigit() or int(status) >= 500


@dataclass
class ObservedRequest:
    request_id: str
    span: Span
    codes: list[str] = field(default_factory=list)  # the status, set by the protocol layer

    def finish(self, status: str) -> None:
        """Record the status the request is answered with (a gRPC code name or HTTP status)."""
        self.codes.append(status)


@contextmanager
def observed_request(protocol: str, method: str, headers: Mapping[str, str]) -> Iterator[ObservedRequest]:
    """Observe one request of `protocol` ("grpc" or "http") to `method` (an RPC name or an HTTP
    route template); `headers` are its metadata or HTTP headers. The caller calls `finish` with
    the status; a request left without one is logged and counted as INTERNAL (gRPC) or 500."""
    request_id = request_id_from(headers)
    token = _request_id.set(request_id)
    started = time.perf_counter()
    attributes = {"rpc__method": method, "rpc__system": "grpc"} if protocol == "grpc" else {"http__route": method}
    try:
        with (
            tracing.span(
                method,
                SpanKind.SERVER,
                tracing.extract(headers),
                error_on_exception=False,
                unclip__request_id=request_id,
                **attributes,
            ) as span,
            metrics.measured_request(protocol, method) as codes,
        ):
            observed = ObservedRequest(request_id, span, codes)
            try:
                yield observed
            finally:
                status = codes[-1] if codes else ("INTERNAL" if protocol == "grpc" else "500")
                if _is_server_error(protocol, status):
                    tracing.set_error(span, status)
                span.set_attribute("rpc.grpc.status_code" if protocol == "grpc" else "http.response.status_code", status)
                duration_ms = round((time.perf_counter() - started) * 1000, 1)
                context = {
                    "request_id": request_id, "trace_id": tracing.trace_id(), "protocol": protocol, "method": method,
                    "status": status, "duration_ms": duration_ms,
                }  # fmt: skip
                log.info("%s %s %s in %.1f ms", protocol, method, status, duration_ms, extra=context)
    finally:
        # An async generator closed from another context raises ValueError; that context ends anyway.
        with contextlib.suppress(ValueError):
            _request_id.reset(token)
