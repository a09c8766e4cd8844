"""The client SDK, in this process: `LocalClient` offers `Client`'s operations (the same
`unclip.client.operations`) and answers their requests with the gateway's own ImageService
servicer on the in-process stages, instead of sending them over a channel.

What `unclip generate` and the other image commands call when no --server is given, so every
command is written once for both, and the in-process path goes through the same request and
response messages as the services. Its errors are the SDK's (`unclip.errors`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

from gateway.admission import GatewayLimits
from gateway.api import ImageAPI
from gateway.servicer import ImageServicer
from unclip.client.operations import Operations
from unclip.client.requests import Rpc
from unclip.client.retry import DEFAULT, Timeout, check_timeout
from unclip.client.types import Animation, GeneratedImage, StreamEvent, event_from_stream
from unclip.errors import UnclipError
from unclip.local import LocalStages
from unclip.serving import HopContext
from unclip.v1 import images_pb2

T = TypeVar("T")


class LocalClient(Operations[list[GeneratedImage], Animation, Iterator[StreamEvent]]):
    """`Client`'s operations on the in-process stages. `weights`: a directory with one
    checkpoint per stage kind (None: the shipped weights); `stages`: already loaded ones
    instead. `timeout`: default seconds per call. `progress(step, total)` is called after every
    diffusion step. There is no object store: URLs and idempotency keys are refused."""

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        stages: LocalStages | None = None,
        timeout: float | None = 600.0,
        progress: Any = None,
    ):
        self.stages = stages if stages is not None else LocalStages.load(weights)
        if progress is not None:
            self.stages.progress = lambda step, total, x0: progress(step, total)
        # The caller's own machine: none of a shared gateway's admission limits (gateway.admission).
        unlimited = GatewayLimits(max_concurrent_requests=None, max_request_cost=None, default_timeout=None)
        self.servicer = ImageServicer(ImageAPI(self.stages, limits=unlimited))
        self.timeout = check_timeout(timeout)

    def _context(self, timeout: Timeout) -> HopContext:
        seconds = self.timeout if timeout is DEFAULT else check_timeout(timeout)
        return HopContext(deadline=None if seconds is None else time.monotonic() + seconds)

    def _unary(self, rpc: Rpc[T], timeout: Timeout) -> T:
        response = asyncio.run(getattr(self.servicer, rpc.method)(rpc.request, self._context(timeout)))
        return rpc.parse(response)

    def _stream(self, request: images_pb2.GenerateStreamRequest, timeout: Timeout) -> Iterator[StreamEvent]:
        for response in _on_a_thread(self.servicer.GenerateStream(request, self._context(timeout))):
            event = event_from_stream(response)
            if event is not None:
                yield event
            if isinstance(event, list):
                return
        raise UnclipError("GenerateStream ended without a result")

    def close(self) -> None:
        """Stop the stages' model threads."""
        self.stages.shutdown()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_END = object()


def _on_a_thread(stream: AsyncIterator[T]) -> Iterator[T]:
    """Iterate an async iterator from synchronous code: it runs on an event loop of its own on
    another thread, so its items arrive as they are produced; leaving early cancels it."""
    items: queue.Queue[Any] = queue.Queue()
    loop = asyncio.new_event_loop()

    async def pump() -> None:
        async for item in stream:
            items.put(item)

    task = loop.create_task(pump())

    def run() -> None:
        try:
            loop.run_until_complete(task)
            items.put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            items.put(error)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="unclip-local-stream", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(task.cancel)
        thread.join()
