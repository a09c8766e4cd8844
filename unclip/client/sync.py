"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterator
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


class Client:
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

    Use it as a context manager, or call `close()` when done. Failed calls raise `UnclipError`.
    A client may be shared between threads.

    Every method takes `response_format` ("png": the PNG bytes in the response, the default;
    "url": presigned URLs of the stored PNGs, which the SDK does not download) and
    `idempotency_key` (a retry with the same key returns the stored result instead of
    generating again); both URLs and keys need a gateway with an object store. Images to upload
    (`image`, `mask`, `images`) are PNG, JPEG or WebP bytes, a path to such a file, or a PIL
    image (sent as PNG, alpha kept).
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
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=GRPC_OPTIONS)
        self._stub = images_pb2_grpc.ImageServiceStub(self._channel)

    def generate(
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
        """Generate `n` images for `prompt`.

        Args:
            prompt: what to draw.
            n: number of images; image i uses seed + i.
            size: output side in pixels; None for the largest the gateway serves.
            seed: None for a random one (each image's seed is in its `seed`).
            prior_guidance_scale, decoder_guidance_scale: classifier-free guidance strengths (the
                decoder's is the image embedding's).
            decoder_text_guidance_scale: the caption's own decoder guidance strength, on top of
                decoder_guidance_scale; None for the model's default (or decoder_guidance_scale
                where the model has none). No effect where the decoder gets no prompt
                (variations, interpolations, text diffs).
            prior_steps, decoder_steps, upsampler_steps: denoising steps per stage.
            sampler: "ddim" or "ddpm".
            prior_candidates: image embeddings sampled per image; the closest to the prompt is kept
                (server default 2).
            response_format: "png" (bytes in the response) or "url" (then each image's `url` is
                set, and its `png`, `image` and `metadata` are empty).
            idempotency_key: a retry with the same key returns the stored result.
            timeout: seconds for the whole call, retries included; None for no limit. By default
                the client's.

        Parameters left as None are not sent, so the server's defaults apply.

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
        return images_from_response(self._unary("Generate", request, timeout))

    def generate_stream(
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
        request = images_pb2.GenerateStreamRequest(
            parameters=build_parameters(
                prompt, n=n, size=size, seed=seed, prior_guidance_scale=prior_guidance_scale,
                decoder_guidance_scale=decoder_guidance_scale, decoder_text_guidance_scale=decoder_text_guidance_scale,
                prior_steps=prior_steps, decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, sampler=sampler,
                prior_candidates=prior_candidates, preview_every=preview_every,
            ),
            delivery=build_delivery(response_format, idempotency_key),
        )
        return self._stream(request, self._resolve(timeout))

    def variations(
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
        """`n` variations of `image`: its CLIP image embedding decoded again, image i with seed + i.

        The other arguments are as for `generate`; the prompt and prior play no part.

        Raises:
            UnclipError: the call failed (after retries, for UNAVAILABLE); an image the server
                cannot decode is INVALID_ARGUMENT.
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
        return images_from_response(self._unary("CreateVariations", request, timeout).result)

    def edit(
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
        """Inpainting: regenerate part of `image` so that the whole matches `prompt`.

        Args:
            image: the image to edit, at any size (it is centre-cropped and resized to `size`).
            prompt: describes the whole edited image, not only the new part.
            mask: an image of the same size whose fully transparent pixels (alpha 0) mark the
                region to regenerate; None to use `image`'s own alpha channel.

        The other arguments are as for `generate`. Pixels outside the region are kept.

        Raises:
            UnclipError: the call failed (after retries, for UNAVAILABLE); a mask without
                transparent pixels, or of another size, is INVALID_ARGUMENT.
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
        return images_from_response(self._unary("Edit", request, timeout).result)

    def interpolate(
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
        """Frames between two images or two prompts: their image embeddings slerped.

        Args:
            images: the two end images; or
            prompts: the two end prompts (their embeddings come from the prior).
            frames: number of frames, both ends included (at least 2).
            animated_gif: also return the frames as an animated GIF.
            seed: shared by every frame, so only the embedding changes; None for a random one.

        The other arguments are as for `generate` (the prior settings apply to prompts only).

        Raises:
            UnclipError: the call failed (after retries, for UNAVAILABLE).
            ValueError, TypeError: an argument cannot be sent at all, or not exactly one of
                `images` and `prompts` is given.
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
        return animation_from_response(self._unary("Interpolate", request, timeout).result)

    def text_diff(
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
        """A text diff (DALL-E 2): frames moving `image` from `caption` toward `target_caption`.

        Args:
            image: the image to change.
            caption: what the image shows now.
            target_caption: what it should show.
            frames: number of frames, the unchanged start included (at least 2).
            max_rotation: how far the last frame moves along the arc toward the text-diff
                direction, in (0, 1]; None for the server's default (0.5).
            animated_gif: also return the frames as an animated GIF.
            seed: shared by every frame; None for a random one.

        The other arguments are as for `generate`.

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
        return animation_from_response(self._unary("TextDiff", request, timeout).result)

    def _unary(self, method: str, request: Message, timeout: Timeout) -> Any:
        """The response of the unary RPC `method`; UNAVAILABLE is retried with backoff within the timeout."""
        call = getattr(self._stub, method)
        attempts = Attempts(method, self.target, self._policy, self._resolve(timeout))
        while True:
            try:
                return call(request, timeout=attempts.start(), metadata=self._metadata)
            except grpc.RpcError as error:
                delay = attempts.retry_delay(error)
                if delay is None:
                    raise attempts.error(error) from error
                time.sleep(delay)

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
            except grpc.RpcError as error:
                delay = None if received else attempts.retry_delay(error)
                if delay is None:
                    raise attempts.error(error) from error
            else:
                raise attempts.protocol_error("the stream ended without a result")
            finally:
                call.cancel()  # a no-op once the call is over; stops the server's work if not
            time.sleep(delay)

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r}, timeout={self.timeout})"

    def _resolve(self, timeout: Timeout) -> float | None:
        return self.timeout if timeout is DEFAULT else check_timeout(timeout)
