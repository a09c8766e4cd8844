"""The gateway's HTTP API, compatible with OpenAI's Images API (the DALL-E 2 endpoints).

    POST /v1/images/generations   JSON       prompt, n, size, response_format (+ model, quality, style, user: ignored)
    POST /v1/images/variations    multipart  image, n, size, response_format (+ model, user: ignored)
    POST /v1/images/edits         multipart  image, mask, prompt, n, size, response_format (+ model, user: ignored)
         generations and edits also take OpenAI's `stream` and `partial_images` (0-3): the answer
         is then server-sent events in OpenAI's shape (gateway.image_stream)
    POST /v1/images/interpolations   (unclip's own) JSON with prompts: [first, second], or multipart
                                  with files first_image and second_image; frames, size, seed, ...:
                                  the frames between the two ends' image embeddings
    GET  /v1/unclip/info          what the deployed models offer: sizes, default steps, versions,
                                  and every parameter with its default, bounds and help
    GET  /                        the playground: a page in the browser over this API (gateway.page)
    GET  /healthz
    GET  /metrics                 Prometheus text exposition of the gateway process (unclip.metrics);
                                  not mounted under Ray Serve, which exports metrics on its own port

Every response carries `x-request-id` (the caller's, or one made up: unclip.observe); one that
returns images also `x-unclip-result-id`, the stored result's id (its folder in the object store).

so the official `openai` SDKs work against a gateway by changing their base URL. Every other
generation parameter the operation takes (`unclip.parameters`: seed, the guidance scales,
steps, sampler, ...) is accepted as an extension field under its own name, e.g. the openai
SDK's `extra_body={"seed": 7}`; image i uses seed + i, as everywhere in unclip. Requests are
validated here, then
handed to the transport-independent image API (`gateway.api`), which runs the pipeline; its
errors become OpenAI-shaped error bodies:

    {"error": {"message": ..., "type": ..., "param": <field or null>, "code": <str or null>}}

    400 invalid_request_error                   bad input (INVALID_ARGUMENT), param names the field
    400 invalid_request_error, code unsupported_operation   FAILED_PRECONDITION: the weights cannot
                                                do it (variations without an image encoder)
    401 invalid_request_error, code invalid_api_key   API keys on (gateway.auth) and the request's
                                                Authorization: Bearer key missing or wrong
    404 / 405 / 413 invalid_request_error       unknown route, wrong method, body or file too large
    408 invalid_request_error, code request_timeout   the body did not arrive within body_timeout
    429 requests, code rate_limit_exceeded      RESOURCE_EXHAUSTED (as OpenAI's request rate limit),
                                                with Retry-After
    503 server_error, code service_unavailable  UNAVAILABLE
    504 server_error, code timeout              DEADLINE_EXCEEDED
    500 server_error                            anything else; logged, never detailed in the body

`create_http_app` returns an ASGI app (Starlette): `unclip serve gateway` serves it with uvicorn
next to the gRPC server (gateway.app), and under Ray Serve the gateway deployment serves it
through Serve's HTTP proxy (unclip.ray_apps.GatewayDeployment). Bodies are read as they stream
in and never buffered past their limits: a JSON body past 1 MiB, an uploaded file past
`max_upload_bytes` or a multipart text field past 64 KiB is refused with 413 as soon as it
gets there; the rest is read and dropped (for up to LINGER_SECONDS), then the connection closes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.admission import DEFAULT_BODY_TIMEOUT_SECONDS
from gateway.api import ImageAPI, RequestOptions, Result
from gateway.auth import HTTPAuthMiddleware
from gateway.image_stream import EVENT_PREFIXES, MAX_PARTIAL_IMAGES, ImageStream, preview_every
from gateway.page import page_routes
from unclip import metrics, observe
from unclip.errors import ResourceExhausted, UnclipError
from unclip.images import MAX_UPLOAD_BYTES
from unclip.manipulations import DEFAULT_FRAMES, MAX_FRAMES
from unclip.parameters import OPERATIONS, GenerationParameters, Group, parameters, spec_of, value_type
from unclip.stage import Stage
from unclip.transport import REQUEST_ID_HEADER

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger("unclip.gateway.http")
T = TypeVar("T")

MAX_JSON_BYTES = 1024 * 1024
MAX_TEXT_FIELD_BYTES = 64 * 1024  # a multipart text field (the prompt is the longest)
MALFORMED_FORM_MESSAGE = "The multipart/form-data body is malformed"
MAX_IDEMPOTENCY_KEY_CHARS = 255
CLIENT_CLOSED = "499"  # the status counted for a request its client hung up on (as nginx logs it)
RESULT_ID_HEADER = "x-unclip-result-id"  # the stored result's id: its folder in the object store
INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."
LINGER_SECONDS = 10.0  # how long the rest of a refused (413) body is read and dropped (as aiohttp's lingering_time)
DEFAULT_RETRY_AFTER_SECONDS = 1  # a 429 whose error does not say
# The most digits an integer field may have: a seed (the largest bound) has 20. Python refuses to
# convert strings of more than 4300 digits at all (ValueError), and a bound check would echo them.
MAX_INTEGER_DIGITS = 20

_IGNORED = frozenset({"model", "user"})  # accepted for compatibility, not used
# What each route takes besides its operation's generation parameters.
_ROUTE_FIELDS = {
    "generate": frozenset({"response_format", "quality", "style"}) | _IGNORED,
    "variations": frozenset({"response_format", "image"}) | _IGNORED,
    "edit": frozenset({"response_format", "image", "mask"}) | _IGNORED,
    "interpolate": frozenset({"response_format", "prompts", "first_image", "second_image", "frames"}),
}
_STREAM_FIELDS = frozenset({"stream", "partial_images", "stage_events"})  # generations and edits
_STREAMED = frozenset(EVENT_PREFIXES)
FILE_FIELDS = frozenset({"image", "mask", "first_image", "second_image"})
# The openai SDK names a list of images "image[]"; one image sent that way is still one image.
_FIELD_ALIASES = {"image[]": "image"}
# InvalidArgument messages start with the field they are about ("size: ...").
_FIELD_PREFIX = re.compile(r"^(\w+):")
_KNOWN_FIELDS = frozenset(item.name for item in parameters()) | frozenset().union(*_ROUTE_FIELDS.values()) | _STREAM_FIELDS
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_FORM_INTEGER = re.compile(r"^-?\d+$")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


def allowed_fields(operation: str) -> frozenset[str]:
    """The fields a route of `operation` accepts: its generation parameters, and OpenAI's own."""
    streaming = _STREAM_FIELDS if operation in _STREAMED else frozenset()
    return frozenset(item.name for item in parameters(operation)) | _ROUTE_FIELDS[operation] | streaming


class HTTPAPIError(Exception):
    """An error answered as OpenAI shapes it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> Response:
        headers = self.headers | dict(headers or {})
        if self.status in (408, 413):
            headers["Connection"] = "close"  # what is left of a refused body may be unread: don't reuse the connection
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _invalid(message: str, param: str | None = None) -> HTTPAPIError:
    return HTTPAPIError(400, message, param=param)


# status_name -> (HTTP status, error type, error code)
_UNCLIP_ERRORS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", None),
    # The request is fine but the deployed weights cannot serve it (no image encoder).
    "FAILED_PRECONDITION": (400, "invalid_request_error", "unsupported_operation"),
    "RESOURCE_EXHAUSTED": (429, "requests", "rate_limit_exceeded"),
    # As OpenAI answers a missing or wrong api_key (gateway.auth answers most before any route).
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),
    "UNAVAILABLE": (503, "server_error", "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "server_error", "timeout"),
}


def error_from_unclip(error: UnclipError) -> HTTPAPIError:
    mapped = _UNCLIP_ERRORS.get(error.status_name)
    if mapped is None:
        log.error("image API failed with %s", error.status_name, exc_info=error)
        return HTTPAPIError(500, INTERNAL_ERROR_MESSAGE, type="server_error")
    status, type_, code = mapped
    message = str(error)
    param = None
    if status == 400 and (match := _FIELD_PREFIX.match(message)) and match[1] in _KNOWN_FIELDS:
        param = match[1]
    headers = None
    if isinstance(error, ResourceExhausted):  # when to come back, in whole seconds (RFC 9110)
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after or DEFAULT_RETRY_AFTER_SECONDS)))}
    return HTTPAPIError(status, message, type=type_, param=param, code=code, headers=headers)


def error_body(error: BaseException) -> dict[str, Any]:
    """The OpenAI-shaped body of an error a streamed request met after its first event (an
    unexpected one is logged where it is caught)."""
    if isinstance(error, UnclipError):
        return error_from_unclip(error).body()
    return HTTPAPIError(500, INTERNAL_ERROR_MESSAGE, type="server_error").body()


def _openai_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint whose errors are answered as OpenAI shapes them: its own, the image API's
    (by status) and anything unexpected (500, logged, never detailed in the body)."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPAPIError as error:
            return error.response()
        except UnclipError as error:
            return error_from_unclip(error).response()
        except ClientDisconnect:
            # Nobody is left to read the answer; a client's hang-up is not a server error.
            log.info("%s %s: the client disconnected before its body was read", request.method, request.scope["path"])
            return _invalid("The client closed the connection before the request body was read").response()
        except Exception:
            log.exception("%s %s failed", request.method, request.scope["path"])
            return HTTPAPIError(500, INTERNAL_ERROR_MESSAGE, type="server_error").response()

    return endpoint


async def _routing_error(request: Request, error: Exception) -> Response:
    """Starlette's own errors (no route: 404, a route without the method: 405) as OpenAI's."""
    assert isinstance(error, HTTPException)
    path = request.scope["path"]
    if error.status_code == 404:
        message = f"Invalid URL ({request.method} {path})"
    elif error.status_code == 405:
        message = f"Method {request.method} is not allowed for {path}"
    else:
        message = error.detail
    allow = (error.headers or {}).get("Allow")
    headers = {"Allow": ", ".join(sorted(allow.split(", ")))} if allow else None  # Starlette's order is a set's
    return HTTPAPIError(error.status_code, message).response(headers)


def _route_name(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The route template a request matches, as "METHOD /path"; "unmatched" for unknown paths
    and methods, so a scanner cannot grow the label set."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL and isinstance(route, Route):
            return f"{scope['method']} {route.path}"
    return "unmatched"


class _CancelOnDisconnect:
    """A client that hangs up stops its work: once the request's body has been read, the next
    message the server gives is http.disconnect, and then the request's task is cancelled, which
    cancels its stage calls (Ray Serve's proxy does the same for a replica on its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()

        async def receive_body() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read.set()
            return message

        answering = asyncio.ensure_future(self.app(scope, receive_body, send))

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            if not answering.done():
                log.info("%s %s: the client went away; cancelling its work", scope["method"], scope["path"])
                answering.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await answering
        except asyncio.CancelledError:
            if not watcher.done():
                raise  # the server's own cancellation, not the client's
        finally:
            watcher.cancel()


class _ObservingMiddleware:
    """Every request observed (`unclip.observe`: request id, span, metrics, log line) by route
    and the status it got, errors included (it wraps the routing and the endpoints, which
    answer every error with a response); every response carries the request id."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], answer_request_id: bool) -> None:
        self.app = app
        self.routes = routes
        self.answer_request_id = answer_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        with observe.observed_request("http", _route_name(self.routes, scope), Headers(scope=scope)) as observed:

            async def send_observed(message: Message) -> None:
                if message["type"] == "http.response.start":
                    observed.finish(str(message["status"]))
                    if self.answer_request_id:
                        MutableHeaders(scope=message)[REQUEST_ID_HEADER] = observed.request_id
                await send(message)

            await self.app(scope, receive, send_observed)
            if not observed.codes:  # returned without answering: its client went away (_CancelOnDisconnect)
                observed.finish(CLIENT_CLOSED)


def _reject_unknown(fields: dict[str, object], allowed: frozenset[str]) -> None:
    for name in fields:
        if name not in allowed:
            raise _invalid(f"Unrecognized request argument supplied: {name}", name)


class _LongInteger:
    """A JSON integer of more than MAX_INTEGER_DIGITS digits, kept as its length: never converted."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-").lstrip("0"))

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def _json_integer(text: str) -> int | _LongInteger:
    """json.loads' parse_int: Python's own int() raises for over 4300 digits (a 400 that could not
    name the field) and spends quadratic time below that."""
    return _LongInteger(text) if len(text.lstrip("-").lstrip("0")) > MAX_INTEGER_DIGITS else int(text)


def _integer(name: str, value: int | _LongInteger) -> int:
    if isinstance(value, _LongInteger):
        raise _invalid(f"{name}: must be an integer of at most {MAX_INTEGER_DIGITS} digits, got {value!r}", name)
    return value


def _shown(value: object) -> str:
    """A value as an error message quotes it: a long one cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _typed(name: str, value: object, from_form: bool, kind: type | None = None) -> Any:
    """A field's value as its type (a parameter's, unless `kind` is given): form fields arrive
    as text, JSON values as they are."""
    kind = value_type(name) if kind is None else kind
    if isinstance(value, _LongInteger):
        if kind is int:
            return _integer(name, value)
    elif from_form and isinstance(value, str):
        if kind is int and _FORM_INTEGER.match(value):
            return _integer(name, _json_integer(value.strip()))
        if kind is float:
            try:
                return float(value)
            except ValueError:
                pass
        if kind is str:
            return value
    elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise _invalid(f"{name}: must be {_TYPE_NAMES[kind]}, got {_shown(value)}", name)


def _size(value: object) -> int:
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise _invalid(f"size: must be a string like '256x256', got {_shown(value)}", "size")
    if match[1] != match[2]:
        raise _invalid(f"size: only square images are supported, got {_shown(value)}", "size")
    return _integer("size", _json_integer(match[1]))


def _parameters(fields: dict[str, object], operation: str, *, from_form: bool) -> GenerationParameters:
    """The generation parameters of a request, validated as the image API will (so a bad one is
    answered before any work), named as in unclip.parameters; `size` in OpenAI's "WxH" form."""
    if Group.PROMPT in OPERATIONS[operation] and fields.get("prompt") is None:
        raise _invalid("Missing required parameter: 'prompt'.", "prompt")
    values: dict[str, Any] = {}
    for item in parameters(operation):
        value = fields.get(item.name)
        if value is not None:  # JSON null: not given
            values[item.name] = _size(value) if item.name == "size" else _typed(item.name, value, from_form)
    params = GenerationParameters(**values)
    params.validate(operation)
    return params


def _options(fields: dict[str, object], deadline: float, idempotency_key: str | None) -> RequestOptions:
    """How the image API serves the request: URLs (OpenAI's default) or base64 PNGs, key, deadline."""
    response_format = fields.get("response_format")
    if response_format is None:
        response_format = "url"
    if response_format not in ("url", "b64_json"):
        raise _invalid(f"response_format: must be 'url' or 'b64_json', got {response_format!r}", "response_format")
    return RequestOptions(want_url=response_format == "url", idempotency_key=idempotency_key, deadline=deadline)


def _flag(name: str, value: object, from_form: bool) -> bool:
    """A boolean field: JSON true/false, or the text "true"/"false" in a form."""
    if isinstance(value, bool):
        return value
    if from_form and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _invalid(f"{name}: must be a boolean, got {_shown(value)}", name)


def _streaming(fields: dict[str, object], *, from_form: bool) -> tuple[bool, int, bool]:
    """(stream, partial_images, stage_events) of a generation or edit request."""
    stream = fields.get("stream")
    stream = stream is not None and _flag("stream", stream, from_form)
    partial = fields.get("partial_images")
    partial_images = 0 if partial is None else _typed("partial_images", partial, from_form, int)
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise _invalid(f"partial_images: must be between 0 and {MAX_PARTIAL_IMAGES}, got {partial_images}", "partial_images")
    stage_events = fields.get("stage_events")
    stage_events = stage_events is not None and _flag("stage_events", stage_events, from_form)
    if not stream:
        for name, given in (("partial_images", partial is not None), ("stage_events", stage_events)):
            if given:
                raise _invalid(f"{name}: only applies to streamed requests (stream: true)", name)
    elif fields.get("response_format") not in (None, "b64_json"):
        raise _invalid("response_format: a streamed request's images come as b64_json", "response_format")
    return stream, partial_images, stage_events


async def _discard_rest(chunks: AsyncIterator[bytes]) -> None:
    """Read and drop the rest of a refused body, for up to LINGER_SECONDS: the 413 closes the
    connection, and a socket closed with unread data resets it, so the client would see a reset
    instead of the answer (aiohttp lingers like this on its own; uvicorn does not)."""
    with contextlib.suppress(TimeoutError, ClientDisconnect):
        async with asyncio.timeout(LINGER_SECONDS):
            async for _ in chunks:
                pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is declared or streams in past `limit` bytes."""
    too_large = HTTPAPIError(413, f"The request body is larger than the limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    body = bytearray()
    async with contextlib.aclosing(request.stream()) as chunks:
        if declared.isdigit() and int(declared) > limit:
            await _discard_rest(chunks)
            raise too_large
        async for chunk in chunks:
            if len(body) + len(chunk) > limit:
                await _discard_rest(chunks)
                raise too_large
            body += chunk
    return bytes(body)


class _FormReader:
    """The parts of a multipart/form-data body as python-multipart streams them in: each named
    part checked against the route's fields before its data is read, and each kept under its
    own limit (files: max_upload_bytes, text fields: MAX_TEXT_FIELD_BYTES)."""

    def __init__(self, allowed: frozenset[str], max_upload_bytes: int) -> None:
        self.allowed = allowed
        self.max_upload_bytes = max_upload_bytes
        self.texts: dict[str, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.complete = False  # the closing boundary was seen
        self._headers: dict[bytes, bytes] = {}
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._name = ""
        self._limit = 0
        self._data = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_name_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    # Header lines are bounded by the parser (size and count per part).
    def _part_begin(self) -> None:
        self._headers = {}
        self._data = bytearray()

    def _header_name_data(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        content_type, _ = parse_options_header(self._headers.get(b"content-type"))
        if content_type.startswith(b"multipart/"):
            raise _invalid("Nested multipart bodies are not supported")
        _, disposition = parse_options_header(self._headers.get(b"content-disposition"))
        if b"name" not in disposition:
            raise _invalid("Every part of the multipart body needs a name")
        given = disposition[b"name"].decode("utf-8", errors="replace")
        name = _FIELD_ALIASES.get(given, given)
        if name not in self.allowed:
            raise _invalid(f"Unrecognized request argument supplied: {given}", given)
        if name in self.texts or name in self.files:
            raise _invalid(f"{name}: given more than once", name)
        self._name = name
        self._limit = self.max_upload_bytes if name in FILE_FIELDS else MAX_TEXT_FIELD_BYTES

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if len(self._data) + (end - start) > self._limit:
            raise HTTPAPIError(413, f"{self._name}: larger than the limit of {self._limit} bytes", param=self._name)
        self._data += data[start:end]

    def _part_end(self) -> None:
        (self.files if self._name in FILE_FIELDS else self.texts)[self._name] = bytes(self._data)

    def _end(self) -> None:
        self.complete = True


def _images_response(result: Result, want_url: bool) -> Response:
    data: list[dict[str, Any]]
    if want_url:
        if any(image.url is None for image in result.images):
            raise _invalid(
                "response_format 'url' needs the gateway's object store, which is not configured; use response_format 'b64_json'",
                "response_format",
            )
        data = [{"url": image.url} for image in result.images]
    else:
        data = [{"b64_json": base64.b64encode(image.png).decode("ascii")} for image in result.images]
    for item, image in zip(data, result.images, strict=True):
        item["seed"] = image.seed  # unclip's own field (OpenAI clients keep it): image i was made with seed + i
    # The request's own id (x-request-id) is answered by the middleware; this names the stored result.
    return JSONResponse({"created": result.created, "data": data}, headers={RESULT_ID_HEADER: result.request_id})


class _Handlers:
    def __init__(self, api: ImageAPI, max_upload_bytes: int, request_timeout: float, body_timeout: float) -> None:
        self.api = api
        self.max_upload_bytes = max_upload_bytes
        self.request_timeout = request_timeout
        self.body_timeout = body_timeout

    async def _received(self, reading: Awaitable[T]) -> T:
        """What reading the body gives, or 408 (the connection then closes) when the body takes
        longer than body_timeout to arrive."""
        timeout = asyncio.timeout(self.body_timeout)
        try:
            async with timeout:
                return await reading
        except TimeoutError:
            if not timeout.expired():
                raise
            message = f"The request body did not arrive within {self.body_timeout:g} seconds"
            raise HTTPAPIError(408, message, code="request_timeout") from None

    def _start(self, request: Request) -> tuple[float, str | None]:
        """(deadline, idempotency key) of a request, before its body is read: its time starts now."""
        return time.monotonic() + self.request_timeout, self._idempotency_key(request)

    @staticmethod
    def _idempotency_key(request: Request) -> str | None:
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise _invalid(f"Idempotency-Key header: must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        return key

    async def _read_json(self, request: Request) -> dict[str, object]:
        body = await _read_body(request, MAX_JSON_BYTES)
        try:
            fields = json.loads(body, parse_int=_json_integer)
        except (ValueError, RecursionError):  # RecursionError: arrays or objects nested too deep
            raise _invalid("We could not parse the JSON body of your request: it must be a JSON object.") from None
        if not isinstance(fields, dict):
            raise _invalid("The JSON body of the request must be an object.")
        return fields

    async def _read_form(self, request: Request, allowed: frozenset[str]) -> tuple[dict[str, object], dict[str, bytes]]:
        """Text fields and files of a multipart body, each read under its own size limit."""
        content_type, options = parse_options_header(request.headers.get("content-type"))
        if content_type != b"multipart/form-data":
            given = content_type.decode("latin-1") or "application/octet-stream"  # what HTTP assumes without one
            raise _invalid(f"Expected a multipart/form-data body, got {given!r}")
        if not options.get(b"boundary"):
            raise _invalid(MALFORMED_FORM_MESSAGE)
        form = _FormReader(allowed, self.max_upload_bytes)
        try:
            parser = MultipartParser(options[b"boundary"], form.callbacks())
            async with contextlib.aclosing(request.stream()) as chunks:
                async for chunk in chunks:
                    try:
                        parser.write(chunk)
                    except HTTPAPIError as error:
                        if error.status == 413:
                            await _discard_rest(chunks)
                        raise
                    if form.complete:
                        break  # what follows the closing boundary is never read
        except FormParserError:  # also an overlong boundary
            raise _invalid(MALFORMED_FORM_MESSAGE) from None
        if not form.complete:  # the body ended inside a part
            raise _invalid(MALFORMED_FORM_MESSAGE)
        fields: dict[str, object] = {}
        for name, value in form.texts.items():
            try:
                fields[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise _invalid(f"{name}: must be UTF-8 text", name) from None
        for name, data in form.files.items():
            if not data:
                raise _invalid(f"{name}: the file is empty", name)
        return fields, form.files

    @staticmethod
    def _image(files: dict[str, bytes]) -> bytes:
        if "image" not in files:
            raise _invalid("Missing required parameter: 'image'.", "image")
        return files["image"]

    async def generations(self, request: Request) -> Response:
        deadline, key = self._start(request)
        fields = await self._received(self._read_json(request))
        _reject_unknown(fields, allowed_fields("generate"))
        params = _parameters(fields, "generate", from_form=False)
        stream, partial_images, stage_events = _streaming(fields, from_form=False)
        if stream:
            options = RequestOptions(idempotency_key=key, deadline=deadline)
            return await self._stream("generate", self.api.generate, params, options, partial_images, stage_events)
        options = _options(fields, deadline, key)
        return _images_response(await self.api.generate(params, options), options.want_url)

    async def _stream(
        self, operation: str, run: Callable[[GenerationParameters, RequestOptions], Awaitable[Result]],
        params: GenerationParameters, options: RequestOptions, partial_images: int, stage_events: bool,
    ) -> Response:  # fmt: skip
        """A generation or edit answered as OpenAI's server-sent events (gateway.image_stream);
        a request refused before its first event gets a plain error answer."""
        if partial_images:
            steps = (await self.api.backend.describe()).steps(params.decoder_steps, Stage.DECODER)
            params = dataclasses.replace(params, preview_every=preview_every(partial_images, steps))
        stream = ImageStream(operation, stage_events=stage_events, error_body=error_body)
        await stream.start(functools.partial(run, params), options, previews=partial_images > 0)
        # No caching or proxy buffering of the events (nginx honours X-Accel-Buffering).
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream.events(), media_type="text/event-stream", headers=headers)

    async def variations(self, request: Request) -> Response:
        deadline, key = self._start(request)
        fields, files = await self._received(self._read_form(request, allowed_fields("variations")))
        image = self._image(files)
        params, options = _parameters(fields, "variations", from_form=True), _options(fields, deadline, key)
        return _images_response(await self.api.variations(image, params, options), options.want_url)

    async def edits(self, request: Request) -> Response:
        deadline, key = self._start(request)
        fields, files = await self._received(self._read_form(request, allowed_fields("edit")))
        image, mask = self._image(files), files.get("mask")
        params = _parameters(fields, "edit", from_form=True)
        stream, partial_images, stage_events = _streaming(fields, from_form=True)
        if stream:
            options = RequestOptions(idempotency_key=key, deadline=deadline)
            edit = functools.partial(self.api.edit, image, mask)
            return await self._stream("edit", edit, params, options, partial_images, stage_events)
        options = _options(fields, deadline, key)
        return _images_response(await self.api.edit(image, mask, params, options), options.want_url)

    async def interpolations(self, request: Request) -> Response:
        """unclip's own route: the frames between two prompts (JSON) or two images (multipart)."""
        deadline, key = self._start(request)
        allowed = allowed_fields("interpolate")
        content_type, _ = parse_options_header(request.headers.get("content-type"))
        from_form = content_type != b"application/json"
        files: dict[str, bytes] = {}
        if from_form:
            fields, files = await self._received(self._read_form(request, allowed))
        else:
            fields = await self._received(self._read_json(request))
            _reject_unknown(fields, allowed)
            for name in ("first_image", "second_image"):
                if name in fields:
                    raise _invalid(f"{name}: must be a file in a multipart/form-data body", name)
        frames = fields.get("frames")
        frames = DEFAULT_FRAMES if frames is None else _typed("frames", frames, from_form, int)
        prompts, images = fields.get("prompts"), (files.get("first_image"), files.get("second_image"))
        params, options = _parameters(fields, "interpolate", from_form=from_form), _options(fields, deadline, key)
        if prompts is not None:
            if any(images):
                raise _invalid("Give either prompts or first_image and second_image, not both", "prompts")
            if not (isinstance(prompts, list) and len(prompts) == 2 and all(isinstance(p, str) for p in prompts)):
                raise _invalid(f"prompts: must be a list of two strings (in a JSON body), got {_shown(prompts)}", "prompts")
            for which, prompt in zip(("first", "second"), prompts, strict=True):
                if not prompt.strip():
                    raise _invalid(f"prompts: the {which} prompt must not be empty", "prompts")
            result = await self.api.interpolate(params, frames, prompts=(prompts[0], prompts[1]), options=options)
        elif images[0] is not None and images[1] is not None:
            result = await self.api.interpolate(params, frames, images=(images[0], images[1]), options=options)
        else:
            missing = "second_image" if images[0] is not None else "first_image" if images[1] is not None else "prompts"
            raise _invalid(f"Missing required parameter: '{missing}' (prompts: [first, second], or two image files).", missing)
        return _images_response(result, options.want_url)

    async def info(self, request: Request) -> Response:
        """What the deployed models offer, and every parameter as unclip.parameters defines it."""
        info = await self.api.backend.describe()
        described = []
        for item in parameters():
            spec = spec_of(item)
            described.append({
                "name": item.name, "type": value_type(item.name).__name__, "default": item.default,
                "low": spec.low, "high": spec.high, "choices": spec.choices, "help": spec.help,
                "operations": sorted(op for op, groups in OPERATIONS.items() if spec.group in groups),
            })  # fmt: skip
        return JSONResponse({
            "sizes": info.output_sizes(), "default_steps": info.default_steps, "models": info.model_versions,
            "max_partial_images": MAX_PARTIAL_IMAGES, "max_frames": MAX_FRAMES, "default_frames": DEFAULT_FRAMES,
            "api_keys": self.api.access.enabled, "parameters": described,
        })  # fmt: skip

    @staticmethod
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @staticmethod
    async def metrics(request: Request) -> Response:
        """Every metric of this process (unclip.metrics), as Prometheus text."""
        body, content_type = metrics.exposition()
        return Response(body, headers={"Content-Type": content_type})


def create_http_app(
    api: ImageAPI,
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    request_timeout: float = 600.0,
    body_timeout: float = DEFAULT_BODY_TIMEOUT_SECONDS,
    metrics_route: bool = True,
    answer_request_id: bool = True,
) -> Starlette:
    """The OpenAI-compatible Images API over `api`, as an ASGI app. Each request gets
    `request_timeout` seconds, of which its body may take `body_timeout` to arrive; uploaded
    files may be at most `max_upload_bytes` each (OpenAI's limit is 4 MB, as the gRPC API's:
    unclip.images.MAX_UPLOAD_BYTES). Under Ray Serve, `metrics_route` False leaves out GET /metrics (Ray exports
    this process's metrics itself) and `answer_request_id` False leaves the response's
    x-request-id to Ray's proxy, which puts the same id in the request's headers and answers it."""
    handlers = _Handlers(api, max_upload_bytes, request_timeout, body_timeout)
    routes: list[BaseRoute] = [
        Route("/v1/images/generations", _openai_errors(handlers.generations), methods=["POST"]),
        Route("/v1/images/variations", _openai_errors(handlers.variations), methods=["POST"]),
        Route("/v1/images/edits", _openai_errors(handlers.edits), methods=["POST"]),
        Route("/v1/images/interpolations", _openai_errors(handlers.interpolations), methods=["POST"]),
        Route("/v1/unclip/info", _openai_errors(handlers.info), methods=["GET"]),
        *page_routes(),
        Route("/healthz", _openai_errors(handlers.healthz), methods=["GET"]),
    ]
    if metrics_route:
        routes.append(Route("/metrics", _openai_errors(handlers.metrics), methods=["GET"]))
    app = Starlette(
        routes=routes,
        # Outermost first: a request cancelled by its client is still observed (as 499, below).
        # Keys are checked after a request is observed (a 401 is logged and counted) and before any work.
        middleware=[
            Middleware(_ObservingMiddleware, routes, answer_request_id),
            Middleware(HTTPAuthMiddleware, api.access),
            Middleware(_CancelOnDisconnect),
        ],
        exception_handlers={HTTPException: _routing_error},
    )
    app.router.redirect_slashes = False  # "/v1/images/generations/" is an unknown URL, not a redirect
    return app
