"""OpenAI's image streaming (`stream`, `partial_images`), the interpolation and info routes, and
the playground's files, through the gateway's HTTP API in front of the shipped models in this
process: streamed images must equal plain ones, and every refusal must come before any event."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import numpy as np
import openai
import pytest
from PIL import Image
from servers import ServerThread

from gateway.api import ImageAPI
from gateway.auth import Access, KeyRing, KeysFile
from gateway.http_api import create_http_app
from gateway.image_stream import preview_every
from gateway.page import CONTENT_SECURITY_POLICY, PAGE_FILES
from unclip.calls import DecodeCall
from unclip.errors import Unavailable
from unclip.parameters import parameters

PROMPT = "a red circle in the top left corner"
# Few steps: these tests are about delivery, not quality.
FAST = {"prior_steps": 6, "decoder_steps": 6, "upsampler_steps": 3, "prior_candidates": 1}


class Wrapped:
    """A stage backend in front of another: decodes can be made to fail or to wait (recording
    whether they were cancelled)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fail_decode = False
        self.hold_decode = False
        self.decode_started: asyncio.Event | None = None
        self.decode_cancelled = False

    async def describe(self):
        return await self.inner.describe()

    async def run(self, call, **kwargs):
        if isinstance(call, DecodeCall):
            if self.fail_decode:
                raise Unavailable("decoder: not loaded yet")
            if self.hold_decode:
                assert self.decode_started is not None
                self.decode_started.set()
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    self.decode_cancelled = True
                    raise
        return await self.inner.run(call, **kwargs)


@pytest.fixture(scope="module")
def backend(local_stages) -> Wrapped:
    return Wrapped(local_stages)


@pytest.fixture(scope="module")
def server(backend: Wrapped) -> Iterator[ServerThread]:
    with ServerThread(create_http_app(ImageAPI(backend))) as server:
        yield server


@pytest.fixture
def base(server: ServerThread, backend: Wrapped) -> str:
    backend.fail_decode = backend.hold_decode = False
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
def client(base: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of every server-sent event in a body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


@pytest.mark.parametrize(
    "partial_images, steps, previews", [(0, 25, 0), (1, 25, 1), (2, 25, 2), (3, 25, 3), (3, 2, 2), (2, 7, 2)]
)
def test_partial_images_are_spread_over_the_decoders_steps(partial_images, steps, previews):
    every = preview_every(partial_images, steps)
    due = [done for done in range(1, steps + 1) if every and (done % every == 0 or done == steps)]
    assert len(due) == previews and (not due or due[-1] == steps)


def test_openai_client_streams_partial_images_then_the_same_image_as_a_plain_request(client):
    extra = {"seed": 7, **FAST}
    events = list(client.images.generate(prompt=PROMPT, size="128x128", stream=True, partial_images=2, extra_body=extra))
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert all(png_size(event.b64_json) == (32, 32) and event.size == "32x32" for event in events[:2])  # the decoder's side
    done = events[-1]
    assert (done.size, done.output_format, done.model_extra["seed"]) == ("128x128", "png", 7)
    assert done.usage.total_tokens == 0
    plain = client.images.generate(prompt=PROMPT, size="128x128", response_format="b64_json", extra_body=extra)
    assert plain.data[0].b64_json == done.b64_json  # byte for byte, metadata included
    assert plain.data[0].model_extra["seed"] == 7
    # The last partial image is the decoder's final output: the finished image, before upsampling.
    final = np.asarray(Image.open(io.BytesIO(base64.b64decode(done.b64_json))).convert("RGB").resize((32, 32), Image.BOX))
    last = np.asarray(Image.open(io.BytesIO(base64.b64decode(events[1].b64_json))).convert("RGB"))
    assert np.abs(final.astype(int) - last.astype(int)).mean() < 40


def test_n_images_stream_one_event_per_image(client, base):
    body = {"prompt": PROMPT, "n": 2, "size": "32x32", "seed": 3, "stream": True, "partial_images": 1, **FAST}
    events = sse_events(httpx.post(f"{base}/v1/images/generations", json=body, timeout=120).text)
    names = [(name, data.get("partial_image_index"), data["image_index"]) for name, data in events]
    assert names == [
        ("image_generation.partial_image", 0, 0),
        ("image_generation.partial_image", 0, 1),
        ("image_generation.completed", None, 0),
        ("image_generation.completed", None, 1),
    ]
    assert [data["seed"] for _, data in events[2:]] == [3, 4]
    assert all(name == data["type"] for name, data in events)


def test_without_partial_images_only_the_images_come(base):
    body = {"prompt": PROMPT, "size": "32x32", "seed": 1, "stream": True, **FAST}
    response = httpx.post(f"{base}/v1/images/generations", json=body, timeout=120)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert [name for name, _ in sse_events(response.text)] == ["image_generation.completed"]


def test_stage_events_report_each_stage_in_order(base):
    body = {"prompt": PROMPT, "size": "128x128", "seed": 1, "stream": True, "stage_events": True, "partial_images": 1, **FAST}
    events = sse_events(httpx.post(f"{base}/v1/images/generations", json=body, timeout=120).text)
    stages = [data["stage"] for name, data in events if name == "unclip.stage"]
    assert stages == ["encode", "prior", "decode", "upsample0"]
    names = [name for name, _ in events]
    # The decoder's preview comes before the decode stage is reported done, the image last.
    assert names.index("image_generation.partial_image") < names.index("unclip.stage", names.index("unclip.stage") + 2)
    assert names[-1] == "image_generation.completed"


def test_openai_client_streams_an_edit_equal_to_the_plain_edit(client):
    image = io.BytesIO()
    Image.new("RGB", (128, 128), (0, 200, 0)).save(image, "PNG")
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 64, 128))  # redraw the left half
    mask_png = io.BytesIO()
    mask.save(mask_png, "PNG")
    files = {"image": ("image.png", image.getvalue(), "image/png"), "mask": ("mask.png", mask_png.getvalue(), "image/png")}
    extra = {"seed": 5, **FAST}
    events = list(
        client.images.edit(prompt="a blue square", size="128x128", stream=True, partial_images=1, extra_body=extra, **files)
    )
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    plain = client.images.edit(prompt="a blue square", size="128x128", response_format="b64_json", extra_body=extra, **files)
    assert plain.data[0].b64_json == events[-1].b64_json


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"prompt": "", "stream": True}, "prompt", "prompt: must not be empty"),
        ({"prompt": PROMPT, "stream": True, "partial_images": 4}, "partial_images", "between 0 and 3"),
        ({"prompt": PROMPT, "partial_images": 2}, "partial_images", "only applies to streamed requests"),
        ({"prompt": PROMPT, "stage_events": True}, "stage_events", "only applies to streamed requests"),
        ({"prompt": PROMPT, "stream": "yes"}, "stream", "must be a boolean"),
        ({"prompt": PROMPT, "stream": True, "response_format": "url"}, "response_format", "come as b64_json"),
        ({"prompt": PROMPT, "stream": True, "size": "64x64"}, "size", "must be one of"),
        ({"prompt": PROMPT, "stream": True, "partial_images": 10**30}, "partial_images", "at most 20 digits"),
    ],
)
def test_a_refused_stream_is_a_plain_openai_error_before_any_event(base, body, param, message):
    response = httpx.post(f"{base}/v1/images/generations", json=body, timeout=30)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_an_error_after_the_first_event_is_an_error_event(client, backend):
    backend.fail_decode = True
    stream = client.images.generate(prompt=PROMPT, size="32x32", stream=True, partial_images=1, extra_body=FAST)
    with pytest.raises(openai.APIError) as raised:
        list(stream)
    assert raised.value.message == "decoder: not loaded yet"
    assert raised.value.body["code"] == "service_unavailable"


def test_a_client_that_hangs_up_mid_stream_cancels_the_work(server, base, backend):
    backend.hold_decode = True
    started = asyncio.Event()
    server.loop.call_soon_threadsafe(lambda: setattr(backend, "decode_started", started))
    time.sleep(0.1)
    body = {"prompt": PROMPT, "size": "32x32", "stream": True, "stage_events": True, **FAST}
    with httpx.stream("POST", f"{base}/v1/images/generations", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: a dropped iterator would close the response
        assert next(lines) == "event: unclip.stage"  # the stream has started: the request was admitted
        deadline = time.monotonic() + 30
        while not started.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.is_set()
    deadline = time.monotonic() + 10
    while not backend.decode_cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.decode_cancelled


# --- interpolations -------------------------------------------------------------------------------


def test_interpolation_between_prompts(base):
    body = {"prompts": [PROMPT, "a blue square"], "frames": 3, "size": "32x32", "seed": 2, "response_format": "b64_json"}
    response = httpx.post(f"{base}/v1/images/interpolations", json={**body, **FAST}, timeout=120)
    assert response.status_code == 200, response.text
    frames = [item["b64_json"] for item in response.json()["data"]]
    assert len(frames) == 3 and len(set(frames)) == 3
    assert all(png_size(frame) == (32, 32) for frame in frames)


def test_interpolation_between_two_images(base):
    images = []
    for color in ((255, 0, 0), (0, 0, 255)):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), color).save(buffer, "PNG")
        images.append(buffer.getvalue())
    files = {"first_image": ("a.png", images[0], "image/png"), "second_image": ("b.png", images[1], "image/png")}
    data = {"frames": "4", "size": "32x32", "seed": "2", "response_format": "b64_json", **{k: str(v) for k, v in FAST.items()}}
    data.pop("prior_steps"), data.pop("prior_candidates")  # images are embedded, not sampled
    response = httpx.post(f"{base}/v1/images/interpolations", data=data, files=files, timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 4


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({}, "prompts", "Missing required parameter: 'prompts'"),
        ({"prompts": ["only one"]}, "prompts", "a list of two strings"),
        ({"prompts": [PROMPT, "  "]}, "prompts", "the second prompt must not be empty"),
        ({"prompts": [PROMPT, PROMPT], "frames": 1}, "frames", "frames: must be between 2 and 16"),
        ({"prompts": [PROMPT, PROMPT], "frames": "5"}, "frames", "must be an integer"),
        ({"prompts": [PROMPT, PROMPT], "first_image": "a.png"}, "first_image", "must be a file"),
        ({"prompts": [PROMPT, PROMPT], "n": 2}, "n", "Unrecognized request argument"),
    ],
)
def test_interpolation_errors(base, body, param, message):
    response = httpx.post(f"{base}/v1/images/interpolations", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param


def test_interpolation_needs_both_images(base):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "PNG")
    response = httpx.post(f"{base}/v1/images/interpolations", files={"first_image": ("a.png", buffer.getvalue())}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "second_image"


# --- what the models offer, and the page ------------------------------------------------------------


def test_info_describes_the_models_and_every_parameter(base, local_stages):
    info = httpx.get(f"{base}/v1/unclip/info").json()
    described = asyncio.run(local_stages.describe())
    assert info["sizes"] == described.output_sizes() and info["default_steps"] == described.default_steps
    assert [item["name"] for item in info["parameters"]] == [item.name for item in parameters()]
    seed = next(item for item in info["parameters"] if item["name"] == "seed")
    assert seed["type"] == "int" and seed["low"] == 0 and "generate" in seed["operations"]
    assert info["api_keys"] is False


def test_the_page_and_its_files_are_served_with_a_strict_policy(base):
    for path in PAGE_FILES:
        response = httpx.get(base + path)
        assert response.status_code == 200
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(base + "/").text
    # Every asset is the gateway's own: nothing from another origin.
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    for path in re.findall(r"(?:src|href)=\"(/[^\"]+)\"", page):
        assert path in PAGE_FILES, path
    assert httpx.head(base + "/").status_code == 200
    assert httpx.get(base + "/playground/other.js").status_code == 404


def test_with_api_keys_the_page_loads_but_the_api_needs_a_key(local_stages, tmp_path):
    keys = tmp_path / "keys.json"
    _, key = KeysFile(keys).create("playground")
    with ServerThread(create_http_app(ImageAPI(local_stages, access=Access(KeyRing(keys))))) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(base + "/").status_code == 200
        assert httpx.get(base + "/playground/playground.js").status_code == 200
        refused = httpx.get(base + "/v1/unclip/info")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        info = httpx.get(base + "/v1/unclip/info", headers={"Authorization": f"Bearer {key}"})
        assert info.status_code == 200 and info.json()["api_keys"] is True
