"""The asyncio client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message

from unclip.client._common import (
    DEFAULT,
    Animation,
    Attempts,
    GeneratedImage,
    ImageInput,
    RetryPolicy,
    StreamEvent,
    Timeout,
    animation_from_response,
    build_delivery,
    build_parameters,
    check_frames,
    check_max_rotation,
    check_text,
    check_timeout,
    event_from_stream,
    image_bytes,
    images_from_response,
    interpolate_endpoints,
)
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import images_pb2, images_pb2_grpc


class AsyncClient:
    """An asyncio client for an unclip gateway (`unclip.v1.ImageService`).

    Takes the same arguments as `Client` and offers the same methods as coroutines. The channel is
    opened on the first call, inside the running event loop; use the client from that loop only.
    Use it as an async context manager, or `await close()` when done. Images given as paths are
    read with blocking I/O when the call is made.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 300.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
        application: str | None = None,
    ):
        self.target = target
        self.timeout = check_timeout(timeout)
        self._policy = RetryPolicy(retries, backoff, max_backoff)
        self._metadata = (("application", application),) if application else None
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub_instance: images_pb2_grpc.ImageServiceStub | None = None
        self._closed = False

    async def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        size: int | None = None,
        seed: int | None = None,
        prior_guidance_scale: float | None = None,
        decoder_guidance_scale: float | None = None,
        decoder_text_guidance_scale: float | None = None,
        prior_steps: int | None = None,
        decoder_steps: int | None = None,
        upsampler_steps: int | None = None,
        sampler: str | None = None,
        prior_candidates: int | None = None,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
    ) -> list[GeneratedImage]:
        """Generate `n` images for `prompt`; see `Client.generate` for the arguments.

        Raises:
            UnclipError: the call failed (after retries, for UNAVAILABLE).
            ValueError, TypeError: an argument cannot be sent at all.
        """
        request = images_pb2.GenerateRequest(
            parameters=build_parameters(
                prompt, n=n, size=size, seed=seed, prior_guidance_scale=prior_guidance_scale,
                decoder_guidance_scale=decoder_guidance_scale, decoder_text_guidance_scale=decoder_text_guidance_scale,
                prior_steps=prior_steps, decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, sampler=sampler,
                prior_candidates=prior_candidates,
            ),
            delivery=build_delivery(response_format, idempotency_key),
        )
        return images_from_response(await self._unary("Generate", request, timeout))

    async def generate_stream(
        self,
        prompt: str,
        *,
        n: int = 1,
        size: int | None = None,
        seed: int | None = None,
        prior_guidance_scale: float | None = None,
        decoder_guidance_scale: float | None = None,
        decoder_text_guidance_scale: float | None = None,
        prior_steps: int | None = None,
        decoder_steps: int | None = None,
        upsampler_steps: int | None = None,
        sampler: str | None = None,
        prior_candidates: int | None = None,
        preview_every: int = 0,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
    ) -> AsyncIterator[StreamEvent]:
        """Like `generate`, but yields events as the work goes on, then the images.

        Yields a `StageProgress` as each stage finishes and, when `preview_every` > 0, a
        `Preview` of the decoder's current estimate every `preview_every` decoder steps (and
        after its last); the last item is the list of `GeneratedImage`s.

        Use it with `async for`. The arguments are checked and the call starts when iteration
        does; its timeout covers the whole stream. A call that fails before the first event is
        retried like `generate`; once an event has arrived, a failure raises `UnclipError`.
        Stopping the iteration early (and closing the iterator) cancels the call.
        """
        request = images_pb2.GenerateStreamRequest(
            parameters=build_parameters(
                prompt, n=n, size=size, seed=seed, prior_guidance_scale=prior_guidance_scale,
                decoder_guidance_scale=decoder_guidance_scale, decoder_text_guidance_scale=decoder_text_guidance_scale,
                prior_steps=prior_steps, decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, sampler=sampler,
                prior_candidates=prior_candidates, preview_every=preview_every,
            ),
            delivery=build_delivery(response_format, idempotency_key),
        )
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
            except grpc.RpcError as error:
                delay = None if received else attempts.retry_delay(error)
                if delay is None:
                    raise attempts.error(error) from error
            else:
                raise attempts.protocol_error("the stream ended without a result")
            finally:
                call.cancel()  # a no-op once the call is over; stops the server's work if not
            await asyncio.sleep(delay)

    async def variations(
        self,
        image: ImageInput,
        *,
        n: int = 1,
        size: int | None = None,
        seed: int | None = None,
        decoder_guidance_scale: float | None = None,
        decoder_text_guidance_scale: float | None = None,
        decoder_steps: int | None = None,
        upsampler_steps: int | None = None,
        sampler: str | None = None,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
    ) -> list[GeneratedImage]:
        """`n` variations of `image`; see `Client.variations` for the arguments.

        Raises:
            UnclipError: the call failed (after retries, for UNAVAILABLE).
            ValueError, TypeError: an argument cannot be sent at all.
            OSError: `image` is a path that cannot be read.
        """
        request = images_pb2.CreateVariationsRequest(
            parameters=build_parameters(
                n=n, size=size, seed=seed, decoder_guidance_scale=decoder_guidance_scale,
                decoder_text_guidance_scale=decoder_text_guidance_scale, decoder_steps=decoder_steps,
                upsampler_steps=upsampler_steps, sampler=sampler,
            ),
            delivery=build_delivery(response_format, idempotency_key),
            image=image_bytes(image, "image"),
        )
        return images_from_response((await self._unary("CreateVariations", request, timeout)).result)

    async def edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        mask: ImageInput | None = None,
        n: int = 1,
        size: int | None = None,
        seed: int | None = None,
        prior_guidance_scale: float | None = None,
        decoder_guidance_scale: float | None = None,
        decoder_text_guidance_scale: float | None = None,
        prior_steps: int | None = None,
        decoder_steps: int | None = None,
        upsampler_steps: int | None = None,
        sampler: str | None = None,
        prior_candidates: int | None = None,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
    ) -> list[GeneratedImage]:
        """Inpainting: regenerate the masked region of `image`; see `Client.edit` for the arguments.

        Raises:
            UnclipError: the call failed (after retries, for UNAVAILABLE).
            ValueError, TypeError: an argument cannot be sent at all.
            OSError: `image` or `mask` is a path that cannot be read.
        """
        request = images_pb2.EditRequest(
            parameters=build_parameters(
                prompt, n=n, size=size, seed=seed, prior_guidance_scale=prior_guidance_scale,
                decoder_guidance_scale=decoder_guidance_scale, decoder_text_guidance_scale=decoder_text_guidance_scale,
                prior_steps=prior_steps, decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, sampler=sampler,
                prior_candidates=prior_candidates,
            ),
            delivery=build_delivery(response_format, idempotency_key),
            image=image_bytes(image, "image"),
            mask=b"" if mask is None else image_bytes(mask, "mask"),
        )
        return images_from_response((await self._unary("Edit", request, timeout)).result)

    async def interpolate(
        self,
        *,
        images: tuple[ImageInput, ImageInput] | None = None,
        prompts: tuple[str, str] | None = None,
        frames: int = 5,
        animated_gif: bool = False,
        size: int | None = None,
        seed: int | None = None,
        prior_guidance_scale: float | None = None,
        decoder_guidance_scale: float | None = None,
        decoder_text_guidance_scale: float | None = None,
        prior_steps: int | None = None,
        decoder_steps: int | None = None,
        upsampler_steps: int | None = None,
        sampler: str | None = None,
        prior_candidates: int | None = None,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
    ) -> Animation:
        """Frames between two images or two prompts; see `Client.interpolate` for the arguments.

        Raises:
            UnclipError: the call failed (after retries, for UNAVAILABLE).
            ValueError, TypeError: an argument cannot be sent at all.
            OSError: an image is a path that cannot be read.
        """
        request = images_pb2.InterpolateRequest(
            frames=check_frames(frames),
            animated_gif=animated_gif,
            parameters=build_parameters(
                size=size, seed=seed, prior_guidance_scale=prior_guidance_scale,
                decoder_guidance_scale=decoder_guidance_scale, decoder_text_guidance_scale=decoder_text_guidance_scale,
                prior_steps=prior_steps, decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, sampler=sampler,
                prior_candidates=prior_candidates,
            ),
            delivery=build_delivery(response_format, idempotency_key),
            **interpolate_endpoints(images, prompts),
        )
        return animation_from_response((await self._unary("Interpolate", request, timeout)).result)

    async def text_diff(
        self,
        image: ImageInput,
        caption: str,
        target_caption: str,
        *,
        frames: int = 5,
        max_rotation: float | None = None,
        animated_gif: bool = False,
        size: int | None = None,
        seed: int | None = None,
        decoder_guidance_scale: float | None = None,
        decoder_text_guidance_scale: float | None = None,
        decoder_steps: int | None = None,
        upsampler_steps: int | None = None,
        sampler: str | None = None,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
    ) -> Animation:
        """Frames moving `image` toward `target_caption`; see `Client.text_diff` for the arguments.

        Raises:
            UnclipError: the call failed (after retries, for UNAVAILABLE).
            ValueError, TypeError: an argument cannot be sent at all.
            OSError: `image` is a path that cannot be read.
        """
        request = images_pb2.TextDiffRequest(
            caption=check_text(caption, "caption"),
            target_caption=check_text(target_caption, "target_caption"),
            frames=check_frames(frames),
            max_rotation=check_max_rotation(max_rotation),
            animated_gif=animated_gif,
            parameters=build_parameters(
                size=size, seed=seed, decoder_guidance_scale=decoder_guidance_scale,
                decoder_text_guidance_scale=decoder_text_guidance_scale, decoder_steps=decoder_steps,
                upsampler_steps=upsampler_steps, sampler=sampler,
            ),
            delivery=build_delivery(response_format, idempotency_key),
            image=image_bytes(image, "image"),
        )
        return animation_from_response((await self._unary("TextDiff", request, timeout)).result)

    async def _unary(self, method: str, request: Message, timeout: Timeout) -> Any:
        """The response of the unary RPC `method`; UNAVAILABLE is retried with backoff within the timeout."""
        call = getattr(self._stub(), method)
        attempts = Attempts(method, self.target, self._policy, self._resolve(timeout))
        while True:
            try:
                return await call(request, timeout=attempts.start(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = attempts.retry_delay(error)
                if delay is None:
                    raise attempts.error(error) from error
                await asyncio.sleep(delay)

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

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r}, timeout={self.timeout})"

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

    def _resolve(self, timeout: Timeout) -> float | None:
        return self.timeout if timeout is DEFAULT else check_timeout(timeout)
