"""Fuzzing every server with hypothesis: the four stage services and the gateway (gRPC and HTTP),
each a grpc.aio server on 127.0.0.1 in this process, as in tests/test_observability.py.

Over every RPC of every service: random bytes, and messages built from the request's descriptor
with random field values (nested messages, oneofs, extreme numbers, NaN, odd strings). Over every
HTTP route: JSON bodies and multipart forms with known and unknown fields and random values.
Whatever arrives, the answer is never INTERNAL/UNKNOWN or HTTP 500, every call ends within its
bounded deadline, and every server is healthy and serves a request afterwards.

Bounded: a few dozen examples per test, no example database (nothing is written to the tree),
and the gateway's cost cap low enough that a random valid request stays cheap.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import math
import random
from contextlib import ExitStack
from functools import cache
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import FAST_STEPS
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from servers import BackgroundServer

from gateway.admission import GatewayLimits
from gateway.app import build_gateway
from gateway.remote import RemoteStages
from unclip.calls import DecodeCall, EncodeImageCall, EncodeTextCall, SampleCall, UpsampleCall, service_full_name
from unclip.codec import WIRE_DTYPES
from unclip.options import SamplingOptions
from unclip.serving import stage_server
from unclip.stage import Stage
from unclip.v1 import decoder_pb2, encoder_pb2, images_pb2, images_pb2_grpc, prior_pb2, tensor_pb2, upsampler_pb2

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
# Calls go without a deadline, so the servers' default one (--default-timeout) bounds the work;
# an answer that has not come HANG_SECONDS later is a hang.
SERVER_DEADLINE = 20.0
HANG_SECONDS = 60.0
# A random valid request runs for real; this keeps it to a few cheap steps (FAST_STEPS at 32 px costs 9).
MAX_REQUEST_COST = 30
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

SERVICES = {
    "gateway": images_pb2.DESCRIPTOR.services_by_name["ImageService"],
    "encoder": encoder_pb2.DESCRIPTOR.services_by_name["ClipEncoderService"],
    "prior": prior_pb2.DESCRIPTOR.services_by_name["PriorService"],
    "decoder": decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"],
    "upsampler": upsampler_pb2.DESCRIPTOR.services_by_name["UpsamplerService"],
}
METHODS = [(server, method) for server, service in SERVICES.items() for method in service.methods]
_SERVER_OF = {service.full_name: server for server, service in SERVICES.items()}
# What every server also answers: health and reflection, with their own request messages.
COMMON_PATHS = [
    ("/grpc.health.v1.Health/Check", "unary"),
    ("/grpc.health.v1.Health/Watch", "server_stream"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi"),
]


@pytest.fixture(scope="module")
def servers():
    """{name: (gRPC address)} and the gateway's HTTP port under "http"."""
    with ExitStack() as stack:
        stages = {
            stage: stack.enter_context(BackgroundServer(lambda s=stage: stage_server(s, default_timeout=SERVER_DEADLINE)))
            for stage in Stage
        }

        def make_gateway():
            backend = RemoteStages(*(stages[s].address for s in (Stage.ENCODER, Stage.PRIOR, Stage.DECODER)),
                                   [stages[Stage.UPSAMPLER].address])  # fmt: skip
            limits = GatewayLimits(max_request_cost=MAX_REQUEST_COST, default_timeout=SERVER_DEADLINE)
            return build_gateway(backend, host="127.0.0.1", port=0, http_port=0, storage=None, limits=limits)

        gateway = stack.enter_context(BackgroundServer(make_gateway))
        addresses = {stage.value: server.address for stage, server in stages.items()} | {"gateway": gateway.address}
        channels = {name: stack.enter_context(grpc.insecure_channel(address)) for name, address in addresses.items()}
        http_port = int(gateway.metrics_address.rsplit(":", 1)[1])
        yield _Servers(channels=channels, http=http_port, valid=_valid_requests(channels))


class _Servers(dict):
    """What the tests reach (channels, the HTTP port, valid requests), shown short in a failure."""

    def __repr__(self) -> str:
        return "<servers>"


def _unary(channel: grpc.Channel, call: Any) -> Any:
    path = f"/{service_full_name(call.STAGE)}/{call.METHOD}"
    return call.result(
        channel.unary_unary(path, response_deserializer=call.RESPONSE.FromString)(call.to_proto().SerializeToString(), timeout=60)
    )


def _valid_requests(channels: dict[str, grpc.Channel]) -> dict[str, Any]:
    """A valid, quick request of every method, by full method name, from the stages' real
    answers: the fuzz mutates these to get past the first checks."""
    quick = SamplingOptions(steps=2)
    text = _unary(channels["encoder"], EncodeTextCall(["a red circle"]))
    sample = SampleCall(text.embeddings, text.encodings, text.mask, seeds=[1], sampling=quick)
    embeddings = _unary(channels["prior"], sample)
    decode = DecodeCall(embeddings, seeds=[1], text_encodings=text.encodings, text_mask=text.mask, sampling=quick)
    upsample = UpsampleCall(np.zeros((1, 32, 32, 3), np.uint8), seeds=[1], sampling=SamplingOptions(steps=1))
    params = images_pb2.GenerationParameters(prompt="a red circle", size=32, **FAST_STEPS)
    pair = images_pb2.ImagePair(first=_png(), second=_png(side=16))
    requests = {
        "unclip.v1.ClipEncoderService.EncodeText": EncodeTextCall(["a red circle"]).to_proto(),
        "unclip.v1.ClipEncoderService.EncodeImage": EncodeImageCall(np.zeros((1, 32, 32, 3), np.uint8)).to_proto(),
        "unclip.v1.PriorService.Sample": sample.to_proto(),
        "unclip.v1.DecoderService.Decode": decode.to_proto(),
        "unclip.v1.DecoderService.DecodeStream": decoder_pb2.DecodeStreamRequest(request=decode.to_proto(), preview_every=1),
        "unclip.v1.UpsamplerService.Upsample": upsample.to_proto(),
        "unclip.v1.ImageService.Generate": images_pb2.GenerateRequest(parameters=params),
        "unclip.v1.ImageService.GenerateStream": images_pb2.GenerateStreamRequest(parameters=params),
        "unclip.v1.ImageService.CreateVariations": images_pb2.CreateVariationsRequest(image=_png(), parameters=params),
        "unclip.v1.ImageService.Interpolate": images_pb2.InterpolateRequest(images=pair, frames=2, parameters=params),
        "unclip.v1.ImageService.TextDiff": images_pb2.TextDiffRequest(
            image=_png(), caption="a red circle", target_caption="a blue square", frames=2, parameters=params
        ),
        "unclip.v1.ImageService.Edit": images_pb2.EditRequest(image=_png("RGBA", transparent=True), parameters=params),
    }
    for name, request in requests.items():  # each is valid: it is answered
        method = images_pb2.DESCRIPTOR.pool.FindMethodByName(name)
        path, kind = _method_path(method)
        assert (
            _call(channels[_SERVER_OF[method.containing_service.full_name]], path, kind, request.SerializeToString())
            == grpc.StatusCode.OK
        ), name
    return requests


# -- messages from descriptors ----------------------------------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        # Mostly small (counts, steps, sizes, shapes a stage may accept), sometimes anything, or the extremes.
        return st.one_of(st.integers(max(low, -2), 12), st.integers(low, high), st.sampled_from([low, high]))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=96)
    if field.type == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers arrive too
        return st.one_of(st.sampled_from([value.number for value in field.enum_type.values]), st.integers(-3, 50))
    raise AssertionError(f"no strategy for {field.full_name} (type {field.type})")


# Dimensions a stage may take (batches first, then embedding widths, token counts, sides).
_DIMS = st.one_of(st.integers(0, 4), st.sampled_from([8, 16, 32, 64, 77, 128, 256, 512, 768]))


@st.composite
def consistent_tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    """Tensors whose data fits their dtype and shape, so the stages' own checks are reached;
    at most 3 rows and 16 Ki elements (an upsampler's input up to 64 x 64), so that a valid call
    stays quick."""
    dtype = draw(st.sampled_from(list(WIRE_DTYPES)))
    shape = draw(st.lists(_DIMS, max_size=3).map(lambda dims: [draw(st.integers(0, 3)), *dims]))
    assume(math.prod(shape) <= 1 << 14)
    size = math.prod(shape) * WIRE_DTYPES[dtype].itemsize
    fill = draw(st.sampled_from(["zeros", "ones", "random"]))
    if fill == "random":
        data = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    else:
        data = (np.zeros if fill == "zeros" else np.ones)(math.prod(shape), WIRE_DTYPES[dtype]).tobytes()
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


@cache
def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `descriptor` with each field set or not, at random; oneofs end up with one
    member (the last set), nesting stops at depth 4. Tensors are often consistent ones."""
    message_class = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        message = message_class()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            repeated = field.is_repeated
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 4:
                    continue
                nested = message_strategy(field.message_type, depth + 1)
                if repeated:
                    for item in draw(st.lists(nested, max_size=3)):
                        getattr(message, field.name).add().CopyFrom(item)
                else:
                    getattr(message, field.name).CopyFrom(draw(nested))
            elif repeated:
                getattr(message, field.name).extend(draw(st.lists(_scalar(field), max_size=4)))
            else:
                setattr(message, field.name, draw(_scalar(field)))
        return message

    if descriptor.full_name == tensor_pb2.Tensor.DESCRIPTOR.full_name:
        return st.one_of(consistent_tensors(), build())
    return build()


# -- calling any method with any bytes --------------------------------------------------------


def _answer(channel: grpc.Channel, path: str, kind: str, payload: bytes) -> grpc.StatusCode:
    try:
        if kind == "unary":
            channel.unary_unary(path)(payload)
        elif kind == "server_stream":
            stream = channel.unary_stream(path)(payload)
            for _ in stream:
                if path.endswith("/Watch"):
                    stream.cancel()  # health Watch streams until cancelled: its first answer is enough
                    break
        else:
            for _ in channel.stream_stream(path)(iter([payload])):
                pass
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


_CALLER = concurrent.futures.ThreadPoolExecutor(max_workers=1)


def _call(channel: grpc.Channel, path: str, kind: str, payload: bytes) -> grpc.StatusCode:
    """The status code of calling `path` with `payload` as the request's bytes, without a
    deadline of the call's own (the server's default applies); a call unanswered after
    HANG_SECONDS fails the test."""
    answer = _CALLER.submit(_answer, channel, path, kind, payload)
    try:
        return answer.result(timeout=HANG_SECONDS)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"{path}: no answer within {HANG_SECONDS:g} s (the servers' deadline is {SERVER_DEADLINE:g} s)")


def _method_path(method: MethodDescriptor) -> tuple[str, str]:
    return f"/{method.containing_service.full_name}/{method.name}", "server_stream" if method.server_streaming else "unary"


def _every_path() -> list[tuple[str, str, str]]:
    """(server, path, kind) of every method every server answers."""
    paths = [(server, *_method_path(method)) for server, method in METHODS]
    return paths + [(server, path, kind) for server in SERVICES for path, kind in COMMON_PATHS]


def test_bytes_that_do_not_parse_get_invalid_argument_on_every_method(servers):
    for server, path, kind in _every_path():
        code = _call(servers["channels"][server], path, kind, b"\xff\xff\xff")
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (server, path, code)


@FUZZ
@given(data=st.data())
def test_valid_requests_with_random_changes_never_get_an_internal_error(servers, data):
    """A valid request with fields cleared and others set at random (MergeFrom: scalars
    replaced, repeated fields and tensors' shapes extended)."""
    server, method = data.draw(st.sampled_from([(s, m) for s, m in METHODS if m.full_name in servers["valid"]]))
    request = type(servers["valid"][method.full_name])()
    request.CopyFrom(servers["valid"][method.full_name])
    for field in data.draw(st.sets(st.sampled_from(list(method.input_type.fields)))):
        request.ClearField(field.name)
    request.MergeFrom(data.draw(message_strategy(method.input_type)))
    path, kind = _method_path(method)
    code = _call(servers["channels"][server], path, kind, request.SerializeToString())
    assert code not in FORBIDDEN, (server, path, request, code)


@FUZZ
@given(data=st.data())
def test_random_bytes_never_get_an_internal_error(servers, data):
    server, path, kind = data.draw(st.sampled_from(_every_path()))
    payload = data.draw(st.binary(max_size=512))
    code = _call(servers["channels"][server], path, kind, payload)
    assert code not in FORBIDDEN, (server, path, payload, code)


@FUZZ
@given(data=st.data())
def test_structured_requests_never_get_an_internal_error(servers, data):
    server, method = data.draw(st.sampled_from(METHODS))
    request = data.draw(message_strategy(method.input_type))
    path, kind = _method_path(method)
    code = _call(servers["channels"][server], path, kind, request.SerializeToString())
    assert code not in FORBIDDEN, (server, path, request, code)


# -- HTTP -------------------------------------------------------------------------------------


def _png(mode: str = "RGB", side: int = 24, transparent: bool = False) -> bytes:
    image = Image.new(mode, (side, side), {"RGBA": (10, 200, 30, 255), "RGB": (10, 200, 30)}.get(mode, 120))
    if transparent:
        image.paste((0, 0, 0, 0), (0, 0, side, side // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=30),
    st.sampled_from(["32x32", "128x128", "48x48", "32x64", "url", "b64_json", "ddim", "ddpm"]),
)  # fmt: skip
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELD_NAMES = [
    "prompt", "n", "size", "seed", "response_format", "model", "user", "quality", "style", "prior_guidance_scale",
    "decoder_guidance_scale", "decoder_text_guidance_scale", "prior_steps", "decoder_steps", "upsampler_steps",
    "sampler", "prior_candidates", "preview_every", "image", "mask", "unknown",
    "stream", "partial_images", "stage_events", "prompts", "frames", "first_image", "second_image",
]  # fmt: skip
JSON_ROUTES = ["/v1/images/generations", "/v1/images/interpolations"]
# Bodies that mostly get past the parser, so the fields' checks are what is fuzzed.
JSON_BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=6).map(lambda d: {"prompt": "a red circle"} | d),
    st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=6),
    JSON_VALUES,
)
FORM_TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["1", "0", "-1", "32x32", "1e3", "nan", "9" * 5000, "b64_json"]))
FILES = st.sampled_from([_png(), _png("RGBA", transparent=True), _png("RGBA"), _png("L"), b"", b"GIF89a", b"\x89PNG\r\n\x1a\n"])


def _post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_SECONDS)
    try:
        connection.request("POST", path, body, {"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _check_http_answer(status: int, body: bytes) -> None:
    assert status < 500, (status, body)
    if status == 200 and body.startswith(b"event: "):  # a streamed answer: no event is an internal error
        for block in body.decode().strip().split("\n\n"):
            name, data = (line.split(": ", 1)[1] for line in block.split("\n"))
            if name == "error":
                assert json.loads(data)["error"]["type"] != "server_error", data
        return
    answer = json.loads(body)
    if status >= 400:  # OpenAI's error shape
        assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer


@FUZZ
@given(body=JSON_BODIES, route=st.sampled_from(JSON_ROUTES))
def test_json_bodies_never_get_a_500(servers, body, route):
    status, answer = _post(servers["http"], route, json.dumps(body).encode(), "application/json")
    _check_http_answer(status, answer)


@FUZZ
@given(
    body=st.binary(max_size=256),
    content_type=st.sampled_from(["application/json", "multipart/form-data; boundary=x", "text/plain", ""]),
)
def test_raw_bodies_never_get_a_500(servers, body, content_type):
    for path in ("/v1/images/generations", "/v1/images/variations", "/v1/images/edits", "/v1/images/interpolations"):
        status, answer = _post(servers["http"], path, body, content_type)
        _check_http_answer(status, answer)


@FUZZ
@given(
    route=st.sampled_from(["/v1/images/variations", "/v1/images/edits", "/v1/images/interpolations"]),
    fields=st.dictionaries(
        st.sampled_from([name for name in FIELD_NAMES if "image" not in name and name != "mask"]), FORM_TEXT, max_size=5
    ),
    files=st.dictionaries(
        st.sampled_from(["image", "mask", "image[]", "prompt", "first_image", "second_image"]), FILES, max_size=2
    ),
)
def test_multipart_forms_never_get_a_500(servers, route, fields, files):
    boundary = "fuzz-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v.encode() + b"\r\n"
        for k, v in fields.items()
    ]
    for name, data in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f.png"\r\nContent-Type: image/png\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, answer = _post(servers["http"], route, body, f"multipart/form-data; boundary={boundary}")
    _check_http_answer(status, answer)


# -- afterwards -------------------------------------------------------------------------------


def test_every_server_is_healthy_and_serves_after_the_fuzz(servers):
    for name, channel in servers["channels"].items():
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    request = images_pb2.GenerateRequest(
        parameters=images_pb2.GenerationParameters(prompt="a red circle in the top left corner", seed=3, size=32, **FAST_STEPS)
    )
    reply = images_pb2_grpc.ImageServiceStub(servers["channels"]["gateway"]).Generate(request, timeout=60)
    assert reply.images[0].width == 32
    body = {"prompt": "a blue square", "size": "32x32", "response_format": "b64_json", **FAST_STEPS}
    status, answer = _post(servers["http"], "/v1/images/generations", json.dumps(body).encode(), "application/json")
    assert status == 200 and len(json.loads(answer)["data"]) == 1
