"""Assemble the gateway process: gRPC ImageService + OpenAI-compatible HTTP API on one event
loop, over the stage services, with the object store when one is configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from gateway.api import ImageAPI
from gateway.http_api import create_http_app
from gateway.servicer import SERVICES, ImageServicer
from unclip.pipeline import StageBackend
from unclip.serving import SHUTDOWN_GRACE_SECONDS, Server
from unclip.storage import ResultStore, StorageConfig

log = logging.getLogger("unclip.gateway")


class _LoopUvicorn(uvicorn.Server):
    """uvicorn on an event loop it does not own. SIGINT and SIGTERM belong to the process's
    `serve_forever`, which stops the gRPC server and then this one (`HTTPServer.stop`): uvicorn
    must not take the signals over, as `serve()` does on the main thread."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HTTPServer:
    """An ASGI app served by uvicorn on host:port in the running event loop; port 0 binds any
    free port, and `port` is the bound one once started."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Bound here rather than by uvicorn, which exits the process when it cannot bind.
        family, _, _, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.create_server(address, family=family)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the process's logging setup stays as it is
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(SHUTDOWN_GRACE_SECONDS),
        )
        self._server = server = _LoopUvicorn(config)
        self._serving = serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                await serving  # raises why it stopped
                raise RuntimeError(f"the HTTP server on {self.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (for up to the shutdown grace), close."""
        if self._server is None or self._serving is None:
            return
        self._server.should_exit = True
        await self._serving


def build_gateway(
    backend: StageBackend,
    *,
    host: str,
    port: int,
    http_port: int | None,
    storage: StorageConfig | None,
) -> Server:
    """The gateway Server (build it inside the running loop). `http_port` None: no HTTP API;
    0: any free port (the gateway's /metrics is on it, so `metrics_address` says which)."""
    store = ResultStore(storage) if storage is not None else None
    api = ImageAPI(backend, store)
    server = Server(ImageServicer(api), SERVICES, host=host, port=port)
    if store is None:
        log.info("no object store configured (UNCLIP_S3_ENDPOINT): results are not stored, URLs are unavailable")
    if http_port is not None:
        http = HTTPServer(create_http_app(api), host, http_port)

        async def start_http() -> None:
            await http.start()
            server.metrics_address = f"{host}:{http.port}"
            log.info("HTTP API on http://%s:%d/v1/images/", host, http.port)

        server.companions.append((start_http, http.stop))
    return server
