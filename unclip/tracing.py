"""OpenTelemetry traces: off unless the standard `OTEL_*` variables turn them on.

A process calls `configure(service_name)` once at start. Tracing is on when
`OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`) or an OTLP endpoint is set
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); `OTEL_SDK_DISABLED=true`
or `OTEL_TRACES_EXPORTER=none` keep it off. Everything else is read by the SDK itself:
`OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (the resource), `OTEL_TRACES_SAMPLER`,
`OTEL_BSP_*` (batching), `OTEL_EXPORTER_OTLP_*` (endpoint, headers, protocol: `http/protobuf`,
the default, or `grpc`), `OTEL_PROPAGATORS` (W3C `traceparent` by default).

While off, the API's no-op tracer answers every call, and the helpers here skip injecting
headers: tracing costs nothing until it is turned on.

Context crosses a hop as headers: gRPC metadata between the gateway and the stages (and the
`metadata` argument of a Ray Serve handle call), HTTP headers into the gateway.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

log = logging.getLogger("unclip.tracing")
TRACER_NAME = "unclip"
_EXPORTERS = ("otlp", "console")
_enabled = False
_provider: Any = None


def requested(environ: Mapping[str, str] | None = None) -> list[str]:
    """The span exporters the environment asks for (empty: tracing off)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if not names:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    if "none" in names:
        return []
    unknown = [name for name in names if name not in _EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {', '.join(unknown)}; use {', '.join(_EXPORTERS)} or none")
    return names


def _otlp_exporter(environ: Mapping[str, str]) -> Any:
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    elif protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r}; use http/protobuf or grpc")
    return OTLPSpanExporter()  # endpoint, headers, timeout: from OTEL_EXPORTER_OTLP_*


def configure(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install a tracer provider exporting spans as the environment says; True if tracing is on.
    `service_name` is the default of `OTEL_SERVICE_NAME`. Raises ValueError for settings it
    cannot honour, so a misconfigured process fails at start instead of dropping spans."""
    env = os.environ if environ is None else environ
    exporters = requested(env)
    if not exporters:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; attributes given here
    # would win over them, so the default name is given only when neither names the service.
    named = env.get("OTEL_SERVICE_NAME") or f"{SERVICE_NAME}=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {SERVICE_NAME: service_name}))
    for name in exporters:
        exporter = _otlp_exporter(env) if name == "otlp" else ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    use_provider(provider)
    log.info("tracing on: exporting spans with %s", ", ".join(exporters))
    return True


def use_provider(provider: Any, *, set_global: bool = True) -> None:
    """Trace through `provider` (the SDK's TracerProvider), or stop tracing with None. Tests
    pass one with an in-memory exporter and `set_global=False`: OpenTelemetry's global provider
    can be set only once per process."""
    global _enabled, _provider
    if provider is not None and set_global:
        trace.set_tracer_provider(provider)
    _provider = provider
    _enabled = provider is not None


def enabled() -> bool:
    return _enabled


def tracer() -> trace.Tracer:
    return _provider.get_tracer(TRACER_NAME) if _provider is not None else trace.get_tracer(TRACER_NAME)


def extract(headers: Mapping[str, str]) -> Context | None:
    """The remote parent that `headers` (gRPC metadata or HTTP headers) carry, if tracing is on."""
    return propagate.extract(headers) if _enabled else None


def inject() -> list[tuple[str, str]]:
    """Headers carrying the current span to the next hop (none while tracing is off)."""
    if not _enabled:
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


@contextmanager
def span(
    name: str,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Context | None = None,
    *,
    error_on_exception: bool = True,
    **attributes: Any,
) -> Iterator[Span]:
    """A span around a block, current inside it; an exception escaping it is recorded and, with
    `error_on_exception`, marks the span as failed (a server span sets its status itself: a
    caller's mistake is not the server's error). While tracing is off this is the API's
    non-recording span."""
    if not _enabled:
        yield trace.INVALID_SPAN
        return
    attrs = _attributes(attributes)
    with tracer().start_as_current_span(
        name, context=parent, kind=kind, attributes=attrs, set_status_on_exception=error_on_exception
    ) as current:
        yield current


def _attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    # Span attribute names are dotted ("rpc.method"); keyword arguments spell them with "__".
    return {key.replace("__", "."): value for key, value in values.items() if value is not None}


def set_error(current: Span, status: str) -> None:
    """Mark the span as failed with `status` (a gRPC code name or HTTP status)."""
    current.set_status(Status(StatusCode.ERROR, status))


def trace_id() -> str | None:
    """The current trace's id as 32 hex digits, for log lines (None outside a recorded span)."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def headers_of(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """gRPC metadata as a header mapping (binary `-bin` values left out)."""
    return {key: value for key, value in metadata or () if isinstance(value, str)}
