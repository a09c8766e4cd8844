"""The OpenAI-compatible HTTP API, driven by the official `openai` SDK against a real aiohttp server
on 127.0.0.1, in front of a test double of the gateway's image API."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import openai
import pytest
from aiohttp import web
from parameter_cases import NON_DEFAULT
from PIL import Image

from gateway.api import RequestOptions, Result, ResultImage
from gateway.http_api import create_http_app
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


class ServerThread:
    """An aiohttp app on 127.0.0.1, port chosen by the OS, in its own event loop: the SDK is sync."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(app)
        self.port = 0

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def fake_api() -> FakeImageAPI:
    return FakeImageAPI()


@pytest.fixture(scope="module")
def server(fake_api: FakeImageAPI) -> Iterator[ServerThread]:
    server = ServerThread(create_http_app(fake_api, max_upload_bytes=MAX_UPLOAD_BYTES, request_timeout=REQUEST_TIMEOUT))
    server.start()
    yield server
    server.stop()


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
    )
    assert response.created == 1_700_000_000
    assert len(response.data) == 2
    for item in response.data:
        assert item.url is None
        assert decode_png(item.b64_json).size == (128, 128)
    assert response._request_id == "req-1"

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
    assert caught.value.response.headers["connection"] == "close"  # the rest of the body was never read
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


def test_healthz(server: ServerThread) -> None:
    assert raw_request(server.port, "GET", "/healthz") == (200, {"status": "ok"})


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
