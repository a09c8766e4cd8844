"""Each stage service over real loopback gRPC: health, reflection, valid calls, bad input,
deadlines, cancellation and backpressure."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from servers import BackgroundServer

from decoder_svc.servicer import DECODER_SERVICES, UPSAMPLER_SERVICES, DecoderServicer, UpsamplerServicer
from encoder_svc.servicer import SERVICES as ENCODER_SERVICES
from encoder_svc.servicer import ClipEncoderServicer
from prior_svc.servicer import SERVICES as PRIOR_SERVICES
from prior_svc.servicer import PriorServicer
from unclip import codec
from unclip.options import SamplingOptions
from unclip.serving import Server
from unclip.stages.batcher import BatchSettings
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    prior_pb2,
    prior_pb2_grpc,
    sampling_pb2,
    tensor_pb2,
    upsampler_pb2,
    upsampler_pb2_grpc,
)

SPECS = {
    "encoder": (ClipEncoderServicer, ENCODER_SERVICES, encoder_pb2_grpc.ClipEncoderServiceStub),
    "prior": (PriorServicer, PRIOR_SERVICES, prior_pb2_grpc.PriorServiceStub),
    "decoder": (DecoderServicer, DECODER_SERVICES, decoder_pb2_grpc.DecoderServiceStub),
    "upsampler": (UpsamplerServicer, UPSAMPLER_SERVICES, upsampler_pb2_grpc.UpsamplerServiceStub),
}


class Running:
    def __init__(self, server: Server, stub_class):
        self.server = server
        self.servicer = server.servicer
        self.channel = grpc.insecure_channel(server.address, options=GRPC_OPTIONS)
        self.stub = stub_class(self.channel)


@pytest.fixture(scope="module")
def services():
    started = {}
    contexts = []
    try:
        for name, (servicer_class, specs, stub_class) in SPECS.items():
            context = BackgroundServer(lambda c=servicer_class, s=specs: Server(c(), s, host="127.0.0.1", port=0))
            started[name] = Running(context.__enter__(), stub_class)
            contexts.append(context)
        yield started
    finally:
        for running in started.values():
            running.channel.close()
        for context in contexts:
            context.__exit__(None, None, None)


def text_inputs(services, texts=("a red circle", "a blue square")):
    reply = services["encoder"].stub.EncodeText(encoder_pb2.EncodeTextRequest(texts=list(texts)), timeout=30)
    return reply


def prior_request(services, **overrides) -> prior_pb2.SampleRequest:
    text = text_inputs(services)
    fields = dict(
        text_embeddings=text.text_embeddings,
        text_encodings=text.text_encodings,
        text_mask=text.text_mask,
        seeds=[1, 2],
        sampling=sampling_pb2.SamplingOptions(steps=3),
    )
    fields.update(overrides)
    return prior_pb2.SampleRequest(**fields)


def assert_invalid(call, request, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- health and reflection ----------------------------------------------------------------


def test_health_and_reflection(services):
    for name, running in services.items():
        health = health_pb2_grpc.HealthStub(running.channel)
        for service in ["", running.server.services[0].full_name]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, service)
        listed = ProtoReflectionDescriptorDatabase(running.channel).get_services()
        assert running.server.services[0].full_name in listed
        assert "grpc.health.v1.Health" in listed


def test_not_serving_until_the_model_is_loaded():
    gate = threading.Event()

    class SlowLoadingPrior(PriorServicer):
        def load(self) -> None:
            gate.wait(30)
            super().load()

    context = BackgroundServer(lambda: Server(SlowLoadingPrior(), PRIOR_SERVICES, port=0), wait_ready=False)
    server = context.__enter__()
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert wait_for(lambda: _status(health) is not None)
            assert _status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                prior_pb2_grpc.PriorServiceStub(channel).GetPriorInfo(prior_pb2.GetPriorInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in info.value.details()
            gate.set()
            context.wait_ready()
            assert _status(health) == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        context.__exit__(None, None, None)


def _status(health):
    try:
        return health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError:
        return None


# -- encoder ----------------------------------------------------------------------------


def test_encoder_valid_calls_match_the_engine(services, local_stages):
    reply = text_inputs(services)
    embeddings = codec.to_numpy(reply.text_embeddings)
    expected = local_stages.encoder.encode_text(["a red circle", "a blue square"])
    np.testing.assert_array_equal(embeddings, expected.embeddings)
    np.testing.assert_array_equal(codec.to_numpy(reply.text_encodings), expected.encodings)
    np.testing.assert_array_equal(codec.to_numpy(reply.text_mask), expected.mask)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)

    images = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    reply = services["encoder"].stub.EncodeImage(encoder_pb2.EncodeImageRequest(images=codec.from_numpy(images)), timeout=30)
    image_embeddings = codec.to_numpy(reply.image_embeddings)
    assert image_embeddings.shape == (2, 64)
    np.testing.assert_array_equal(image_embeddings, local_stages.encoder.encode_image(images))

    info = services["encoder"].stub.GetEncoderInfo(encoder_pb2.GetEncoderInfoRequest(), timeout=5).info
    assert info.kind == "clip" and info.embed_dim == 64 and info.version == local_stages.encoder.version


def test_encoder_rejects_bad_input(services):
    stub = services["encoder"].stub
    assert_invalid(stub.EncodeText, encoder_pb2.EncodeTextRequest(texts=[]), "batch size")
    assert_invalid(stub.EncodeText, encoder_pb2.EncodeTextRequest(texts=["a red circle", "  "]), "texts[1]", "empty")
    assert_invalid(stub.EncodeText, encoder_pb2.EncodeTextRequest(texts=["circle " * 40]), "context length")
    floats = codec.from_numpy(np.zeros((1, 8, 8, 3), np.float32))
    assert_invalid(stub.EncodeImage, encoder_pb2.EncodeImageRequest(images=floats), "dtype")
    rgba = codec.from_numpy(np.zeros((1, 8, 8, 4), np.uint8))
    assert_invalid(stub.EncodeImage, encoder_pb2.EncodeImageRequest(images=rgba), "dimension 3")
    torn = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_UINT8, shape=[1, 8, 8, 3], data=b"\0" * 10)
    assert_invalid(stub.EncodeImage, encoder_pb2.EncodeImageRequest(images=torn), "needs 192 bytes")


# -- prior ------------------------------------------------------------------------------


def test_prior_valid_call_matches_the_engine(services, local_stages):
    request = prior_request(services, num_candidates=2)
    embeddings = codec.to_numpy(services["prior"].stub.Sample(request, timeout=60).image_embeddings)
    assert embeddings.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    text = local_stages.encoder.encode_text(["a red circle", "a blue square"])

    expected = local_stages.prior.sample(
        text.embeddings, text.encodings, text.mask, [1, 2], num_candidates=2, sampling=SamplingOptions(steps=3)
    )
    np.testing.assert_array_equal(embeddings, expected)


def test_prior_rejects_bad_input(services):
    stub = services["prior"].stub
    text = text_inputs(services)
    nan = codec.to_numpy(text.text_embeddings)
    nan[0, 3] = np.nan
    assert_invalid(stub.Sample, prior_request(services, text_embeddings=codec.from_numpy(nan)), "NaN")
    wrong_dim = codec.from_numpy(np.zeros((2, 32), np.float32))
    assert_invalid(stub.Sample, prior_request(services, text_embeddings=wrong_dim), "text_embeddings", "64")
    assert_invalid(stub.Sample, prior_request(services, seeds=[1]), "one seed per row")
    assert_invalid(stub.Sample, prior_request(services, sampling=sampling_pb2.SamplingOptions(steps=0)), "steps")
    assert_invalid(stub.Sample, prior_request(services, sampling=sampling_pb2.SamplingOptions(steps=1001)), "steps")
    assert_invalid(stub.Sample, prior_request(services, num_candidates=100), "num_candidates")
    assert_invalid(stub.Sample, prior_request(services, guidance_scale=float("nan")), "guidance_scale")
    assert_invalid(stub.Sample, prior_request(services, guidance_scale=-1.0), "guidance_scale")
    int_mask = codec.from_numpy(codec.to_numpy(text.text_mask).astype(np.uint8))
    assert_invalid(stub.Sample, prior_request(services, text_mask=int_mask), "text_mask", "dtype")
    bad_sampler = sampling_pb2.SamplingOptions(steps=3, eta=2.0)
    assert_invalid(stub.Sample, prior_request(services, sampling=bad_sampler), "eta")


def test_prior_deadline_stops_the_sampler(services):
    running = services["prior"]
    stats = running.servicer.engine.stats
    stopped_before, steps_before = stats.stopped, stats.steps
    request = prior_request(services, sampling=sampling_pb2.SamplingOptions(steps=1000))
    with pytest.raises(grpc.RpcError) as info:
        running.stub.Sample(request, timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The sampler notices between steps and gives up: no 1000-step run keeps the model busy.
    assert wait_for(lambda: stats.stopped == stopped_before + 1)
    assert stats.steps - steps_before < 1000


def test_cancelled_call_stops_the_sampler(services):
    running = services["decoder"]
    stats = running.servicer.engine.stats
    stopped_before = stats.stopped
    request = decoder_pb2.DecodeRequest(
        image_embeddings=codec.from_numpy(_unit_rows(1)), seeds=[5], sampling=sampling_pb2.SamplingOptions(steps=1000)
    )
    future = running.stub.Decode.future(request, timeout=60)
    assert wait_for(lambda: stats.steps > 0 and not future.done())
    future.cancel()
    assert wait_for(lambda: stats.stopped == stopped_before + 1)


def test_backpressure_is_resource_exhausted(services):
    context = BackgroundServer(lambda: Server(PriorServicer(settings=BatchSettings(max_pending=1)), PRIOR_SERVICES, port=0))
    server = context.__enter__()
    try:
        with grpc.insecure_channel(server.address, options=GRPC_OPTIONS) as channel:
            stub = prior_pb2_grpc.PriorServiceStub(channel)
            slow = prior_request(services, sampling=sampling_pb2.SamplingOptions(steps=1000))
            first = stub.Sample.future(slow, timeout=30)
            assert wait_for(lambda: server.servicer.engine.stats.steps > 0)
            with pytest.raises(grpc.RpcError) as info:
                stub.Sample(slow, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queued" in info.value.details()
            first.cancel()
    finally:
        context.__exit__(None, None, None)


# -- decoder and upsampler --------------------------------------------------------------


def _unit_rows(n: int) -> np.ndarray:
    rows = np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_decoder_valid_call(services, local_stages):
    text = text_inputs(services)
    request = decoder_pb2.DecodeRequest(
        image_embeddings=codec.from_numpy(_unit_rows(2)),
        text_encodings=text.text_encodings,
        text_mask=text.text_mask,
        seeds=[3, 4],
        guidance_scale=4.0,  # not the checkpoint's default: a service that dropped it would differ
        sampling=sampling_pb2.SamplingOptions(steps=3),
    )
    images = codec.to_numpy(services["decoder"].stub.Decode(request, timeout=60).images)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])
    expected = local_stages.decoder.decode(
        _unit_rows(2),
        [3, 4],
        text_encodings=codec.to_numpy(text.text_encodings),
        text_mask=codec.to_numpy(text.text_mask),
        guidance_scale=4.0,
        sampling=SamplingOptions(steps=3),
    )
    np.testing.assert_array_equal(images, expected)
    assert local_stages.decoder.config.sampling.guidance_scale != 4.0
    info = services["decoder"].stub.GetDecoderInfo(decoder_pb2.GetDecoderInfoRequest(), timeout=5).info
    assert (info.kind, info.image_size, info.max_steps) == ("decoder", 32, 1000)


def test_decoder_text_guidance_scale_changes_the_image(services, local_stages):
    text = text_inputs(services)
    embeddings = _unit_rows(2)

    def decode(**scales) -> np.ndarray:
        request = decoder_pb2.DecodeRequest(
            image_embeddings=codec.from_numpy(embeddings),
            text_encodings=text.text_encodings,
            text_mask=text.text_mask,
            seeds=[3, 4],
            guidance_scale=2.0,
            sampling=sampling_pb2.SamplingOptions(steps=2),
            **scales,
        )
        return codec.to_numpy(services["decoder"].stub.Decode(request, timeout=60).images)

    unset, caption_1 = decode(), decode(text_guidance_scale=1.0)
    assert not np.array_equal(unset, caption_1)
    expected = local_stages.decoder.decode(
        embeddings,
        [3, 4],
        text_encodings=codec.to_numpy(text.text_encodings),
        text_mask=codec.to_numpy(text.text_mask),
        guidance_scale=2.0,
        text_guidance_scale=1.0,
        sampling=SamplingOptions(steps=2),
    )
    np.testing.assert_array_equal(caption_1, expected)


def test_decoder_rejects_bad_input(services):
    stub = services["decoder"].stub
    steps = sampling_pb2.SamplingOptions(steps=2)
    wrong_dim = codec.from_numpy(np.zeros((1, 65), np.float32))
    assert_invalid(
        stub.Decode, decoder_pb2.DecodeRequest(image_embeddings=wrong_dim, seeds=[1], sampling=steps), "image_embeddings"
    )
    inf = _unit_rows(1)
    inf[0, 0] = np.inf
    assert_invalid(stub.Decode, decoder_pb2.DecodeRequest(image_embeddings=codec.from_numpy(inf), seeds=[1]), "NaN or Inf")
    lone_text = codec.from_numpy(np.zeros((1, 4, 64), np.float32))
    request = decoder_pb2.DecodeRequest(image_embeddings=codec.from_numpy(_unit_rows(1)), text_encodings=lone_text, seeds=[1])
    assert_invalid(stub.Decode, request, "together")
    too_many = codec.from_numpy(np.tile(_unit_rows(1), (65, 1)))
    assert_invalid(stub.Decode, decoder_pb2.DecodeRequest(image_embeddings=too_many, seeds=list(range(65))), "batch size")
    ddxm = sampling_pb2.SamplingOptions(steps=2, sampler=7)
    assert_invalid(
        stub.Decode,
        decoder_pb2.DecodeRequest(image_embeddings=codec.from_numpy(_unit_rows(1)), seeds=[1], sampling=ddxm),
        "sampler",
    )
    text = text_inputs(services, texts=("a red circle",))
    for bad in (float("nan"), -1.0):
        request = decoder_pb2.DecodeRequest(
            image_embeddings=codec.from_numpy(_unit_rows(1)),
            text_encodings=text.text_encodings,
            text_mask=text.text_mask,
            seeds=[1],
            text_guidance_scale=bad,
            sampling=steps,
        )
        assert_invalid(stub.Decode, request, "text_guidance_scale")


def test_upsampler_valid_call_and_bad_input(services, local_stages):
    stub = services["upsampler"].stub
    low = np.random.default_rng(1).integers(0, 256, (1, 8, 12, 3), dtype=np.uint8)
    steps = sampling_pb2.SamplingOptions(steps=2)
    reply = stub.Upsample(upsampler_pb2.UpsampleRequest(images=codec.from_numpy(low), seeds=[9], sampling=steps), timeout=60)
    upsampled = codec.to_numpy(reply.images)
    assert upsampled.shape == (1, 32, 48, 3)
    np.testing.assert_array_equal(upsampled, local_stages.upsamplers[0].upsample(low, [9], sampling=SamplingOptions(steps=2)))
    info = stub.GetUpsamplerInfo(upsampler_pb2.GetUpsamplerInfoRequest(), timeout=5).info
    assert info.scale_factor == 4

    huge = codec.from_numpy(np.zeros((1, 300, 300, 3), np.uint8))
    assert_invalid(stub.Upsample, upsampler_pb2.UpsampleRequest(images=huge, seeds=[1], sampling=steps), "limit")
    gray = codec.from_numpy(np.zeros((1, 8, 8), np.uint8))
    assert_invalid(stub.Upsample, upsampler_pb2.UpsampleRequest(images=gray, seeds=[1], sampling=steps), "dimensions")
    assert_invalid(stub.Upsample, upsampler_pb2.UpsampleRequest(images=codec.from_numpy(low), seeds=[], sampling=steps), "seed")


def test_float_images_hand_on_what_uint8_rounds(services, local_stages):
    """float_images: the decoder answers its images unrounded (their rounding is the uint8
    answer), the upsampler takes them (shipped upsamplers round them to 8 bits as trained, so
    the result equals the uint8 call's) and refuses non-finite ones."""
    text = text_inputs(services)
    request = decoder_pb2.DecodeRequest(
        image_embeddings=codec.from_numpy(_unit_rows(2)), text_encodings=text.text_encodings, text_mask=text.text_mask,
        seeds=[3, 4], sampling=sampling_pb2.SamplingOptions(steps=3), float_images=True,
    )  # fmt: skip
    floats = codec.to_numpy(services["decoder"].stub.Decode(request, timeout=60).images)
    request.float_images = False
    rounded = codec.to_numpy(services["decoder"].stub.Decode(request, timeout=60).images)
    assert floats.dtype == np.float32 and floats.shape == rounded.shape
    assert not np.array_equal(floats, np.round(floats))  # not levels in disguise
    np.testing.assert_array_equal(np.round((floats.clip(-1, 1) + 1) * 127.5).astype(np.uint8), rounded)

    stub, steps = services["upsampler"].stub, sampling_pb2.SamplingOptions(steps=2)
    upsample = upsampler_pb2.UpsampleRequest(images=codec.from_numpy(floats), seeds=[9, 8], sampling=steps, float_images=True)
    from_floats = codec.to_numpy(stub.Upsample(upsample, timeout=60).images)
    upsample.images.CopyFrom(codec.from_numpy(rounded))
    from_levels = codec.to_numpy(stub.Upsample(upsample, timeout=60).images)
    assert from_floats.dtype == np.float32
    np.testing.assert_array_equal(from_floats, from_levels)
    floats[0, 0, 0, 0] = np.nan
    upsample.images.CopyFrom(codec.from_numpy(floats))
    assert_invalid(stub.Upsample, upsample, "NaN")


def test_engines_compute_with_a_fixed_thread_count(monkeypatch):
    """Images must not depend on the thread count a deployment happens to give a process: the
    compute thread (and the loading thread) take the configured count."""
    import torch

    from unclip.settings import TORCH_THREADS
    from unclip.stages import load_engine
    from unclip.stages.compute import on_compute_thread

    def counts() -> tuple[int, int]:
        return torch.get_num_threads(), on_compute_thread(torch.get_num_threads)

    before = counts()
    try:
        monkeypatch.delenv(TORCH_THREADS.name, raising=False)  # whatever the suite runs with
        torch.set_num_threads(1)
        on_compute_thread(torch.set_num_threads, 1)
        load_engine("upsampler")
        assert int(TORCH_THREADS.default) == 2 and counts() == (2, 2)
        monkeypatch.setenv(TORCH_THREADS.name, "3")
        load_engine("upsampler")
        assert counts() == (3, 3)
        monkeypatch.setenv(TORCH_THREADS.name, "zero")
        with pytest.raises(ValueError, match=TORCH_THREADS.name):
            load_engine("upsampler")
    finally:
        torch.set_num_threads(before[0])
        on_compute_thread(torch.set_num_threads, before[1])
