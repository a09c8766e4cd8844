"""What every grpc.aio server in unclip shares: message limits, error mapping, health,
reflection, model loading in the background, bounded work queue, cancellation, shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from unclip.cancel import CancelToken, run_cancellable
from unclip.errors import ResourceExhausted, Unavailable, UnclipError
from unclip.stages import load_engine
from unclip.transport import GRPC_OPTIONS

log = logging.getLogger("unclip.serving")
T = TypeVar("T")
DEFAULT_MAX_PENDING = 32
SHUTDOWN_GRACE_SECONDS = 5.0


async def abort_with(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """Answer with the status code the error stands for (INTERNAL for anything unexpected)."""
    if isinstance(error, UnclipError):
        await context.abort(grpc.StatusCode[error.status_name], str(error))
    log.exception("unexpected error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def rpc(method):
    """Map unclip errors raised by a unary servicer method to gRPC status codes."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001 - every error becomes a status, never a crash
            await abort_with(context, error)

    return wrapper


def streaming_rpc(method):
    """Like `rpc`, for server-streaming methods written as async generators."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # noqa: BLE001
            await abort_with(context, error)

    return wrapper


async def events_until_done(events: asyncio.Queue, task: asyncio.Future) -> AsyncIterator[Any]:
    """Yield what `task` puts on `events` while it runs, then whatever is still queued.

    For server-streaming RPCs whose progress comes from a running computation; the caller
    awaits `task` afterwards for its result (or its exception).
    """
    while not task.done():
        getter = asyncio.ensure_future(events.get())
        await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
        else:
            getter.cancel()
    while not events.empty():
        yield events.get_nowait()


class ModelServicer:
    """Base of every stage servicer: holds the engine once loaded and runs its calls.

    Model calls run one at a time on a dedicated thread (the model uses every core already);
    up to `max_pending` more wait, beyond that callers get RESOURCE_EXHAUSTED.
    """

    STAGE_KIND: str  # which engine: clip | prior | decoder | upsampler

    def __init__(self, checkpoint: str | Path | None = None, *, max_pending: int = DEFAULT_MAX_PENDING):
        self.checkpoint = checkpoint  # None: the weights shipped in the package
        self.engine: Any = None
        self.max_pending = max_pending
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=type(self).__name__)

    def load(self) -> None:
        self.engine = load_engine(self.STAGE_KIND, self.checkpoint)

    def require_engine(self) -> Any:
        if self.engine is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.engine

    async def run(self, context: grpc.aio.ServicerContext, call: Callable[..., T]) -> T:
        """Run `call(cancel)` on the model thread, honouring the RPC's deadline and cancellation."""
        self.require_engine()
        if self._pending >= self.max_pending:
            raise ResourceExhausted(f"{self._pending} requests are already queued (limit {self.max_pending}); retry later")
        self._pending += 1
        try:
            return await run_cancellable(call, CancelToken.with_timeout(context.time_remaining()), self._executor)
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class ServiceSpec:
    """One gRPC service a servicer implements: how to register it, and its full name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    full_name: str


class Server:
    """A grpc.aio server with health (NOT_SERVING until `load` has finished) and reflection."""

    def __init__(self, servicer: Any, services: Iterable[ServiceSpec], *, host: str = "127.0.0.1", port: int = 0):
        self.servicer = servicer
        self.services = list(services)
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for spec in self.services:
            spec.add_to_server(servicer, self.server)
        names = [spec.full_name for spec in self.services]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.address = f"{host}:{port}"
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.address}")
        self.address = f"{host}:{self.port}"
        self.ready = asyncio.Event()
        # Companion servers sharing this process and loop (the gateway's HTTP API): (start, stop).
        self.companions: list[tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = []

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
        log.info("serving %s on %s", ", ".join(spec.full_name for spec in self.services), self.address)

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        await self.health.enter_graceful_shutdown()
        for _, stop_companion in reversed(self.companions):
            await stop_companion()
        await self.server.stop(grace)
        result = self.servicer.close()
        if inspect.isawaitable(result):
            await result


async def serve_forever(make_server: Callable[[], Server]) -> None:
    """Build the server inside the running loop (grpc.aio binds to it), start it, and stop
    gracefully on SIGINT or SIGTERM."""
    server = make_server()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    startup = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([startup, stopping], return_when=asyncio.FIRST_COMPLETED)
    if startup.done() and startup.exception() is not None:
        await server.stop(0)
        raise startup.exception()
    await stopping
    startup.cancel()
    log.info("shutting down %s", server.address)
    await server.stop()


class BackgroundServer:
    """Runs a Server on its own event loop in a thread: for tests and benchmarks in one process.

    Entering binds and starts the server and (unless `wait_ready=False`) waits for its model.
    """

    def __init__(self, make_server: Callable[[], Server], *, wait_ready: bool = True):
        self._make_server = make_server
        self._wait_ready = wait_ready
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._startup: concurrent.futures.Future | None = None
        self.server: Server | None = None

    def __enter__(self) -> Server:
        self._thread.start()

        async def create() -> Server:
            return self._make_server()

        self.server = asyncio.run_coroutine_threadsafe(create(), self._loop).result(timeout=60)
        self._startup = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop)
        if self._wait_ready:
            self.wait_ready()
        return self.server

    def wait_ready(self, timeout: float = 300.0) -> None:
        self._startup.result(timeout=timeout)

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            self._startup.cancel()
            asyncio.run_coroutine_threadsafe(self.server.stop(0.5), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
