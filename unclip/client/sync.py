"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType

import grpc

from unclip.client._common import (
    DEFAULT,
    Attempts,
    GeneratedImage,
    RetryPolicy,
    StageProgress,
    Timeout,
    build_parameters,
    check_timeout,
    images_from_response,
    progress_from_proto,
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

    Use it as a context manager, or call `close()` when done. Failed calls raise `UnclipError`.
    A client may be shared between threads.
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
    ):
        self.target = target
        self.timeout = check_timeout(timeout)
        self._policy = RetryPolicy(retries, backoff, max_backoff)
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
        prior_steps: int | None = None,
        decoder_steps: int | None = None,
        upsampler_steps: int | None = None,
        sampler: str | None = None,
        prior_candidates: int | None = None,
        timeout: Timeout = DEFAULT,
    ) -> list[GeneratedImage]:
        """Generate `n` images for `prompt`.

        Args:
            prompt: what to draw.
            n: number of images; image i uses seed + i.
            size: output side in pixels; None for the largest the gateway serves.
            seed: None for a random one (each image's seed is in its `seed`).
            prior_guidance_scale, decoder_guidance_scale: classifier-free guidance strengths.
            prior_steps, decoder_steps, upsampler_steps: denoising steps per stage.
            sampler: "ddim" or "ddpm".
            prior_candidates: image embeddings sampled per image; the closest to the prompt is kept.
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
                decoder_guidance_scale=decoder_guidance_scale, prior_steps=prior_steps,
                decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, sampler=sampler,
                prior_candidates=prior_candidates,
            )
        )
        attempts = Attempts("Generate", self.target, self._policy, self._resolve(timeout))
        while True:
            try:
                response = self._stub.Generate(request, timeout=attempts.start())
            except grpc.RpcError as error:
                delay = attempts.retry_delay(error)
                if delay is None:
                    raise attempts.error(error) from error
                time.sleep(delay)
            else:
                return images_from_response(response)

    def generate_stream(
        self,
        prompt: str,
        *,
        n: int = 1,
        size: int | None = None,
        seed: int | None = None,
        prior_guidance_scale: float | None = None,
        decoder_guidance_scale: float | None = None,
        prior_steps: int | None = None,
        decoder_steps: int | None = None,
        upsampler_steps: int | None = None,
        sampler: str | None = None,
        prior_candidates: int | None = None,
        timeout: Timeout = DEFAULT,
    ) -> Iterator[StageProgress | list[GeneratedImage]]:
        """Like `generate`, but yields a `StageProgress` as each stage finishes, then the images.

        The arguments are checked now; the call starts when iteration does, and its timeout covers
        the whole stream. A call that fails before the first event is retried like `generate`;
        once an event has arrived, a failure raises `UnclipError`. Stopping the iteration early
        cancels the call.
        """
        request = images_pb2.GenerateStreamRequest(
            parameters=build_parameters(
                prompt, n=n, size=size, seed=seed, prior_guidance_scale=prior_guidance_scale,
                decoder_guidance_scale=decoder_guidance_scale, prior_steps=prior_steps,
                decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, sampler=sampler,
                prior_candidates=prior_candidates,
            )
        )
        return self._stream(request, self._resolve(timeout))

    def _stream(
        self, request: images_pb2.GenerateStreamRequest, timeout: float | None
    ) -> Iterator[StageProgress | list[GeneratedImage]]:
        attempts = Attempts("GenerateStream", self.target, self._policy, timeout)
        while True:
            call = self._stub.GenerateStream(request, timeout=attempts.start())
            received = False
            try:
                for response in call:
                    received = True
                    if response.HasField("result"):
                        yield images_from_response(response.result)
                        return
                    if response.HasField("progress"):
                        yield progress_from_proto(response.progress)
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
