"""The asyncio client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from types import TracebackType
from typing import TypeVar

import grpc

from unclip.client.base import ClientBase
from unclip.client.operations import Operations
from unclip.client.requests import Rpc
from unclip.client.retry import Attempts, Timeout
from unclip.client.types import Animation, GeneratedImage, StreamEvent, event_from_stream
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import images_pb2, images_pb2_grpc

T = TypeVar("T")


class AsyncClient(ClientBase, Operations[Awaitable[list[GeneratedImage]], Awaitable[Animation], AsyncIterator[StreamEvent]]):
    """An asyncio client for an unclip gateway (`unclip.v1.ImageService`).

    Takes the same arguments as `Client` and offers the same methods, returning awaitables
    (`generate_stream`: an async iterator, for `async for`). The channel is
    opened on the first call, inside the running event loop; use the client from that loop only.
    Use it as an async context manager, or `await close()` when done. Images given as paths are
    read with blocking I/O when the call is made.
    """

    def _connect(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._stub_instance: images_pb2_grpc.ImageServiceStub | None = None
        self._closed = False

    async def _stream(self, request: images_pb2.GenerateStreamRequest, timeout: Timeout) -> AsyncIterator[StreamEvent]:
        stub = self._stub()
        attempts = Attempts("GenerateStream", self.target, self._policy, self._resolve(timeout))
        while True:
            call = stub.GenerateStream(request, timeout=attempts.start(), metadata=self._metadata)
            received = False
            try:
                async for response in call:
                    received = True
                    event = event_from_stream(response)
                    if event is None:
                        continue  # an event kind newer than this SDK
                    yield event
                    if isinstance(event, list):
                        return
                raise attempts.protocol_error("the stream ended without a result")
            except grpc.RpcError as error:
                delay = attempts.failed(error, retryable=not received)
            finally:
                call.cancel()  # a no-op once the call is over; stops the server's work if not
            await asyncio.sleep(delay)

    async def _unary(self, rpc: Rpc[T], timeout: Timeout) -> T:
        """The parsed response of a unary RPC; UNAVAILABLE is retried with backoff within the timeout."""
        call = getattr(self._stub(), rpc.method)
        attempts = Attempts(rpc.method, self.target, self._policy, self._resolve(timeout))
        while True:
            try:
                return rpc.parse(await call(rpc.request, timeout=attempts.start(), metadata=self._metadata))
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.failed(error))

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub_instance = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    def _stub(self) -> images_pb2_grpc.ImageServiceStub:
        if self._closed:
            raise RuntimeError(f"the client for {self.target} is closed")
        if self._stub_instance is None:
            # Created here rather than in __init__: a grpc.aio channel belongs to the running loop.
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=GRPC_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=GRPC_OPTIONS)
            self._stub_instance = images_pb2_grpc.ImageServiceStub(self._channel)
        return self._stub_instance
