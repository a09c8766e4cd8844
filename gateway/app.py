"""Assemble the gateway process: gRPC ImageService + OpenAI-compatible HTTP API on one event
loop, over the stage services, with the object store when one is configured."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.api import ImageAPI
from gateway.http_api import create_http_app
from gateway.servicer import SERVICES, ImageServicer
from unclip.pipeline import StageBackend
from unclip.serving import Server
from unclip.storage import ResultStore, StorageConfig

log = logging.getLogger("unclip.gateway")


def build_gateway(
    backend: StageBackend,
    *,
    host: str,
    port: int,
    http_port: int | None,
    storage: StorageConfig | None,
) -> Server:
    """The gateway Server (build it inside the running loop). `http_port` None: no HTTP API."""
    store = ResultStore(storage) if storage is not None else None
    api = ImageAPI(backend, store)
    server = Server(ImageServicer(api), SERVICES, host=host, port=port)
    if store is None:
        log.info("no object store configured (UNCLIP_S3_ENDPOINT): results are not stored, URLs are unavailable")
    if http_port is not None:
        runner = web.AppRunner(create_http_app(api), access_log=None)

        async def start_http() -> None:
            await runner.setup()
            await web.TCPSite(runner, host, http_port).start()
            log.info("HTTP API on http://%s:%d/v1/images/", host, http_port)

        server.companions.append((start_http, runner.cleanup))
    return server
