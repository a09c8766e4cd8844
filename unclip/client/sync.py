"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterator
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


class Client(ClientBase, Operations[list[GeneratedImage], Animation, Iterator[StreamEvent]]):
    """A blocking client for an unclip gateway (`unclip.v1.ImageService`).

    Args:
        target: the gateway's address, e.g. "localhost:50051".
        timeout: default seconds a call may take, retries included; None for no limit.
        retries: how many times a call that fails with UNAVAILABLE is tried again (0 = never).
            Other failures are never retried.
        backoff: base of the exponential backoff between retries, in seconds; the wait before
            retry k (0-based) is uniform in [0, min(max_backoff, backoff * 2**k)].
        max_backoff: the longest wait between retries, in seconds.
        credentials: TLS credentials for a secure channel; None for plaintext. For a gateway
            whose certificate a private CA signed (`unclip certs init` writes one):
            `unclip.tls.channel_credentials(ca="ca.crt")`; add `cert=` and `key=` for a
            gateway that asks for a client certificate; `grpc.ssl_channel_credentials()` for
            a certificate from a public CA.
        application: the Ray Serve application to route to, sent as the `application` metadata
            key that Ray Serve's gRPC proxy routes by ("gateway" in the shipped Serve config);
            None for a gateway served directly (`unclip serve`).
        api_key: the gateway's API key (`unclip keys create`), sent as `authorization: Bearer <key>`
            metadata with every call; None for a gateway without keys. A missing or wrong key
            raises `Unauthenticated`.

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

    def _unary(self, rpc: Rpc[T], timeout: Timeout) -> T:
        """The parsed response of a unary RPC; UNAVAILABLE is retried with backoff within the timeout."""
        call = getattr(self._stub, rpc.method)
        attempts = Attempts(rpc.method, self.target, self._policy, self._resolve(timeout))
        while True:
            try:
                return rpc.parse(call(rpc.request, timeout=attempts.start(), metadata=self._metadata))
            except grpc.RpcError as error:
                time.sleep(attempts.failed(error))

    def _stream(self, request: images_pb2.GenerateStreamRequest, timeout: Timeout) -> Iterator[StreamEvent]:
        attempts = Attempts("GenerateStream", self.target, self._policy, self._resolve(timeout))
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
