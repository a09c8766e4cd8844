"""What every grpc.aio server in unclip shares: message limits, error mapping, health,
reflection, model loading in the background, bounded work queue, cancellation, shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from unclip import metrics, observe, tracing
from unclip.calls import StageCall, grpc_module, service_full_name
from unclip.cancel import CancelToken
from unclip.errors import Unavailable, UnclipError, error_for_status
from unclip.limits import DEFAULT_TIMEOUT_SECONDS, RequestGuard, server_options, stage_request_bytes, time_remaining
from unclip.stage import Stage
from unclip.stages import load_engine
from unclip.stages.batcher import Batcher, BatchSettings
from unclip.transport import MAX_MESSAGE_BYTES, SHUTDOWN_GRACE_SECONDS

log = logging.getLogger("unclip.serving")
T = TypeVar("T")


async def abort_with(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """Answer with the status code the error stands for (INTERNAL for anything unexpected)."""
    if isinstance(error, UnclipError):
        await context.abort(grpc.StatusCode[error.status_name], str(error), _retry_trailers(error))
    log.exception("unexpected error", exc_info=error)  # with the request id (unclip.logs)
    # The caller gets no internals (exception text may name paths, hosts or data): the id finds the log.
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error; the server log has the details under request id {observe.current_request_id()}",
    )


def _retry_trailers(error: UnclipError) -> tuple[tuple[str, str | bytes], ...]:
    """For an error that says when to retry (`ResourceExhausted.retry_after`): trailing metadata
    that carries it as a google.rpc.RetryInfo detail (clients read it with
    grpc_status.rpc_status.from_call), and the request id, which it replaces; else none."""
    retry_after = getattr(error, "retry_after", None)
    if retry_after is None:
        return ()
    import math

    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    delay = duration_pb2.Duration()
    delay.FromMilliseconds(math.ceil(retry_after * 1000))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    code = grpc.StatusCode[error.status_name].value[0]
    status = rpc_status.to_status(status_pb2.Status(code=code, message=str(error), details=[detail]))
    request_id = observe.current_request_id()
    return (*([(observe.REQUEST_ID_HEADER, request_id)] if request_id else []), *status.trailing_metadata)


def _authorize(servicer: Any, method: str, context: Any) -> None:
    """A servicer with an `authorize(method, headers)` (the gateway's: API keys) checks each call
    before its body runs; it raises the error to answer with (UNAUTHENTICATED)."""
    authorize = getattr(servicer, "authorize", None)
    if authorize is not None:
        authorize(method, _invocation_headers(context))


def _status_name(error: BaseException, context: Any) -> str:
    """The status code an RPC that raised `error` answers with, for metrics."""
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(error, UnclipError):
        return error.status_name
    code = getattr(context, "code", lambda: None)()  # set by context.abort
    return code.name if isinstance(code, grpc.StatusCode) else "INTERNAL"


def _invocation_headers(context: Any) -> dict[str, str]:
    metadata = getattr(context, "invocation_metadata", None)
    return tracing.headers_of(metadata() if metadata is not None else None)


@contextlib.asynccontextmanager
async def _answering(method: str, context: Any) -> AsyncIterator[None]:
    """An RPC's body, observed (`unclip.observe`: request id, span, metrics, log line): unclip
    errors become its status code (`abort_with`); the request id goes back in the trailing
    metadata, whatever the status."""
    with observe.observed_request("grpc", method, _invocation_headers(context)) as observed:
        set_trailing = getattr(context, "set_trailing_metadata", None)
        if set_trailing is not None:
            set_trailing([(observe.REQUEST_ID_HEADER, observed.request_id)])  # a list: Ray's context appends to it
        try:
            yield
        except (asyncio.CancelledError, grpc.aio.AbortError) as error:
            observed.finish(_status_name(error, context))
            raise
        except Exception as error:
            observed.finish(_status_name(error, context))
            await abort_with(context, error)
            raise  # abort_with always raises; never swallow the error
        observed.finish("OK")


def rpc(method):
    """A unary servicer method answering through `_answering`, under its (final) name."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _answering(wrapper.__name__, context):
            _authorize(self, wrapper.__name__, context)
            return await method(self, request, context)

    return wrapper


def streaming_rpc(method):
    """Like `rpc`, for server-streaming methods written as async generators."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _answering(wrapper.__name__, context):
            _authorize(self, wrapper.__name__, context)
            async for item in method(self, request, context):
                yield item

    return wrapper


class EventQueue(Protocol):
    """What `events_until_done` reads: an asyncio.Queue, or gateway.streaming.StreamEvents."""

    async def get(self) -> Any: ...

    def empty(self) -> bool: ...

    def get_nowait(self) -> Any: ...


async def events_until_done(events: EventQueue, task: asyncio.Future) -> AsyncIterator[Any]:
    """Yield what `task` puts on `events` while it runs, then whatever is still queued.

    For server-streaming RPCs whose progress comes from a running computation; the caller
    awaits `task` afterwards for its result (or its exception).
    """
    while not task.done():
        getter = asyncio.ensure_future(events.get())
        try:
            await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            getter.cancel()  # the reader was cancelled here (its client went away)
            raise
        if getter.done():
            yield getter.result()
        else:
            getter.cancel()
    while not events.empty():
        yield events.get_nowait()


class HopContext:
    """What the servicers use of a grpc.aio context (the time left, abort), for a call that
    arrives without one: through Ray Serve's gRPC proxy (`grpc_context`, Ray's serialisable
    context where the status code goes), through a Serve handle (`timeout_s`, the time the
    calling hop has left), or in this process (`deadline`). `abort` raises the unclip error of
    the status, so the caller gets the error the service would have answered with."""

    def __init__(
        self,
        grpc_context: Any = None,
        timeout_s: float | None = None,
        *,
        deadline: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        self.grpc_context = grpc_context
        self.deadline = deadline if timeout_s is None else time.monotonic() + timeout_s
        self.metadata = dict(metadata or {})  # what a handle caller forwards (request id, trace)

    def invocation_metadata(self) -> list[tuple[str, str]]:
        if self.grpc_context is not None:
            return list(self.grpc_context.invocation_metadata())
        return list(self.metadata.items())

    def set_trailing_metadata(self, metadata: Any) -> None:
        if self.grpc_context is not None:
            self.grpc_context.set_trailing_metadata(metadata)

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> NoReturn:
        if self.grpc_context is not None:
            # The proxy answers with the code set here (Serve carries it in a gRPCStatusError).
            self.grpc_context.set_code(code)
            self.grpc_context.set_details(details)
            if trailing_metadata:
                self.grpc_context.set_trailing_metadata(list(trailing_metadata))
        # A handle caller receives this error inside a RayTaskError and maps it back to its code.
        raise error_for_status(code.name, details)


class StageServicer:
    """Base of every stage servicer: holds the engine once loaded and answers the stage's calls.

    Model calls run on the engine's batcher (`unclip.stages.batcher`): one model thread, calls
    that wait for it run together; beyond `settings.max_pending` accepted calls, callers get
    RESOURCE_EXHAUSTED. A subclass names its stage and binds each RPC to its call class with
    `call_rpc`.
    """

    STAGE: ClassVar[Stage]

    def __init__(self, checkpoint: str | Path | None = None, *, settings: BatchSettings = BatchSettings()):
        self.checkpoint = checkpoint  # None: the weights shipped in the package
        self.settings = settings
        self.engine: Any = None
        self.batcher: Batcher | None = None

    def load(self) -> None:
        self.engine = load_engine(self.STAGE, self.checkpoint, compute_batch=self.settings.compute_batch)
        self.batcher = Batcher(self.engine, self.settings)

    def require_engine(self) -> Any:
        if self.engine is None or self.batcher is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.engine

    async def answer(self, call: StageCall[Any], context: Any, progress: Any = None) -> Any:
        """The engine's result for `call`, honouring the RPC's deadline and cancellation: from
        the batcher, or at once for a call that is not QUEUED (what the model is)."""
        engine = self.require_engine()
        if not call.QUEUED:
            return call.run(engine)
        assert self.batcher is not None
        return await self.batcher.submit(call, CancelToken.with_timeout(time_remaining(context)), progress)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


# Each stage's servicer, in the service package the project publishes (imported on first use).
SERVICERS = {
    Stage.ENCODER: "encoder_svc.servicer:ClipEncoderServicer",
    Stage.PRIOR: "prior_svc.servicer:PriorServicer",
    Stage.DECODER: "decoder_svc.servicer:DecoderServicer",
    Stage.UPSAMPLER: "decoder_svc.servicer:UpsamplerServicer",
}


def servicer_class(stage: Stage) -> type[StageServicer]:
    module, name = SERVICERS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def stage_server(
    stage: Stage,
    checkpoint: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    settings: BatchSettings = BatchSettings(),
    metrics_port: int | None = None,
    credentials: grpc.ServerCredentials | None = None,
    default_timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
) -> Server:
    """A Server for one stage's service (build it inside the running loop), with its metrics
    over HTTP on `metrics_port` when given (0: any free port); with `credentials`, over TLS only.
    It receives at most the stage's largest valid request (`unclip.limits.stage_request_bytes`)."""
    servicer = servicer_class(stage)(checkpoint, settings=settings)
    server = Server(
        servicer, [ServiceSpec.of_stage(stage)], host=host, port=port, credentials=credentials,
        max_receive_bytes=stage_request_bytes(stage), default_timeout=default_timeout,
    )  # fmt: skip
    if metrics_port is not None:
        server.serve_metrics(host, metrics_port)
    return server


def call_rpc(call_class: type[StageCall[Any]]) -> Callable[..., Awaitable[Message]]:
    """A servicer method answering `call_class`'s RPC: parse the request, run it, reply."""

    @rpc
    async def method(self: StageServicer, request: Message, context: Any) -> Message:
        call = call_class.from_proto(request)
        return call.reply(await self.answer(call, context))

    method.__name__ = method.__qualname__ = call_class.METHOD
    return method


@dataclass
class ServiceSpec:
    """One gRPC service a servicer implements: how to register it, and its full name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    full_name: str

    @classmethod
    def of_stage(cls, stage: Stage) -> ServiceSpec:
        name = service_full_name(stage)
        return cls(getattr(grpc_module(stage), f"add_{name.rsplit('.', 1)[1]}Servicer_to_server"), name)


class Server:
    """A grpc.aio server with health (NOT_SERVING until `load` has finished) and reflection."""

    def __init__(
        self,
        servicer: Any,
        services: Iterable[ServiceSpec],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        credentials: grpc.ServerCredentials | None = None,
        max_receive_bytes: int = MAX_MESSAGE_BYTES,
        default_timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
    ):
        """`credentials` (`unclip.tls.TlsFiles.server_credentials`): serve TLS only, on the one
        port; None: plaintext. Requests are checked first (`unclip.limits`): at most
        `max_receive_bytes` each, parsed or refused with INVALID_ARGUMENT, and given
        `default_timeout` seconds when they come without a deadline (None: no deadline)."""
        self.servicer = servicer
        self.services = list(services)
        self.server = grpc.aio.server(options=server_options(max_receive_bytes), interceptors=[RequestGuard(default_timeout)])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for spec in self.services:
            spec.add_to_server(servicer, self.server)
        names = [spec.full_name for spec in self.services]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.address = f"{host}:{port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(self.address)
        else:
            self.port = self.server.add_secure_port(self.address, credentials)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.address}")
        self.address = f"{host}:{self.port}"
        self.ready = asyncio.Event()
        # Companion servers sharing this process and loop (the gateway's HTTP API): (start, stop).
        # Each stop takes the grace its requests in flight get.
        self.companions: list[tuple[Callable[[], Awaitable[None]], Callable[[float], Awaitable[None]]]] = []
        self.shutdown_grace = SHUTDOWN_GRACE_SECONDS
        self._watching: asyncio.Task[None] | None = None
        self.metrics_address: str | None = None

    def serve_metrics(self, host: str, port: int) -> None:
        """Answer GET /metrics on host:port (the process's `unclip.metrics`) while serving;
        `metrics_address` is where, once started."""
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", metrics.scrape)
        runner = web.AppRunner(app, access_log=None)

        async def start() -> None:
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            self.metrics_address = f"{host}:{runner.addresses[0][1]}"
            log.info("metrics on http://%s/metrics", self.metrics_address)

        async def stop(grace: float) -> None:
            await runner.cleanup()  # a scrape is short: nothing to drain

        self.companions.append((start, stop))

    async def _set_serving(self, serving: bool) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_all(self, status: int) -> None:
        for name in ["", *(spec.full_name for spec in self.services)]:
            await self.health.set(name, status)

    async def start(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s", self.address)
        for start_companion, _ in self.companions:
            await start_companion()
        if inspect.iscoroutinefunction(self.servicer.load):
            await self.servicer.load()
        else:
            await asyncio.to_thread(self.servicer.load)
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        watch = getattr(self.servicer, "watch", None)
        if watch is not None:  # a servicer whose health depends on others' (the gateway's on the stages')
            self._watching = asyncio.create_task(watch(self._set_serving))
        log.info("serving %s on %s", ", ".join(spec.full_name for spec in self.services), self.address)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health turns NOT_SERVING, new calls are refused, calls in flight get `grace`
        seconds (default `shutdown_grace`) to finish, then the rest are cancelled."""
        grace = self.shutdown_grace if grace is None else grace
        if self._watching is not None:
            self._watching.cancel()
        await self.health.enter_graceful_shutdown()
        # gRPC and the companions (the HTTP API) drain at once: their graces do not add up.
        await asyncio.gather(self.server.stop(grace), *(stop(grace) for _, stop in reversed(self.companions)))
        result = self.servicer.close()
        if inspect.isawaitable(result):
            await result


async def serve_forever(make_server: Callable[[], Server], *, shutdown_grace: float | None = None) -> None:
    """Build the server inside the running loop (grpc.aio binds to it), start it, and stop
    gracefully on SIGINT or SIGTERM, giving requests in flight `shutdown_grace` seconds."""
    server = make_server()
    if shutdown_grace is not None:
        server.shutdown_grace = shutdown_grace
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    startup = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([startup, stopping], return_when=asyncio.FIRST_COMPLETED)
    failure = startup.exception() if startup.done() else None
    if failure is not None:
        await server.stop(0)
        raise failure
    await stopping
    startup.cancel()
    log.info("shutting down %s: requests in flight get %g s", server.address, server.shutdown_grace)
    await server.stop()
