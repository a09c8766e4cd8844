"""What every unclip gRPC server checks before a request reaches its servicer.

- Message size: each server receives at most its largest valid request (`gateway_request_bytes`,
  `stage_request_bytes`); gRPC answers a larger one with RESOURCE_EXHAUSTED before reading it.
- Malformed requests: bytes that do not parse as the method's request message are answered with
  INVALID_ARGUMENT (grpc.aio's own answer is UNKNOWN "Unexpected DecodeError"), for every method
  of every service, health and reflection included (`RequestGuard`).
- A default deadline: a call that arrives without one gets `default_timeout` seconds, which the
  servicers read through `time_remaining` and pass on to the stages they call.

Under Ray Serve the proxies parse requests and apply their own limits; see docs/deploy.md.
"""

from __future__ import annotations

import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from unclip import observe
from unclip.images import MAX_UPLOAD_BYTES
from unclip.manipulations import MAX_FRAMES
from unclip.parameters import MAX_IMAGES_PER_REQUEST, MAX_PROMPT_CHARS
from unclip.stage import Stage
from unclip.transport import MAX_MESSAGE_BYTES
from unclip.validation import MAX_OUTPUT_SIDE

# A call without a deadline of its own gets this many seconds (`unclip serve --default-timeout`),
# as the HTTP API's request timeout and Ray Serve's request_timeout_s.
DEFAULT_TIMEOUT_SECONDS = 600.0

# -- message sizes ---------------------------------------------------------------------------

# Room for everything in a request besides its images or tensors: every text field at its limit
# (UTF-8, up to 4 bytes a character), an idempotency key, numbers, field tags, tensor headers.
_ENVELOPE_BYTES = 64 * 1024 + 8 * MAX_PROMPT_CHARS
# A CLIP text encoding per row: a 77-token context at width up to 1280 (ViT-bigG), float32,
# with its mask and embedding.
_TEXT_BYTES_PER_ROW = 77 * 1280 * 4 + 77 + 1280 * 4
_IMAGE_BYTES = MAX_OUTPUT_SIDE * MAX_OUTPUT_SIDE * 3  # uint8 RGB at the largest side
_MASK_BYTES = MAX_OUTPUT_SIDE * MAX_OUTPUT_SIDE  # bool
# An upsampler's input as float32 at half the largest side (the smallest scale factor is 2).
_FLOAT_INPUT_BYTES = (MAX_OUTPUT_SIDE // 2) ** 2 * 3 * 4


def gateway_request_bytes() -> int:
    """The gateway's largest valid request: two uploads (an interpolation's ends, or an edit's
    image and mask) at MAX_UPLOAD_BYTES each, and its text fields."""
    return 2 * MAX_UPLOAD_BYTES + _ENVELOPE_BYTES


def stage_request_bytes(stage: Stage) -> int:
    """A stage's largest valid request: the largest call the gateway makes of it, for a request
    within the gateway's limits (MAX_IMAGES_PER_REQUEST images, MAX_FRAMES frames, sides up to
    MAX_OUTPUT_SIDE). Edits carry an image and a mask per row to the decoder and upsamplers;
    interpolations carry MAX_FRAMES rows without them."""
    rows, frames = MAX_IMAGES_PER_REQUEST, MAX_FRAMES
    tensors = {
        Stage.ENCODER: 2 * _IMAGE_BYTES,  # an interpolation's two ends; other operations embed one image
        Stage.PRIOR: rows * _TEXT_BYTES_PER_ROW,
        Stage.DECODER: max(rows * (_TEXT_BYTES_PER_ROW + _IMAGE_BYTES + _MASK_BYTES), frames * _TEXT_BYTES_PER_ROW),
        Stage.UPSAMPLER: max(rows * (_FLOAT_INPUT_BYTES + _IMAGE_BYTES + _MASK_BYTES), frames * _FLOAT_INPUT_BYTES),
    }[stage]
    return tensors + _ENVELOPE_BYTES


def server_options(max_receive_bytes: int) -> list[tuple[str, int]]:
    """A server's gRPC options: it sends up to MAX_MESSAGE_BYTES (results, tensors) and receives
    at most `max_receive_bytes`."""
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", max_receive_bytes)]


# -- deadlines -------------------------------------------------------------------------------

_default_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("unclip_default_deadline", default=None)


def time_remaining(context: Any) -> float | None:
    """Seconds left to the call: its own deadline's, else the server's default deadline's
    (`RequestGuard`), else None (no deadline)."""
    remaining = context.time_remaining()
    if remaining is not None:
        return remaining
    deadline = _default_deadline.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# -- the interceptor -------------------------------------------------------------------------


class _Malformed:
    """What the guarded deserializer gives for bytes that are not the request message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class RequestGuard(grpc.aio.ServerInterceptor):
    """Answers requests that do not parse with INVALID_ARGUMENT, and gives calls without a
    deadline `default_timeout` seconds (None: none). Installed by `unclip.serving.Server`."""

    def __init__(self, default_timeout: float | None = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.default_timeout = default_timeout

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        return _guarded(handler, handler_call_details.method, self.default_timeout)


def _guarded(handler: grpc.RpcMethodHandler, method: str, default_timeout: float | None) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that never raises, and behaviour that refuses what it could
    not parse and sets the default deadline."""
    deserialize = handler.request_deserializer
    name = method.rsplit("/", 1)[-1]

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception as error:  # noqa: BLE001 - whatever the parser raises, the bytes were the caller's
            return _Malformed(error)

    async def refuse(context: grpc.aio.ServicerContext, malformed: _Malformed) -> None:
        # Observed like any answered request (request id, metrics, log line), then refused.
        metadata = tuple(context.invocation_metadata() or ())
        headers = {key: value for key, value in metadata if isinstance(value, str)}
        with observe.observed_request("grpc", name, headers) as observed:
            context.set_trailing_metadata([(observe.REQUEST_ID_HEADER, observed.request_id)])
            observed.finish("INVALID_ARGUMENT")
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {name} request message: {malformed.error}"
        )

    def start(context: grpc.aio.ServicerContext) -> None:
        if default_timeout is not None and context.time_remaining() is None:
            _default_deadline.set(time.monotonic() + default_timeout)

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Malformed):
                await refuse(context, request)
            yield request

    inner: Any  # the servicer's behaviour, of the handler's kind
    if not handler.request_streaming and not handler.response_streaming:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await refuse(context, request)
            start(context)
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(unary_unary, parse, handler.response_serializer)
    if not handler.request_streaming:
        inner = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                await refuse(context, request)
            start(context)
            behavior = inner(request, context)
            if inspect.isasyncgen(behavior):
                async for response in behavior:
                    yield response
            elif inspect.isawaitable(behavior):  # a handler that writes with context.write
                await behavior

        return grpc.unary_stream_rpc_method_handler(unary_stream, parse, handler.response_serializer)
    if not handler.response_streaming:
        inner = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            start(context)
            result = inner(checked(requests, context), context)
            return await result if inspect.isawaitable(result) else result

        return grpc.stream_unary_rpc_method_handler(stream_unary, parse, handler.response_serializer)
    inner = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        start(context)
        behavior = inner(checked(requests, context), context)
        if inspect.isasyncgen(behavior):
            async for response in behavior:
                yield response
        elif inspect.isawaitable(behavior):
            await behavior

    return grpc.stream_stream_rpc_method_handler(stream_stream, parse, handler.response_serializer)
