"""Admission control and limits: the gateway's bound on concurrent requests and cap on a
request's cost, default deadlines, the HTTP body read timeout, message size limits, malformed
messages, bounded preview streams, image work off the event loop, and integers of thousands of
digits. The gateway is the real one (gRPC and HTTP, `gateway.app.build_gateway`) over a stage
backend without models (tests/fake_stages.py), except where a stage service itself is tested."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from fake_stages import DEFAULT_STEPS, FakeStages
from PIL import Image
from servers import BackgroundServer

import gateway.api
import gateway.streaming
import unclip.pipeline
from gateway.admission import GatewayLimits
from gateway.app import build_gateway
from gateway.servicer import ImageServicer
from gateway.streaming import PendingPreview, StreamEvents
from unclip.calls import DecodeCall, UpsampleCall
from unclip.cost import request_cost
from unclip.images import MAX_UPLOAD_BYTES
from unclip.limits import gateway_request_bytes, stage_request_bytes
from unclip.parameters import MAX_IMAGES_PER_REQUEST, MAX_PROMPT_CHARS, GenerationParameters
from unclip.pipeline import PipelineInfo
from unclip.serving import HopContext, stage_server
from unclip.stage import Stage
from unclip.transport import MAX_MESSAGE_BYTES
from unclip.v1 import images_pb2, images_pb2_grpc
from unclip.validation import MAX_OUTPUT_SIDE

pytestmark = pytest.mark.slow  # starts servers (in this process)

PROMPT = "a red circle"


def png_bytes(side: int, mode: str = "RGB", transparent_half: bool = False) -> bytes:
    image = Image.new(mode, (side, side), (200, 30, 30, 255) if mode == "RGBA" else (200, 30, 30))
    if transparent_half:
        image.paste((0, 0, 0, 0), (0, 0, side, side // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def running_gateway(stages: FakeStages, **limits) -> Iterator[tuple[BackgroundServer, str, int]]:
    """(its runner, gRPC address, HTTP port)."""

    def make():
        return build_gateway(stages, host="127.0.0.1", port=0, http_port=0, storage=None, limits=GatewayLimits(**limits))

    runner = BackgroundServer(make)
    with runner as server:
        yield runner, server.address, int(server.metrics_address.rsplit(":", 1)[1])


def post_json(port: int, path: str, body: bytes | dict, timeout: float = 30) -> tuple[int, Any, dict]:
    """(status, headers (case-insensitive), the JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.headers, json.loads(response.read())
    finally:
        connection.close()


def post_form(port: int, path: str, fields: dict[str, str], files: dict[str, bytes]) -> tuple[int, dict]:
    boundary = "limits-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    for name, data in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
        parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def generate_request(**parameters) -> images_pb2.GenerateRequest:
    return images_pb2.GenerateRequest(parameters=images_pb2.GenerationParameters(**({"prompt": PROMPT} | parameters)))


# -- the cost of a request --------------------------------------------------------------------


def test_request_cost_counts_images_candidates_and_steps():
    info = PipelineInfo(32, [4], {}, default_steps=dict(DEFAULT_STEPS))
    params = GenerationParameters(prompt=PROMPT, n=2)
    # 2 images x 2 candidates x 32 prior steps + 2 x (25 decoder + 10 upsampler) steps
    assert request_cost(params, info, images=2, prior_samples=2) == 2 * 2 * 32 + 2 * (25 + 10)
    # No upsampler at the decoder's own size; given steps replace the defaults.
    small = GenerationParameters(prompt=PROMPT, n=2, size=32, prior_steps=5, decoder_steps=7, prior_candidates=3)
    assert request_cost(small, info, images=2, prior_samples=2) == 2 * 3 * 5 + 2 * 7
    # Frames without the prior (a text diff): frames x (decoder + upsampler).
    assert request_cost(GenerationParameters(), info, images=16, prior_samples=0) == 16 * 35


CAP = 1000
# Each operation asked for more than CAP, with inputs that would fail if anything were decoded first.
OVER_CAP = {
    # 8 x (2 x 32 + 200 + 10)
    "Generate": (generate_request(n=8, decoder_steps=200), 2192),
    # 8 x (200 + 10): variations have no prior
    "CreateVariations": (
        images_pb2.CreateVariationsRequest(image=b"not an image", parameters=images_pb2.GenerationParameters(n=8, decoder_steps=200)),
        1680,
    ),
    "Edit": (images_pb2.EditRequest(image=b"not an image", parameters=generate_request(n=8, decoder_steps=200).parameters), 2192),
    # 2 ends x 2 candidates x 32 + 16 frames x (100 + 10)
    "Interpolate": (
        images_pb2.InterpolateRequest(
            prompts=images_pb2.PromptPair(first="a", second="b"), frames=16,
            parameters=images_pb2.GenerationParameters(decoder_steps=100),
        ),
        1888,
    ),
    # 16 frames x (100 + 10)
    "TextDiff": (
        images_pb2.TextDiffRequest(
            image=b"not an image", caption="a", target_caption="b", frames=16,
            parameters=images_pb2.GenerationParameters(decoder_steps=100),
        ),
        1760,
    ),
}  # fmt: skip


def test_requests_over_the_cost_cap_are_refused_before_any_work():
    stages = FakeStages()
    with running_gateway(stages, max_request_cost=CAP) as (_, address, port), grpc.insecure_channel(address) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        for method, (request, cost) in OVER_CAP.items():
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, method)(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert f"request cost {cost} exceeds the gateway's limit of {CAP}" in refused.value.details(), method
        with pytest.raises(grpc.RpcError) as refused:  # the stream too
            list(stub.GenerateStream(images_pb2.GenerateStreamRequest(parameters=OVER_CAP["Generate"][0].parameters), timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status, _, body = post_json(port, "/v1/images/generations", {"prompt": PROMPT, "n": 8, "decoder_steps": 200})
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        assert f"request cost 2192 exceeds the gateway's limit of {CAP}" in body["error"]["message"]
        assert stages.calls == []  # no stage was called
        # Within the cap, the same gateway serves.
        assert len(stub.Generate(generate_request(n=2), timeout=30).images) == 2


# -- concurrent requests ----------------------------------------------------------------------


def test_requests_beyond_the_concurrency_bound_are_refused_at_once_on_both_protocols():
    stages = FakeStages()
    stages.hold()
    with running_gateway(stages, max_concurrent_requests=2) as (runner, address, port), grpc.insecure_channel(address) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        held = [stub.Generate.future(generate_request(size=32), timeout=60) for _ in range(2)]
        deadline = time.monotonic() + 30
        while len(stages.calls) < 2:  # both are in the stages
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(generate_request(size=32), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 concurrent requests" in refused.value.details()
        status, headers, body = post_json(port, "/v1/images/generations", {"prompt": PROMPT, "response_format": "b64_json"})
        assert time.monotonic() - started < 5  # refused, not queued behind the held ones
        assert status == 429 and headers["Retry-After"] == "1"
        assert body["error"]["type"] == "requests" and body["error"]["code"] == "rate_limit_exceeded"
        assert "limit of 2 concurrent requests" in body["error"]["message"]
        runner.call_soon(stages.release)
        assert all(len(future.result(timeout=30).images) == 1 for future in held)
        # The slots are free again, for either protocol.
        status, _, body = post_json(
            port, "/v1/images/generations", {"prompt": PROMPT, "size": "32x32", "response_format": "b64_json"}
        )
        assert status == 200 and len(body["data"]) == 1
        assert len(stub.Generate(generate_request(size=32), timeout=30).images) == 1


# -- deadlines --------------------------------------------------------------------------------


def test_a_grpc_call_without_a_deadline_gets_the_default_one():
    stages = FakeStages()
    stages.hold()  # never released: only the deadline ends the call
    with running_gateway(stages, default_timeout=1.0) as (_, address, _port), grpc.insecure_channel(address) as channel:
        started = time.monotonic()
        future = images_pb2_grpc.ImageServiceStub(channel).Generate.future(generate_request())  # no timeout
        with pytest.raises(grpc.RpcError) as failed:
            future.result(timeout=30)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 10
        # The stage call carried the default deadline.
        assert stages.deadlines[0] is not None and stages.deadlines[0] - started < 2.0


# -- the HTTP body read timeout ---------------------------------------------------------------


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize(
    ("path", "content_type", "partial"),
    [
        ("/v1/images/generations", "application/json", b'{"prompt": "a slow'),
        (
            "/v1/images/variations",
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n\x89PNG',
        ),
    ],
)
def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(path, content_type, partial):
    with running_gateway(FakeStages(), body_timeout=0.5) as (_, _address, port):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n"
            started = time.monotonic()
            sock.sendall(head.encode() + partial)  # and nothing more
            answer = read_until_closed(sock)  # returns once the server closes the connection
        assert time.monotonic() - started < 10
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "request_timeout"
        assert "did not arrive within 0.5 seconds" in error["message"]


# -- message sizes and malformed messages -----------------------------------------------------


def test_message_limits_fit_the_largest_valid_requests():
    # The gateway: an edit with an image and a mask at the upload limit, every text at its limit.
    prompt = "\U0001f600" * MAX_PROMPT_CHARS  # 4 bytes each in UTF-8
    largest = images_pb2.EditRequest(
        image=b"\0" * MAX_UPLOAD_BYTES, mask=b"\0" * MAX_UPLOAD_BYTES,
        parameters=images_pb2.GenerationParameters(prompt=prompt, n=8, seed=2**64 - 1, prior_steps=1000),
        delivery=images_pb2.Delivery(idempotency_key="\U0001f600" * 255),
    )  # fmt: skip
    assert largest.ByteSize() <= gateway_request_bytes() < largest.ByteSize() + 128 * 1024
    # The upsampler: an edit's last call, 8 rows at the largest side with float input, image and mask.
    rows, side = MAX_IMAGES_PER_REQUEST, MAX_OUTPUT_SIDE
    upsample = UpsampleCall(
        np.zeros((rows, side // 2, side // 2, 3), np.float32), seeds=[2**64 - 1] * rows,
        inpaint_images=np.zeros((rows, side, side, 3), np.uint8), inpaint_mask=np.zeros((rows, side, side), bool),
        float_images=True,
    )  # fmt: skip
    assert upsample.to_proto().ByteSize() <= stage_request_bytes(Stage.UPSAMPLER) < MAX_MESSAGE_BYTES
    # The decoder: an edit's decode with text at a wide CLIP's width.
    decode = DecodeCall(
        np.zeros((rows, 1280), np.float32), seeds=[1] * rows, text_encodings=np.zeros((rows, 77, 1280), np.float32),
        text_mask=np.zeros((rows, 77), bool), text_embeddings=np.zeros((rows, 1280), np.float32),
        inpaint_images=np.zeros((rows, side, side, 3), np.uint8), inpaint_mask=np.zeros((rows, side, side), bool),
    )  # fmt: skip
    assert decode.to_proto().ByteSize() <= stage_request_bytes(Stage.DECODER) < stage_request_bytes(Stage.UPSAMPLER)
    assert stage_request_bytes(Stage.PRIOR) < stage_request_bytes(Stage.ENCODER) < stage_request_bytes(Stage.DECODER)


def test_the_gateway_receives_its_largest_request_and_refuses_larger_ones():
    with running_gateway(FakeStages()) as (_, address, _port), grpc.insecure_channel(address) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        params = images_pb2.GenerationParameters(prompt=PROMPT)
        # Two uploads at the limit arrive (and are then found not to be images).
        with pytest.raises(grpc.RpcError) as refused:
            stub.Edit(
                images_pb2.EditRequest(image=b"\0" * MAX_UPLOAD_BYTES, mask=b"\0" * MAX_UPLOAD_BYTES, parameters=params),
                timeout=30,
            )
        assert (
            refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image: not a readable image" in refused.value.details()
        )
        # One byte past the upload limit: the field is named, as over HTTP.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Edit(images_pb2.EditRequest(image=b"\0" * (MAX_UPLOAD_BYTES + 1), parameters=params), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"image: {MAX_UPLOAD_BYTES + 1} bytes exceed the limit of {MAX_UPLOAD_BYTES}" in refused.value.details()
        # Past the largest valid request: gRPC refuses it before reading it.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Edit(images_pb2.EditRequest(image=b"\0" * (gateway_request_bytes() + 1), parameters=params), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Generate(generate_request(size=32), timeout=30).images  # and the gateway goes on


def test_a_stage_refuses_messages_past_its_largest_request():
    limit = stage_request_bytes(Stage.PRIOR)
    with (
        BackgroundServer(lambda: stage_server(Stage.PRIOR), wait_ready=False) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        sample = channel.unary_unary("/unclip.v1.PriorService/Sample")
        with pytest.raises(grpc.RpcError) as refused:
            sample(b"\x0a" + b"\xff" * (limit + 16), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as refused:  # within the limit, but not a SampleRequest
            sample(b"\xff\xff\xff", timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid Sample request message" in refused.value.details()


def test_bytes_that_do_not_parse_get_invalid_argument_with_the_request_id():
    with running_gateway(FakeStages()) as (_, address, _port), grpc.insecure_channel(address) as channel:
        methods = images_pb2.DESCRIPTOR.services_by_name["ImageService"].methods
        paths = [(f"/unclip.v1.ImageService/{m.name}", m.server_streaming) for m in methods]
        paths.append(("/grpc.health.v1.Health/Check", False))
        for path, streaming in paths:
            call = channel.unary_stream(path) if streaming else channel.unary_unary(path)
            with pytest.raises(grpc.RpcError) as refused:
                result = call(b"\xff\xff\xff", metadata=[("x-request-id", "bad-bytes")], timeout=30)
                if streaming:
                    list(result)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
            assert dict(refused.value.trailing_metadata())["x-request-id"] == "bad-bytes", path


# -- previews ---------------------------------------------------------------------------------


def test_stream_events_keep_every_progress_event_and_only_the_newest_preview():
    events = StreamEvents()
    events.put("progress-1")
    for step in range(1, 101):
        events.put_preview(PendingPreview(step, 100, np.zeros((1, 2, 2, 3), np.uint8)))
        if step == 50:
            events.put("progress-2")
    assert len(events) == 3 and events.dropped_previews == 99
    taken = [events.get_nowait() for _ in range(3)]
    assert taken[:2] == ["progress-1", "progress-2"] and taken[2].step == 100
    assert events.empty()


def test_previews_do_not_pile_up_for_a_slow_reader():
    stages = FakeStages(previews=500)
    servicer = ImageServicer(gateway.api.ImageAPI(stages))
    request = images_pb2.GenerateStreamRequest(parameters=images_pb2.GenerationParameters(prompt=PROMPT, preview_every=1))

    async def read_slowly() -> list:
        stream = servicer.GenerateStream(request, HopContext(timeout_s=60))
        first = await anext(stream)  # then the reader stalls while every preview is made
        await asyncio.wait_for(stages.decoded.wait(), 30)
        return [first, *[event async for event in stream]]

    events = asyncio.run(read_slowly())
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds.count("progress") == 4 and kinds[-1] == "result"
    previews = [event.preview for event in events if event.HasField("preview")]
    assert 1 <= len(previews) <= 2  # 500 were made; the superseded ones were dropped unencoded
    assert previews[-1].step == 500 and Image.open(io.BytesIO(previews[-1].png[0])).size == (32, 32)


# -- image work off the event loop ------------------------------------------------------------


def test_uploads_are_decoded_and_pngs_encoded_off_the_event_loop(monkeypatch):
    on_loop: dict[str, list[bool]] = {}

    def recorded(name, function):
        def wrapper(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                running = True
            except RuntimeError:  # a worker thread has no running loop
                running = False
            on_loop.setdefault(name, []).append(running)
            return function(*args, **kwargs)

        return wrapper

    for module, name in [
        (gateway.api, "upload_to_rgb"), (gateway.api, "edit_inputs"), (gateway.api, "frames_to_gif"),
        (unclip.pipeline, "encode_png"), (gateway.streaming, "encode_png"),
    ]:  # fmt: skip
        monkeypatch.setattr(module, name, recorded(name, getattr(module, name)))
    with running_gateway(FakeStages(previews=2)) as (_, address, _port), grpc.insecure_channel(address) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        params = images_pb2.GenerationParameters(prompt=PROMPT, size=32)
        stub.CreateVariations(images_pb2.CreateVariationsRequest(image=png_bytes(64), parameters=params), timeout=30)
        stub.Edit(images_pb2.EditRequest(image=png_bytes(64, "RGBA", transparent_half=True), parameters=params), timeout=30)
        pair = images_pb2.ImagePair(first=png_bytes(64), second=png_bytes(48))
        reply = stub.Interpolate(
            images_pb2.InterpolateRequest(images=pair, frames=3, animated_gif=True, parameters=params), timeout=30
        )
        assert reply.result.gif.startswith(b"GIF8")
        streamed = images_pb2.GenerationParameters(prompt=PROMPT, size=32, preview_every=1)
        events = list(stub.GenerateStream(images_pb2.GenerateStreamRequest(parameters=streamed), timeout=30))
        assert any(event.HasField("preview") for event in events)
    assert set(on_loop) == {"upload_to_rgb", "edit_inputs", "frames_to_gif", "encode_png"}
    assert not any(running for calls in on_loop.values() for running in calls), on_loop


# -- integers of thousands of digits ----------------------------------------------------------

HUGE = "9" * 5000  # past Python's 4300-digit limit on int(str)


@pytest.mark.parametrize("field", ["n", "seed", "prior_steps"])
def test_json_integers_of_thousands_of_digits_get_400_naming_the_field(field):
    with running_gateway(FakeStages()) as (_, _address, port):
        body = f'{{"prompt": "{PROMPT}", "{field}": {HUGE}}}'.encode()
        status, _, answer = post_json(port, "/v1/images/generations", body)
        assert status == 400 and answer["error"]["param"] == field
        assert "at most 20 digits" in answer["error"]["message"] and len(answer["error"]["message"]) < 200
        status, _, answer = post_json(port, "/v1/images/generations", {"prompt": PROMPT, "size": f"{HUGE}x{HUGE}"})
        assert status == 400 and answer["error"]["param"] == "size"
        status, _, answer = post_json(port, "/v1/images/generations", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert status == 400 and "could not parse the JSON body" in answer["error"]["message"]


@pytest.mark.parametrize("field", ["n", "seed", "size"])
def test_form_integers_of_thousands_of_digits_get_400_naming_the_field(field):
    with running_gateway(FakeStages()) as (_, _address, port):
        value = f"{HUGE}x{HUGE}" if field == "size" else HUGE
        status, answer = post_form(port, "/v1/images/variations", {field: value}, {"image": png_bytes(32)})
        assert status == 400 and answer["error"]["param"] == field, answer
        assert "at most 20 digits" in answer["error"]["message"]
