"""Assemble the gateway process: gRPC ImageService + OpenAI-compatible HTTP API on one event
loop, over the stage services, with the object store when one is configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from gateway.admission import GatewayLimits
from gateway.api import ImageAPI
from gateway.auth import Access, is_loopback
from gateway.http_api import create_http_app
from gateway.servicer import SERVICES, ImageServicer
from unclip.limits import gateway_request_bytes
from unclip.pipeline import StageBackend
from unclip.serving import Server
from unclip.storage import ResultStore, StorageConfig
from unclip.tls import TlsFiles
from unclip.transport import SHUTDOWN_GRACE_SECONDS

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
    free port, and `port` is the bound one once started. With `tls`, HTTPS only (and client
    certificates signed by `tls.ca` required when it is given)."""

    def __init__(self, app: ASGIApp, host: str, port: int, tls: TlsFiles | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.tls = tls
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
            **_uvicorn_tls(self.tls),
        )
        self._server = server = _LoopUvicorn(config)
        self._serving = serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                await serving  # raises why it stopped
                raise RuntimeError(f"the HTTP server on {self.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, let requests in flight finish for up to `grace` seconds, close."""
        if self._server is None or self._serving is None:
            return
        self._server.config.timeout_graceful_shutdown = max(1, round(grace))  # uvicorn counts whole seconds
        self._server.should_exit = True
        await self._serving


def _uvicorn_tls(tls: TlsFiles | None) -> dict[str, Any]:
    """uvicorn.Config's TLS settings for `tls` (none for plaintext)."""
    if tls is None:
        return {}
    settings: dict[str, Any] = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    if tls.ca is not None:
        settings |= {"ssl_ca_certs": str(tls.ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return settings


def build_gateway(
    backend: StageBackend,
    *,
    host: str,
    port: int,
    http_port: int | None,
    storage: StorageConfig | None,
    tls: TlsFiles | None = None,
    limits: GatewayLimits = GatewayLimits(),
    access: Access | None = None,
) -> Server:
    """The gateway Server (build it inside the running loop). `http_port` None: no HTTP API;
    0: any free port (the gateway's /metrics is on it, so `metrics_address` says which).
    `tls`: the public endpoints' certificate and key, for gRPC and HTTP alike (with `tls.ca`,
    callers must present a certificate that CA signed); None: plaintext. `limits`: admission
    control and timeouts (`gateway.admission`); gRPC requests are at most the largest valid one.
    `access`: API keys and their quotas (`gateway.auth`); None: everyone may call."""
    store = ResultStore(storage) if storage is not None else None
    api = ImageAPI(backend, store, limits, access)
    if api.access.keys is None and not is_loopback(host):
        log.warning("no API keys (--api-keys): anyone who reaches %s may call the gateway", host)
    credentials = None if tls is None else tls.server_credentials()
    server = Server(
        ImageServicer(api), SERVICES, host=host, port=port, credentials=credentials,
        max_receive_bytes=gateway_request_bytes(), default_timeout=limits.default_timeout,
    )  # fmt: skip
    if store is None:
        log.info("no object store configured (UNCLIP_S3_ENDPOINT): results are not stored, URLs are unavailable")
    if http_port is not None:
        http = HTTPServer(create_http_app(api, body_timeout=limits.body_timeout), host, http_port, tls)

        async def start_http() -> None:
            await http.start()
            server.metrics_address = f"{host}:{http.port}"
            log.info("HTTP API on %s://%s:%d/v1/images/", "http" if tls is None else "https", host, http.port)

        server.companions.append((start_http, http.stop))
    return server
