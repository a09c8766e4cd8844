"""The gateway's HTTP API, compatible with OpenAI's Images API (the DALL-E 2 endpoints).

    POST /v1/images/generations   JSON       prompt, n, size, response_format, seed (+ model, quality, style, user: ignored)
    POST /v1/images/variations    multipart  image, n, size, response_format, seed (+ model, user: ignored)
    POST /v1/images/edits         multipart  image, mask, prompt, n, size, response_format, seed (+ model, user: ignored)
    GET  /healthz

so the official `openai` SDKs work against a gateway by changing their base URL. `seed` is an
extension (image i uses seed + i, as everywhere in unclip). Requests are validated here, then
handed to the transport-independent image API (`gateway.api`), which runs the pipeline; its
errors become OpenAI-shaped error bodies:

    {"error": {"message": ..., "type": ..., "param": <field or null>, "code": <str or null>}}

    400 invalid_request_error                   bad input (INVALID_ARGUMENT), param names the field
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
from dataclasses import dataclass
from typing import Protocol

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from gateway.api import Result
from unclip.errors import UnclipError
from unclip.pipeline import GenerationParameters

log = logging.getLogger("unclip.gateway.http")

MAX_N = 10  # OpenAI's limit; the image API enforces its own, lower one
MAX_JSON_BYTES = 1024 * 1024
MAX_TEXT_FIELD_BYTES = 64 * 1024  # a multipart text field (the prompt is the longest)
MAX_IDEMPOTENCY_KEY_CHARS = 255
INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."

_IGNORED = frozenset({"model", "user"})  # accepted for compatibility, not used
_COMMON = frozenset({"n", "size", "response_format", "seed"}) | _IGNORED
GENERATION_FIELDS = _COMMON | {"prompt", "quality", "style"}
VARIATION_FIELDS = _COMMON | {"image"}
EDIT_FIELDS = _COMMON | {"image", "mask", "prompt"}
FILE_FIELDS = frozenset({"image", "mask"})
# The openai SDK names a list of images "image[]"; one image sent that way is still one image.
_FIELD_ALIASES = {"image[]": "image"}
# The image API's InvalidArgument messages start with the field they are about ("size: ...").
_FIELD_PREFIX = re.compile(r"^(\w+):")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_FORM_INTEGER = re.compile(r"^-?\d+$")


class ImageBackend(Protocol):
    """The part of the gateway's image API (`gateway.api`) this transport calls."""

    async def generate(
        self, params: GenerationParameters, *, want_url: bool = False, idempotency_key: str | None = None,
        deadline: float | None = None,
    ) -> Result: ...

    async def variations(
        self, image: bytes, *, n: int = 1, size: int | None = None, seed: int | None = None, want_url: bool = False,
        idempotency_key: str | None = None, deadline: float | None = None,
    ) -> Result: ...

    async def edit(
        self, image: bytes, mask: bytes | None, params: GenerationParameters, *, want_url: bool = False,
        idempotency_key: str | None = None, deadline: float | None = None,
    ) -> Result: ...


class HTTPAPIError(Exception):
    """An error answered as OpenAI shapes it."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
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
    if status == 400 and (match := _FIELD_PREFIX.match(message)) and match[1] in GENERATION_FIELDS | EDIT_FIELDS:
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


@dataclass
class _Options:
    """The options every endpoint shares, validated."""

    n: int
    size: int | None  # None: the largest the gateway serves
    seed: int | None
    want_url: bool


def _reject_unknown(fields: dict[str, object], allowed: frozenset[str]) -> None:
    for name in fields:
        if name not in allowed:
            raise _invalid(f"Unrecognized request argument supplied: {name}", name)


def _prompt(fields: dict[str, object]) -> str:
    prompt = fields.get("prompt")
    if prompt is None:
        raise _invalid("Missing required parameter: 'prompt'.", "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("prompt: must be a non-empty string", "prompt")
    return prompt


def _integer(fields: dict[str, object], name: str) -> int | None:
    value = fields.get(name)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise _invalid(f"{name}: must be an integer, got {value!r}", name)


def _options(fields: dict[str, object]) -> _Options:
    n = _integer(fields, "n")
    if n is None:
        n = 1
    if not 1 <= n <= MAX_N:
        raise _invalid(f"n: must be between 1 and {MAX_N}, got {n}", "n")

    size = None
    requested_size = fields.get("size")
    if requested_size is not None:
        match = _SIZE.match(requested_size) if isinstance(requested_size, str) else None
        if match is None:
            raise _invalid(f"size: must be a string like '256x256', got {requested_size!r}", "size")
        if match[1] != match[2]:
            raise _invalid(f"size: only square images are supported, got {requested_size!r}", "size")
        size = int(match[1])

    response_format = fields.get("response_format")
    if response_format is None:
        response_format = "url"
    if response_format not in ("url", "b64_json"):
        raise _invalid(f"response_format: must be 'url' or 'b64_json', got {response_format!r}", "response_format")

    return _Options(n=n, size=size, seed=_integer(fields, "seed"), want_url=response_format == "url")


def _typed_form_fields(fields: dict[str, str]) -> dict[str, object]:
    """Multipart fields are all text; parse the integers so JSON and forms share one validation."""
    typed: dict[str, object] = dict(fields)
    for name in ("n", "seed"):
        if name in fields:
            if not _FORM_INTEGER.match(fields[name]):
                raise _invalid(f"{name}: must be an integer, got {fields[name]!r}", name)
            typed[name] = int(fields[name])
    return typed


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
                "response_format 'url' needs the gateway's object store, which is not configured; "
                "use response_format 'b64_json'",
                "response_format",
            )
        data = [{"url": image.url} for image in result.images]
    else:
        data = [{"b64_json": base64.b64encode(image.png).decode("ascii")} for image in result.images]
    return web.json_response({"created": result.created, "data": data}, headers={"x-request-id": result.request_id})


class _Handlers:
    def __init__(self, api: ImageBackend, max_upload_bytes: int, request_timeout: float) -> None:
        self.api = api
        self.max_upload_bytes = max_upload_bytes
        self.request_timeout = request_timeout

    def _deadline(self) -> float:
        return time.monotonic() + self.request_timeout

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
        return _typed_form_fields(fields), files

    @staticmethod
    def _image(files: dict[str, bytes]) -> bytes:
        if "image" not in files:
            raise _invalid("Missing required parameter: 'image'.", "image")
        return files["image"]

    async def generations(self, request: web.Request) -> web.Response:
        deadline, key = self._deadline(), self._idempotency_key(request)
        fields = await self._read_json(request)
        _reject_unknown(fields, GENERATION_FIELDS)
        prompt = _prompt(fields)
        options = _options(fields)
        params = GenerationParameters(prompt=prompt, n=options.n, size=options.size, seed=options.seed)
        result = await self.api.generate(params, want_url=options.want_url, idempotency_key=key, deadline=deadline)
        return _images_response(result, options.want_url)

    async def variations(self, request: web.Request) -> web.Response:
        deadline, key = self._deadline(), self._idempotency_key(request)
        fields, files = await self._read_form(request, VARIATION_FIELDS)
        image = self._image(files)
        options = _options(fields)
        result = await self.api.variations(
            image, n=options.n, size=options.size, seed=options.seed, want_url=options.want_url,
            idempotency_key=key, deadline=deadline,
        )
        return _images_response(result, options.want_url)

    async def edits(self, request: web.Request) -> web.Response:
        deadline, key = self._deadline(), self._idempotency_key(request)
        fields, files = await self._read_form(request, EDIT_FIELDS)
        image = self._image(files)
        prompt = _prompt(fields)
        options = _options(fields)
        params = GenerationParameters(prompt=prompt, n=options.n, size=options.size, seed=options.seed)
        result = await self.api.edit(
            image, files.get("mask"), params, want_url=options.want_url, idempotency_key=key, deadline=deadline
        )
        return _images_response(result, options.want_url)

    @staticmethod
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def create_http_app(
    api: ImageBackend, *, max_upload_bytes: int = 4 * 1024 * 1024, request_timeout: float = 600.0
) -> web.Application:
    """The OpenAI-compatible Images API over `api`. Each request gets `request_timeout` seconds;
    uploaded files may be at most `max_upload_bytes` each (OpenAI's limit is 4 MB)."""
    handlers = _Handlers(api, max_upload_bytes, request_timeout)
    # client_max_size bounds the JSON body; multipart parts are bounded one by one in _read_form.
    app = web.Application(middlewares=[_errors_middleware], client_max_size=MAX_JSON_BYTES)
    app.router.add_post("/v1/images/generations", handlers.generations)
    app.router.add_post("/v1/images/variations", handlers.variations)
    app.router.add_post("/v1/images/edits", handlers.edits)
    app.router.add_get("/healthz", handlers.healthz)
    return app
