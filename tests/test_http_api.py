"""The OpenAI-compatible HTTP API, driven by the official `openai` SDK against a real uvicorn server
on 127.0.0.1 (the gateway's own `gateway.app.HTTPServer`), in front of a test double of the
gateway's image API."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import openai
import pytest
from parameter_cases import NON_DEFAULT
from PIL import Image
from prometheus_client import REGISTRY
from servers import ServerThread
from starlette.testclient import TestClient

from gateway.api import RequestOptions, Result, ResultImage
from gateway.auth import Access
from gateway.http_api import MAX_JSON_BYTES, MAX_TEXT_FIELD_BYTES, create_http_app
from unclip.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from unclip.parameters import GenerationParameters, parameters

MAX_UPLOAD_BYTES = 32 * 1024
REQUEST_TIMEOUT = 30.0
DEFAULT_SIZE = 64  # what the double serves when no size is asked for

# The SDK marks the DALL-E 2 variations endpoint deprecated; this API serves it.
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")


def png_bytes(size: int, color: tuple[int, ...] = (255, 0, 0), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Call:
    method: str
    params: GenerationParameters
    options: RequestOptions
    image: bytes | None = None
    mask: bytes | None = None

    @property
    def want_url(self) -> bool:
        return self.options.want_url

    @property
    def idempotency_key(self) -> str | None:
        return self.options.idempotency_key

    @property
    def deadline(self) -> float | None:
        return self.options.deadline


@dataclass
class FakeImageAPI:
    """Answers with real PNGs and records each call; `error` is raised instead when set."""

    calls: list[Call] = field(default_factory=list)
    error: Exception | None = None
    store: bool = True  # False: no object store, so no URLs
    access: Access = field(default_factory=Access)  # as ImageAPI's: no API keys (tests/test_auth.py has them)

    def _result(self, call: Call) -> Result:
        self.calls.append(call)
        if self.error is not None:
            raise self.error
        size = call.params.size or DEFAULT_SIZE
        seed = call.params.seed or 0
        images = [
            ResultImage(
                png=png_bytes(size, (i * 40, 0, 0)),
                seed=seed + i,
                width=size,
                height=size,
                url=f"https://store.test/{seed + i}.png" if call.want_url and self.store else None,
            )
            for i in range(call.params.n)
        ]
        return Result(request_id="req-1", created=1_700_000_000, images=images)

    async def generate(self, params, options) -> Result:
        return self._result(Call("generate", params, options))

    async def variations(self, image, params, options) -> Result:
        return self._result(Call("variations", params, options, image=image))

    async def edit(self, image, mask, params, options) -> Result:
        return self._result(Call("edit", params, options, image=image, mask=mask))


@pytest.fixture(scope="module")
def fake_api() -> FakeImageAPI:
    return FakeImageAPI()


@pytest.fixture(scope="module")
def server(fake_api: FakeImageAPI) -> Iterator[ServerThread]:
    with ServerThread(create_http_app(fake_api, max_upload_bytes=MAX_UPLOAD_BYTES, request_timeout=REQUEST_TIMEOUT)) as server:
        yield server


@pytest.fixture
def api(fake_api: FakeImageAPI) -> FakeImageAPI:
    fake_api.calls.clear()
    fake_api.error = None
    fake_api.store = True
    return fake_api


@pytest.fixture
def client(server: ServerThread, api: FakeImageAPI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=10) as client:
        yield client


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    assert image.format == "PNG"
    return image


def error_body(error: openai.APIStatusError) -> dict:
    body = error.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- generations ---------------------------------------------------------------------------------


def test_generate_b64_json(client: openai.OpenAI, api: FakeImageAPI) -> None:
    before = time.time()
    response = client.images.generate(
        prompt="a red circle",
        n=2,
        size="128x128",
        response_format="b64_json",
        model="dall-e-2",
        quality="standard",
        style="vivid",
        user="someone",
        extra_body={"seed": 5},
        extra_headers={"x-request-id": "http-req-7"},
    )
    assert response.created == 1_700_000_000
    assert len(response.data) == 2
    for item in response.data:
        assert item.url is None
        assert decode_png(item.b64_json).size == (128, 128)
    assert response._request_id == "http-req-7"  # the caller's id comes back

    (call,) = api.calls
    assert call.method == "generate"
    assert call.params == GenerationParameters(prompt="a red circle", n=2, size=128, seed=5)
    assert call.want_url is False and call.idempotency_key is None
    assert 0 < call.deadline - time.monotonic() <= REQUEST_TIMEOUT + (time.time() - before)


def test_generate_defaults_to_url_and_the_largest_size(client: openai.OpenAI, api: FakeImageAPI) -> None:
    response = client.images.generate(prompt="a blue square")
    assert [item.url for item in response.data] == ["https://store.test/0.png"]
    (call,) = api.calls
    assert call.params == GenerationParameters(prompt="a blue square", n=1, size=None, seed=None)
    assert call.want_url is True


def test_url_without_object_store_is_a_bad_request(client: openai.OpenAI, api: FakeImageAPI) -> None:
    api.store = False
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a blue square", response_format="url")
    error = error_body(caught.value)
    assert error["param"] == "response_format" and "b64_json" in error["message"]


def test_idempotency_key_is_forwarded(client: openai.OpenAI, api: FakeImageAPI) -> None:
    client.images.generate(prompt="p", response_format="b64_json", extra_headers={"Idempotency-Key": "key-42"})
    client.images.create_variation(image=("a.png", png_bytes(32)), extra_headers={"Idempotency-Key": "key-43"})
    assert [call.idempotency_key for call in api.calls] == ["key-42", "key-43"]


# --- variations and edits ------------------------------------------------------------------------


def test_variation(client: openai.OpenAI, api: FakeImageAPI, tmp_path) -> None:
    source = png_bytes(64, (0, 0, 255))
    path = tmp_path / "source.png"
    path.write_bytes(source)
    with path.open("rb") as file:
        response = client.images.create_variation(
            image=file, n=1, size="256x256", response_format="b64_json", model="dall-e-2", user="u", extra_body={"seed": 9}
        )
    assert decode_png(response.data[0].b64_json).size == (256, 256)
    (call,) = api.calls
    assert (call.method, call.image, call.want_url) == ("variations", source, False)
    assert call.params == GenerationParameters(n=1, size=256, seed=9)


def test_edit_passes_both_files_through_unchanged(client: openai.OpenAI, api: FakeImageAPI) -> None:
    image = png_bytes(64, (0, 255, 0, 255), mode="RGBA")
    mask = png_bytes(64, (0, 0, 0, 0), mode="RGBA")
    response = client.images.edit(
        image=("image.png", image, "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt="add a sun",
        n=3,
        response_format="b64_json",
        extra_body={"seed": 11},
    )
    assert len(response.data) == 3
    (call,) = api.calls
    assert call.method == "edit" and call.image == image and call.mask == mask
    assert call.params == GenerationParameters(prompt="add a sun", n=3, size=None, seed=11)


def test_edit_without_mask(client: openai.OpenAI, api: FakeImageAPI) -> None:
    image = png_bytes(64, (0, 255, 0, 0), mode="RGBA")  # its own alpha marks where to edit
    client.images.edit(image=("image.png", image), prompt="fill it", response_format="url")
    (call,) = api.calls
    assert call.image == image and call.mask is None and call.want_url is True


# --- errors from the image API -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raised, exception, status, type_, code",
    [
        (InvalidArgument("n: must be between 1 and 8, got 9"), openai.BadRequestError, 400, "invalid_request_error", None),
        (ResourceExhausted("queue is full"), openai.RateLimitError, 429, "requests", "rate_limit_exceeded"),
        (Unavailable("prior: not loaded yet"), openai.InternalServerError, 503, "server_error", "service_unavailable"),
        (DeadlineExceeded("deadline passed"), openai.InternalServerError, 504, "server_error", "timeout"),
    ],
)
def test_image_api_errors(client, api, raised, exception, status, type_, code) -> None:
    api.error = raised
    with pytest.raises(exception) as caught:
        client.images.generate(prompt="p", n=2 if status != 400 else 9, response_format="b64_json")
    assert caught.value.status_code == status
    error = error_body(caught.value)
    assert error["message"] == str(raised)
    assert (error["type"], error["code"]) == (type_, code)
    assert error["param"] == ("n" if status == 400 else None)


def test_an_operation_the_weights_cannot_do_is_a_bad_request(client, api) -> None:
    api.error = FailedPrecondition("these weights have no image encoder, so they cannot embed images")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.create_variation(image=("a.png", png_bytes(32)), response_format="b64_json")
    error = error_body(caught.value)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "unsupported_operation", None)
    assert "no image encoder" in error["message"]


def test_unexpected_error_is_logged_not_answered(client, api, caplog) -> None:
    api.error = RuntimeError("secret internal detail")
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.create_variation(image=("a.png", png_bytes(32)), response_format="b64_json")
    assert caught.value.status_code == 500
    assert error_body(caught.value)["type"] == "server_error"
    assert "secret" not in caught.value.response.text and "Traceback" not in caught.value.response.text
    assert "secret internal detail" in caplog.text


# --- validation before the image API is called ---------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"n": 1}, "prompt"),
        ({"prompt": "  "}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "p", "size": "12x13"}, "size"),
        ({"prompt": "p", "size": "big"}, "size"),
        ({"prompt": "p", "size": 128}, "size"),
        ({"prompt": "p", "n": 0}, "n"),
        ({"prompt": "p", "n": 11}, "n"),
        ({"prompt": "p", "n": "2"}, "n"),
        ({"prompt": "p", "n": True}, "n"),
        ({"prompt": "p", "response_format": "gif"}, "response_format"),
        ({"prompt": "p", "seed": 1.5}, "seed"),
        ({"prompt": "p", "sead": 1}, "sead"),
    ],
)
def test_generation_validation(client: openai.OpenAI, api: FakeImageAPI, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/images/generations", body=body, cast_to=object)
    error = error_body(caught.value)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert api.calls == []


def test_form_validation(client: openai.OpenAI, api: FakeImageAPI) -> None:
    image = ("a.png", png_bytes(32))
    attempts = [
        (lambda: client.images.create_variation(image=image, size="12x13"), "size"),
        (lambda: client.images.create_variation(image=image, n=0), "n"),
        (lambda: client.images.create_variation(image=image, extra_body={"seed": "x"}), "seed"),
        (lambda: client.images.create_variation(image=image, response_format="gif"), "response_format"),
        (lambda: client.images.create_variation(image=image, extra_body={"prompt": "p"}), "prompt"),
        (lambda: client.images.edit(image=image, prompt=" "), "prompt"),
        (lambda: client.images.edit(image=image, prompt="p", mask=("m.png", b"")), "mask"),
        (lambda: client.images.edit(image=[image, image], prompt="p"), "image"),
    ]
    for attempt, param in attempts:
        with pytest.raises(openai.BadRequestError) as caught:
            attempt()
        assert error_body(caught.value)["param"] == param
    assert api.calls == []


def test_missing_image_and_non_multipart_bodies(client: openai.OpenAI, api: FakeImageAPI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post(
            "/images/variations", body={"n": 1}, cast_to=object, options={"headers": {"Content-Type": "multipart/form-data"}}
        )
    assert error_body(caught.value)["param"] == "image"
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/images/edits", body={"prompt": "p"}, cast_to=object)  # JSON, not multipart
    assert "multipart/form-data" in error_body(caught.value)["message"]
    assert api.calls == []


def test_upload_over_the_limit_is_413(client: openai.OpenAI, api: FakeImageAPI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.create_variation(image=("big.png", b"\0" * (MAX_UPLOAD_BYTES + 1)))
    assert caught.value.status_code == 413
    error = error_body(caught.value)
    assert (error["type"], error["param"]) == ("invalid_request_error", "image")
    assert caught.value.response.headers["connection"] == "close"  # a refused body's connection is not reused
    assert api.calls == []


def raw_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_transport_errors_are_openai_shaped(server: ServerThread, api: FakeImageAPI) -> None:
    port = server.port
    status, body = raw_request(port, "POST", "/v1/images/nothing", b"{}")
    assert status == 404 and body["error"]["message"] == "Invalid URL (POST /v1/images/nothing)"
    status, body = raw_request(port, "GET", "/v1/images/generations")
    assert status == 405 and body["error"]["type"] == "invalid_request_error"
    status, body = raw_request(port, "POST", "/v1/images/generations", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = raw_request(port, "POST", "/v1/images/generations", b"[1]")
    assert status == 400 and "object" in body["error"]["message"]
    status, body = raw_request(port, "POST", "/v1/images/generations", b'{"prompt": "' + b"p" * 2_000_000 + b'"}')
    assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = raw_request(
        port, "POST", "/v1/images/variations", b"--xyz\r\ngarbage", {"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert status == 400 and "malformed" in body["error"]["message"]
    assert api.calls == []


def test_every_response_carries_a_request_id(server: ServerThread, api: FakeImageAPI) -> None:
    body = json.dumps({"prompt": "x", "response_format": "b64_json"}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/v1/images/generations", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])  # none given: one made up
        assert response.headers["x-unclip-result-id"] == "req-1"  # the stored result's folder
    for path, data, status in (("/v1/images/generations", b'{"prompt": "x", "n": 0}', 400), ("/nowhere", None, 404)):
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}{path}", data, {"Content-Type": "application/json", "x-request-id": f"err-{status}"}
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=10)
        assert error.value.code == status and error.value.headers["x-request-id"] == f"err-{status}"


def test_healthz(server: ServerThread) -> None:
    assert raw_request(server.port, "GET", "/healthz") == (200, {"status": "ok"})


def test_routing_is_exact(server: ServerThread, api: FakeImageAPI) -> None:
    """A trailing slash is another URL (no redirect); a wrong method names the allowed ones."""
    status, body = raw_request(server.port, "POST", "/v1/images/generations/", b'{"prompt": "p"}')
    assert status == 404 and body["error"]["message"] == "Invalid URL (POST /v1/images/generations/)"
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/images/edits", method="PUT", data=b"")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 405 and caught.value.headers["Allow"] == "POST"
    assert json.loads(caught.value.read())["error"]["message"] == "Method PUT is not allowed for /v1/images/edits"
    assert api.calls == []


def streamed_request(port: int, path: str, chunks: Iterable[bytes], content_type: str) -> tuple[int, dict]:
    """POST a body in chunked transfer encoding: no Content-Length to refuse it by."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", path, body=chunks, headers={"Content-Type": content_type}, encode_chunked=True)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_streamed_json_body_is_refused_past_the_limit(server: ServerThread, api: FakeImageAPI) -> None:
    chunk = b" " * 64 * 1024  # JSON whitespace: only the size is wrong
    status, body = streamed_request(
        server.port,
        "/v1/images/generations",
        [b'{"prompt": "p"}', *[chunk] * (MAX_JSON_BYTES // len(chunk) + 1)],
        "application/json",
    )
    assert status == 413 and str(MAX_JSON_BYTES) in body["error"]["message"]
    assert api.calls == []


BOUNDARY = "b0undary"


def form(*parts: tuple[str, bytes]) -> bytes:
    """A multipart/form-data body of (part headers, data) parts, closed by the final boundary."""
    body = b"".join(f"--{BOUNDARY}\r\n{headers}\r\n\r\n".encode() + data + b"\r\n" for headers, data in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


def field(name: str, filename: str | None = None) -> str:
    return f'Content-Disposition: form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")


IMAGE_PART = (field("image", "a.png"), png_bytes(32))


@pytest.mark.parametrize(
    "body, status, param, message",
    [
        (form(IMAGE_PART, (field("prompt"), b"\xff\xfe")), 400, "prompt", "prompt: must be UTF-8 text"),
        (form(IMAGE_PART, (field("prompt"), b"p" * (MAX_TEXT_FIELD_BYTES + 1))), 413, "prompt", str(MAX_TEXT_FIELD_BYTES)),
        (form(IMAGE_PART, (field("mask", "m.png"), b"\0" * (MAX_UPLOAD_BYTES + 1))), 413, "mask", str(MAX_UPLOAD_BYTES)),
        (form(IMAGE_PART, (field("prompt"), b"a"), (field("prompt"), b"b")), 400, "prompt", "more than once"),
        (form(IMAGE_PART, (field("colour"), b"red")), 400, "colour", "Unrecognized request argument"),
        (form(IMAGE_PART, ("Content-Disposition: form-data", b"x")), 400, None, "needs a name"),
        (form((field("image") + "\r\nContent-Type: multipart/mixed; boundary=inner", b"--inner--")), 400, None, "Nested"),
        (form(IMAGE_PART)[: -len(f"--{BOUNDARY}--\r\n") - 10], 400, None, "malformed"),  # ends inside the image
    ],
    ids=["non-utf8", "long-text", "big-mask", "duplicate", "unknown", "no-name", "nested", "truncated"],
)
def test_multipart_bodies_are_checked_part_by_part(server, api, body, status, param, message) -> None:
    status_got, answer = raw_request(
        server.port, "POST", "/v1/images/edits", body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    )
    assert (status_got, answer["error"]["param"]) == (status, param)
    assert message in answer["error"]["message"]
    assert api.calls == []


def test_a_multipart_body_without_a_boundary_is_malformed(server: ServerThread, api: FakeImageAPI) -> None:
    status, body = raw_request(
        server.port, "POST", "/v1/images/variations", form(IMAGE_PART), {"Content-Type": "multipart/form-data"}
    )
    assert status == 400 and "malformed" in body["error"]["message"]
    assert api.calls == []


def test_a_streamed_upload_is_refused_past_the_limit(server: ServerThread, api: FakeImageAPI) -> None:
    head, tail = form((field("image", "big.png"), b"")).split(b"\r\n--" + BOUNDARY.encode() + b"--")
    chunk = b"\0" * 8 * 1024
    chunks = [head, *[chunk] * (MAX_UPLOAD_BYTES // len(chunk) + 1), b"\r\n--" + BOUNDARY.encode() + b"--" + tail]
    status, body = streamed_request(server.port, "/v1/images/variations", chunks, f"multipart/form-data; boundary={BOUNDARY}")
    assert status == 413 and body["error"]["param"] == "image"
    assert api.calls == []


def requests_counted(route: str, code: str) -> float:
    return REGISTRY.get_sample_value("unclip_requests_total", {"protocol": "http", "method": route, "code": code}) or 0.0


def test_requests_are_counted_by_route_template_and_status(api: FakeImageAPI) -> None:
    """Known routes by their template, everything else (unknown paths, wrong methods) as one label."""
    route = "POST /v1/images/generations"
    before = {key: requests_counted(*key) for key in [(route, "200"), (route, "400"), ("unmatched", "404"), ("unmatched", "405")]}
    with TestClient(create_http_app(api)) as asgi:
        assert asgi.post("/v1/images/generations", json={"prompt": "p", "response_format": "b64_json"}).status_code == 200
        assert asgi.post("/v1/images/generations", json={"prompt": "p", "n": 0}).status_code == 400
        assert asgi.get("/nowhere/1").status_code == 404 and asgi.get("/nowhere/2").status_code == 404
        assert asgi.get("/v1/images/generations").status_code == 405
    after = {key: requests_counted(*key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        (route, "200"): 1, (route, "400"): 1, ("unmatched", "404"): 2, ("unmatched", "405"): 1
    }  # fmt: skip


def test_metrics_route_can_be_left_out(api: FakeImageAPI) -> None:
    """Served by default (a gateway process's /metrics); left out under Ray Serve, which exports them itself."""
    with TestClient(create_http_app(api)) as asgi:
        scraped = asgi.get("/metrics")
        assert scraped.status_code == 200 and "unclip_requests_total" in scraped.text
    with TestClient(create_http_app(api, metrics_route=False)) as asgi:
        assert asgi.get("/metrics").status_code == 404


# --- every generation parameter as an extension field ---------------------------------------


@pytest.mark.parametrize("name", [item.name for item in parameters("generate") if item.name not in ("prompt", "size")])
def test_each_generation_parameter_is_a_json_field(client: openai.OpenAI, api: FakeImageAPI, name: str) -> None:
    client.images.generate(prompt="p", response_format="b64_json", extra_body={name: NON_DEFAULT[name]})
    (call,) = api.calls
    assert call.params == GenerationParameters(prompt="p", **{name: NON_DEFAULT[name]})


@pytest.mark.parametrize("name", [item.name for item in parameters("variations") if item.name != "size"])
def test_each_variation_parameter_is_a_form_field(client: openai.OpenAI, api: FakeImageAPI, name: str) -> None:
    """Multipart fields arrive as text and are parsed by the parameter's type."""
    client.images.create_variation(
        image=("a.png", png_bytes(32)), response_format="b64_json", extra_body={name: NON_DEFAULT[name]}
    )
    (call,) = api.calls
    assert call.params == GenerationParameters(**{name: NON_DEFAULT[name]})


@pytest.mark.parametrize(
    "body, param",
    [
        ({"decoder_steps": 2.5}, "decoder_steps"),
        ({"prior_guidance_scale": "high"}, "prior_guidance_scale"),
        ({"prior_guidance_scale": 51.0}, "prior_guidance_scale"),
        ({"sampler": "euler"}, "sampler"),
        ({"preview_every": 1}, "preview_every"),  # a streaming parameter: not for this route
    ],
)
def test_bad_extension_fields_name_their_parameter(client: openai.OpenAI, api: FakeImageAPI, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/images/generations", body={"prompt": "p", **body}, cast_to=object)
    assert error_body(caught.value)["param"] == param
    assert api.calls == []
