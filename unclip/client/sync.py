"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TypeVar

import grpc

from unclip.client import requests
from unclip.client.base import ClientBase
from unclip.client.requests import ImageInput, Rpc, takes_parameters
from unclip.client.retry import DEFAULT, Attempts, Timeout
from unclip.client.types import Animation, GeneratedImage, StreamEvent, event_from_stream
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import images_pb2, images_pb2_grpc

T = TypeVar("T")


class Client(ClientBase):
    """A blocking client for an unclip gateway (`unclip.v1.ImageService`).

    Args:
        target: the gateway's address, e.g. "localhost:50051".
        timeout: default seconds a call may take, retries included; None for no limit.
        retries: how many times a call that fails with UNAVAILABLE is tried again (0 = never).
            Other failures are never retried.
        backoff: base of the exponential backoff between retries, in seconds; the wait before
            retry k (0-based) is uniform in [0, min(max_backoff, backoff * 2**k)].
        max_backoff: the longest wait between retries, in seconds.
        credentials: TLS credentials for a secure channel; None for plaintext.
        application: the Ray Serve application to route to, sent as the `application` metadata
            key that Ray Serve's gRPC proxy routes by ("gateway" in the shipped Serve config);
            None for a gateway served directly (`unclip serve`).

    Use it as a context manager, or call `close()` when done. Failed calls raise the
    `unclip.errors` class of their status code (an `UnclipError`: InvalidArgument,
    Unavailable, ...). A client may be shared between threads.

    Every method takes `response_format` ("png": the PNG bytes in the response, the default;
    "url": presigned URLs of the stored PNGs, which the SDK does not download; then each image's
    `url` is set and its `png`, `image` and `metadata` are empty), `idempotency_key` (a retry
    with the same key returns the stored result instead of generating again; URLs and keys need
    a gateway with an object store), `timeout` (seconds for the whole call, retries included;
    by default the client's), and the generation parameters of its operation as keyword
    arguments (`unclip.parameters`; listed in each method's documentation). Images to upload
    (`image`, `mask`, `images`) are PNG, JPEG or WebP bytes, a path to such a file, or a PIL
    image (sent as PNG, alpha kept).

    Methods raise UnclipError when the call fails (after retries, for UNAVAILABLE), TypeError
    or ValueError for an argument that cannot be sent at all, and OSError for an image path
    that cannot be read.
    """

    def _connect(self) -> None:
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=GRPC_OPTIONS)
        else:
            self._channel = grpc.secure_channel(self.target, self._credentials, options=GRPC_OPTIONS)
        self._stub = images_pb2_grpc.ImageServiceStub(self._channel)

    @takes_parameters("generate")
    def generate(
        self,
        prompt: str,
        *,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> list[GeneratedImage]:
        """Generate images for `prompt`: `n` of them, image i from seed + i."""
        return self._unary(requests.generate(prompt, parameters, response_format, idempotency_key), timeout)

    @takes_parameters("generate_stream")
    def generate_stream(
        self,
        prompt: str,
        *,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> Iterator[StreamEvent]:
        """Like `generate`, but yields events as the work goes on, then the images.

        Yields a `StageProgress` as each stage finishes and, when `preview_every` > 0, a
        `Preview` of the decoder's current estimate every `preview_every` decoder steps (and
        after its last); the last item is the list of `GeneratedImage`s.

        The arguments are checked now; the call starts when iteration does, and its timeout covers
        the whole stream. A call that fails before the first event is retried like `generate`;
        once an event has arrived, a failure raises `UnclipError`. Stopping the iteration early
        cancels the call.
        """
        request = requests.generate_stream(prompt, parameters, response_format, idempotency_key)
        return self._stream(request, self._resolve(timeout))

    @takes_parameters("variations")
    def variations(
        self,
        image: ImageInput,
        *,
        response_format: str = "png",
        idempotency_key: str | None = None,
        timeout: Timeout = DEFAULT,
        **parameters: Any,
    ) -> list[GeneratedImage]:
        """`n` variations of `image`: its CLIP image embedding decoded again, image i with seed + i.

        An image the server cannot decode is INVALID_ARGUMENT.
        """
        return self._unary(requests.variations(image, parameters, response_format, idempotency_key), timeout)

    @takes_parameters("edit")
    def edit(
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
        """Inpainting: regenerate part of `image` so that the whole matches `prompt`.

        `image` may have any size (it is centre-cropped and resized to `size`); `prompt`
        describes the whole edited image, not only the new part. `mask`: an image of the same
        size whose fully transparent pixels (alpha 0) mark the region to regenerate; None to use
        `image`'s own alpha channel. Pixels outside the region are kept. A mask without
        transparent pixels, or of another size, is INVALID_ARGUMENT.
        """
        return self._unary(requests.edit(image, prompt, mask, parameters, response_format, idempotency_key), timeout)

    @takes_parameters("interpolate")
    def interpolate(
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
        """Frames between two images or two prompts (give exactly one pair): their image
        embeddings slerped, the prompts' from the prior. `frames` counts both ends (at least 2);
        `animated_gif` also returns them as a GIF. Every frame shares the seed, so only the
        embedding changes."""
        rpc = requests.interpolate(images, prompts, frames, animated_gif, parameters, response_format, idempotency_key)
        return self._unary(rpc, timeout)

    @takes_parameters("text_diff")
    def text_diff(
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
        """A text diff (DALL-E 2): frames moving `image` from `caption` (what it shows) toward
        `target_caption`. `frames` counts the unchanged start (at least 2); `max_rotation`, in
        (0, 1], is how far the last frame moves along the arc toward the text-diff direction
        (None: the server's default, 0.5); `animated_gif` also returns a GIF. Every frame shares
        the seed."""
        rpc = requests.text_diff(
            image, caption, target_caption, frames, max_rotation, animated_gif, parameters, response_format, idempotency_key
        )
        return self._unary(rpc, timeout)

    def _unary(self, rpc: Rpc[T], timeout: Timeout) -> T:
        """The parsed response of a unary RPC; UNAVAILABLE is retried with backoff within the timeout."""
        call = getattr(self._stub, rpc.method)
        attempts = Attempts(rpc.method, self.target, self._policy, self._resolve(timeout))
        while True:
            try:
                return rpc.parse(call(rpc.request, timeout=attempts.start(), metadata=self._metadata))
            except grpc.RpcError as error:
                time.sleep(attempts.failed(error))

    def _stream(self, request: images_pb2.GenerateStreamRequest, timeout: float | None) -> Iterator[StreamEvent]:
        attempts = Attempts("GenerateStream", self.target, self._policy, timeout)
        while True:
            call = self._stub.GenerateStream(request, timeout=attempts.start(), metadata=self._metadata)
            received = False
            try:
                for response in call:
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
            time.sleep(delay)

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.close()
