"""The gateway's HTTP API, compatible with OpenAI's Images API (the DALL-E 2 endpoints).

    POST /v1/images/generations   JSON       prompt, n, size, response_format (+ model, quality, style, user: ignored)
    POST /v1/images/variations    multipart  image, n, size, response_format (+ model, user: ignored)
    POST /v1/images/edits         multipart  image, mask, prompt, n, size, response_format (+ model, user: ignored)
    GET  /healthz
    GET  /metrics                 Prometheus text exposition of the gateway process (unclip.metrics)

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
    404 / 405 / 413 invalid_request_error       unknown route, wrong method, body or file too large
    429 requests, code rate_limit_exceeded      RESOURCE_EXHAUSTED (as OpenAI's request rate limit)
    503 server_error, code service_unavailable  UNAVAILABLE
    504 server_error, code timeout              DEADLINE_EXCEEDED
    500 server_error                            anything else; logged, never detailed in the body
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from gateway.api import ImageAPI, RequestOptions, Result
from unclip import metrics
from unclip.errors import UnclipError
from unclip.parameters import OPERATIONS, GenerationParameters, Group, parameters, value_type

log = logging.getLogger("unclip.gateway.http")

MAX_JSON_BYTES = 1024 * 1024
MAX_TEXT_FIELD_BYTES = 64 * 1024  # a multipart text field (the prompt is the longest)
MAX_IDEMPOTENCY_KEY_CHARS = 255
INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."

_IGNORED = frozenset({"model", "user"})  # accepted for compatibility, not used
# What each route takes besides its operation's generation parameters.
_ROUTE_FIELDS = {
    "generate": frozenset({"response_format", "quality", "style"}) | _IGNORED,
    "variations": frozenset({"response_format", "image"}) | _IGNORED,
    "edit": frozenset({"response_format", "image", "mask"}) | _IGNORED,
}
FILE_FIELDS = frozenset({"image", "mask"})
# The openai SDK names a list of images "image[]"; one image sent that way is still one image.
_FIELD_ALIASES = {"image[]": "image"}
# InvalidArgument messages start with the field they are about ("size: ...").
_FIELD_PREFIX = re.compile(r"^(\w+):")
_KNOWN_FIELDS = frozenset(item.name for item in parameters()) | frozenset().union(*_ROUTE_FIELDS.values())
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_FORM_INTEGER = re.compile(r"^-?\d+$")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string"}


def allowed_fields(operation: str) -> frozenset[str]:
    """The fields a route of `operation` accepts: its generation parameters, and OpenAI's own."""
    return frozenset(item.name for item in parameters(operation)) | _ROUTE_FIELDS[operation]


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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return web.json_response({"error": error}, status=self.status, headers=headers)


def _invalid(message: str, param: str | None = None) -> HTTPAPIError:
    return HTTPAPIError(400, message, param=param)


# status_name -> (HTTP status, error type, error code)
_UNCLIP_ERRORS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", None),
    # The request is fine but the deployed weights cannot serve it (no image encoder).
    "FAILED_PRECONDITION": (400, "invalid_request_error", "unsupported_operation"),
    "RESOURCE_EXHAUSTED": (429, "requests", "rate_limit_exceeded"),
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
    return HTTPAPIError(status, message, type=type_, param=param, code=code)


@web.middleware
async def _errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HTTPAPIError as error:
        response = error.response()
        if error.status == 413:
            response.force_close()  # the rest of the body is unread: don't reuse the connection
        return response
    except UnclipError as error:
        return error_from_unclip(error).response()
    except web.HTTPException as error:  # raised by aiohttp itself: routing, client_max_size
        if error.status < 400:
            raise
        if isinstance(error, web.HTTPNotFound):
            message = f"Invalid URL ({request.method} {request.path})"
        elif isinstance(error, web.HTTPMethodNotAllowed):
            message = f"Method {request.method} is not allowed for {request.path}"
        else:
            message = error.text or error.reason
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return HTTPAPIError(error.status, message).response(headers)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return HTTPAPIError(500, INTERNAL_ERROR_MESSAGE, type="server_error").response()


@web.middleware
async def _metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Count and time every request by route (unknown paths as one label, so a scanner cannot
    grow the label set) and the status it got, errors included (this runs outside
    _errors_middleware, which turns them into responses)."""
    resource = request.match_info.route.resource
    route = f"{request.method} {resource.canonical}" if resource is not None else "unmatched"
    with metrics.measured_request("http", route) as code:
        response = await handler(request)
        code.append(str(response.status))
        return response


def _reject_unknown(fields: dict[str, object], allowed: frozenset[str]) -> None:
    for name in fields:
        if name not in allowed:
            raise _invalid(f"Unrecognized request argument supplied: {name}", name)


def _typed(name: str, value: object, from_form: bool) -> object:
    """A parameter's value as its type: form fields arrive as text, JSON values as they are."""
    kind = value_type(name)
    if from_form and isinstance(value, str):
        if kind is int and _FORM_INTEGER.match(value):
            return int(value)
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
    raise _invalid(f"{name}: must be {_TYPE_NAMES[kind]}, got {value!r}", name)


def _size(value: object) -> int:
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise _invalid(f"size: must be a string like '256x256', got {value!r}", "size")
    if match[1] != match[2]:
        raise _invalid(f"size: only square images are supported, got {value!r}", "size")
    return int(match[1])


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


async def _read_part(part: BodyPartReader, name: str, limit: int) -> bytes:
    data = bytearray()
    while not part.at_eof():
        data += await part.read_chunk()
        if len(data) > limit:
            raise HTTPAPIError(413, f"{name}: larger than the limit of {limit} bytes", param=name)
    return bytes(data)


def _images_response(result: Result, want_url: bool) -> web.Response:
    if want_url:
        if any(image.url is None for image in result.images):
            raise _invalid(
                "response_format 'url' needs the gateway's object store, which is not configured; use response_format 'b64_json'",
                "response_format",
            )
        data = [{"url": image.url} for image in result.images]
    else:
        data = [{"b64_json": base64.b64encode(image.png).decode("ascii")} for image in result.images]
    return web.json_response({"created": result.created, "data": data}, headers={"x-request-id": result.request_id})


class _Handlers:
    def __init__(self, api: ImageAPI, max_upload_bytes: int, request_timeout: float) -> None:
        self.api = api
        self.max_upload_bytes = max_upload_bytes
        self.request_timeout = request_timeout

    def _start(self, request: web.Request) -> tuple[float, str | None]:
        """(deadline, idempotency key) of a request, before its body is read: its time starts now."""
        return time.monotonic() + self.request_timeout, self._idempotency_key(request)

    @staticmethod
    def _idempotency_key(request: web.Request) -> str | None:
        key = request.headers.get("Idempotency-Key")
        if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise _invalid(f"Idempotency-Key header: must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        return key

    async def _read_json(self, request: web.Request) -> dict[str, object]:
        body = await request.read()  # over the app's client_max_size: aiohttp raises 413
        try:
            fields = json.loads(body)
        except ValueError:
            raise _invalid("We could not parse the JSON body of your request: it must be a JSON object.") from None
        if not isinstance(fields, dict):
            raise _invalid("The JSON body of the request must be an object.")
        return fields

    async def _read_form(self, request: web.Request, allowed: frozenset[str]) -> tuple[dict[str, object], dict[str, bytes]]:
        """Text fields and files of a multipart body, each read under its own size limit."""
        if request.content_type != "multipart/form-data":
            raise _invalid(f"Expected a multipart/form-data body, got {request.content_type!r}")
        texts: dict[str, bytes] = {}
        files: dict[str, bytes] = {}
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise _invalid("Nested multipart bodies are not supported")
                if part.name is None:
                    raise _invalid("Every part of the multipart body needs a name")
                name = _FIELD_ALIASES.get(part.name, part.name)
                if name not in allowed:
                    raise _invalid(f"Unrecognized request argument supplied: {part.name}", part.name)
                if name in texts or name in files:
                    raise _invalid(f"{name}: given more than once", name)
                if name in FILE_FIELDS:
                    files[name] = await _read_part(part, name, self.max_upload_bytes)
                else:
                    texts[name] = await _read_part(part, name, MAX_TEXT_FIELD_BYTES)
        except (ValueError, BadHttpMessage):
            raise _invalid("The multipart/form-data body is malformed") from None
        fields: dict[str, str] = {}
        for name, value in texts.items():
            try:
                fields[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise _invalid(f"{name}: must be UTF-8 text", name) from None
        for name, data in files.items():
            if not data:
                raise _invalid(f"{name}: the file is empty", name)
        return dict(fields), files

    @staticmethod
    def _image(files: dict[str, bytes]) -> bytes:
        if "image" not in files:
            raise _invalid("Missing required parameter: 'image'.", "image")
        return files["image"]

    async def generations(self, request: web.Request) -> web.Response:
        deadline, key = self._start(request)
        fields = await self._read_json(request)
        _reject_unknown(fields, allowed_fields("generate"))
        params, options = _parameters(fields, "generate", from_form=False), _options(fields, deadline, key)
        return _images_response(await self.api.generate(params, options), options.want_url)

    async def variations(self, request: web.Request) -> web.Response:
        deadline, key = self._start(request)
        fields, files = await self._read_form(request, allowed_fields("variations"))
        image = self._image(files)
        params, options = _parameters(fields, "variations", from_form=True), _options(fields, deadline, key)
        return _images_response(await self.api.variations(image, params, options), options.want_url)

    async def edits(self, request: web.Request) -> web.Response:
        deadline, key = self._start(request)
        fields, files = await self._read_form(request, allowed_fields("edit"))
        image = self._image(files)
        params, options = _parameters(fields, "edit", from_form=True), _options(fields, deadline, key)
        return _images_response(await self.api.edit(image, files.get("mask"), params, options), options.want_url)

    @staticmethod
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def create_http_app(api: ImageAPI, *, max_upload_bytes: int = 4 * 1024 * 1024, request_timeout: float = 600.0) -> web.Application:
    """The OpenAI-compatible Images API over `api`. Each request gets `request_timeout` seconds;
    uploaded files may be at most `max_upload_bytes` each (OpenAI's limit is 4 MB)."""
    handlers = _Handlers(api, max_upload_bytes, request_timeout)
    # client_max_size bounds the JSON body; multipart parts are bounded one by one in _read_form.
    app = web.Application(middlewares=[_metrics_middleware, _errors_middleware], client_max_size=MAX_JSON_BYTES)
    app.router.add_post("/v1/images/generations", handlers.generations)
    app.router.add_post("/v1/images/variations", handlers.variations)
    app.router.add_post("/v1/images/edits", handlers.edits)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/metrics", metrics.scrape)
    return app
