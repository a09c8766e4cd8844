"""The asyncio client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, TypeVar

import grpc

from unclip.client import requests
from unclip.client.base import ClientBase
from unclip.client.requests import ImageInput, Rpc, takes_parameters
from unclip.client.retry import DEFAULT, Attempts, Timeout
from unclip.client.types import Animation, GeneratedImage, StreamEvent, event_from_stream
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import images_pb2_grpc

T = TypeVar("T")


class AsyncClient(ClientBase):
    """An asyncio client for an unclip gateway (`unclip.v1.ImageService`).

    Takes the same arguments as `Client` and offers the same methods as coroutines. The channel is
    opened on the first call, inside the running event loop; use the client from that loop only.
    Use it as an async context manager, or `await close()` when done. Images given as paths are
    read with blocking I/O when the call is made.
    """

    def _connect(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._stub_instance: images_pb2_grpc.ImageServiceStub | None = None
        self._closed = False

    @takes_parameters("generate")
    async def generate(
        self,
        prompt: str,
        *,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> list[GeneratedImage]:
        """Generate images for `prompt`; see `Client.generate`."""
        return await self._unary(requests.generate(prompt, parameters, response_format, idempotency_key), timeout)

    @takes_parameters("generate_stream")
    async def generate_stream(
        self,
        prompt: str,
        *,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> AsyncIterator[StreamEvent]:
        """Like `generate`, but yields events as the work goes on, then the images; see
        `Client.generate_stream`.

        Use it with `async for`. The arguments are checked and the call starts when iteration
        does; its timeout covers the whole stream. Stopping the iteration early (and closing the
        iterator) cancels the call.
        """
        request = requests.generate_stream(prompt, parameters, response_format, idempotency_key)
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

    @takes_parameters("variations")
    async def variations(
        self,
        image: ImageInput,
        *,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> list[GeneratedImage]:
        """`n` variations of `image`; see `Client.variations`."""
        return await self._unary(requests.variations(image, parameters, response_format, idempotency_key), timeout)

    @takes_parameters("edit")
    async def edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        mask: ImageInput | None = None,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> list[GeneratedImage]:
        """Inpainting; see `Client.edit`."""
        return await self._unary(requests.edit(image, prompt, mask, parameters, response_format, idempotency_key), timeout)

    @takes_parameters("interpolate")
    async def interpolate(
        self,
        *,
        images: tuple[ImageInput, ImageInput] | None = None,
        prompts: tuple[str, str] | None = None,
        frames: int = 5,
        animated_gif: bool = False,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> Animation:
        """Frames between two images or two prompts; see `Client.interpolate`."""
        rpc = requests.interpolate(images, prompts, frames, animated_gif, parameters, response_format, idempotency_key)
        return await self._unary(rpc, timeout)

    @takes_parameters("text_diff")
    async def text_diff(
        self,
        image: ImageInput,
        caption: str,
        target_caption: str,
        *,
        frames: int = 5,
        max_rotation: float | None = None,
        animated_gif: bool = False,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> Animation:
        """Frames moving `image` toward `target_caption`; see `Client.text_diff`."""
        rpc = requests.text_diff(
            image, caption, target_caption, frames, max_rotation, animated_gif, parameters, response_format, idempotency_key
        )
        return await self._unary(rpc, timeout)

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
