"""Tests for the client SDK against a real gRPC server on 127.0.0.1 that fakes image generation."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from PIL import Image

from unclip.client import Animation, AsyncClient, Client, GeneratedImage, Preview, StageProgress, UnclipError
from unclip.png import encode_png
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import images_pb2, images_pb2_grpc, sampling_pb2

OPTIONAL_FIELDS = (
    "seed",
    "prior_guidance_scale",
    "decoder_guidance_scale",
    "decoder_text_guidance_scale",
    "prior_steps",
    "decoder_steps",
    "upsampler_steps",
    "prior_candidates",
)
STAGES = [(images_pb2.STAGE_ENCODE, 0), (images_pb2.STAGE_PRIOR, 0), (images_pb2.STAGE_DECODE, 0), (images_pb2.STAGE_UPSAMPLE, 0)]
MODELS = {"clip": "clip-test", "prior": "prior-test", "decoder": "decoder-test"}
DEFAULT_SEED = 1234
DEFAULT_SIZE = 8
REQUEST_ID = "req-0123"
PREVIEW_STEPS = 4


def fake_pixels(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def fake_images(
    parameters: images_pb2.GenerationParameters,
    delivery: images_pb2.Delivery | None = None,
    frames: int | None = None,
) -> images_pb2.GenerateResponse:
    """What the gateway would answer, with noise for pixels and the same PNG text chunks.

    With `frames`, that many images sharing the first seed (an interpolation or text diff); with
    a URL response format, URLs instead of PNG bytes.
    """
    first_seed = parameters.seed if parameters.HasField("seed") else DEFAULT_SEED
    size = parameters.size or DEFAULT_SIZE
    seeds = [first_seed] * frames if frames else range(first_seed, first_seed + (parameters.n or 1))
    as_url = delivery is not None and delivery.response_format == images_pb2.RESPONSE_FORMAT_URL
    images = []
    for index, seed in enumerate(seeds):
        if as_url:
            url = f"https://store.test/{REQUEST_ID}/{index}.png?signature=x"
            images.append(images_pb2.GeneratedImage(url=url, seed=seed, width=size, height=size))
            continue
        text = {
            "prompt": parameters.prompt,
            "seed": str(seed),
            "parameters": {"size": size, "prior_steps": parameters.prior_steps or None},
            "models": MODELS,
            "Software": "unclip test",
        }
        png = encode_png(fake_pixels(seed, size), text)
        images.append(images_pb2.GeneratedImage(png=png, seed=seed, width=size, height=size))
    return images_pb2.GenerateResponse(images=images, request_id=REQUEST_ID)


def fake_animation(request: images_pb2.InterpolateRequest | images_pb2.TextDiffRequest) -> images_pb2.GenerateResponse:
    response = fake_images(request.parameters, request.delivery, frames=request.frames)
    if request.animated_gif:
        if request.delivery.response_format == images_pb2.RESPONSE_FORMAT_URL:
            response.gif_url = f"https://store.test/{REQUEST_ID}/animation.gif"
        else:
            response.gif = gif_bytes(request.frames)
    return response


def gif_bytes(frames: int) -> bytes:
    pictures = [Image.fromarray(fake_pixels(index, DEFAULT_SIZE)) for index in range(frames)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], loop=0)
    return buffer.getvalue()


@dataclass
class FakeImageService(images_pb2_grpc.ImageServiceServicer):
    """ImageService that fails as told, then answers with fake images; records what it received."""

    failures: list[grpc.StatusCode] = field(default_factory=list)  # answered in order, one per call
    always: grpc.StatusCode | None = None
    delay: float = 0.0  # seconds each call takes before answering
    fail_after_first_event: bool = False
    requests: list[images_pb2.GenerationParameters] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)  # the whole requests
    metadata: list[dict[str, str]] = field(default_factory=list)  # invocation metadata of Generate calls

    def _start(self, request: Message, context: grpc.ServicerContext) -> None:
        self.requests.append(request.parameters)
        self.received.append(request)
        time.sleep(self.delay)
        code = self.failures.pop(0) if self.failures else self.always
        if code is not None:
            context.abort(code, f"fake failure {code.name}")

    def Generate(self, request, context):
        self._start(request, context)
        self.metadata.append(dict(context.invocation_metadata()))
        return fake_images(request.parameters, request.delivery)

    def GenerateStream(self, request, context):
        self._start(request, context)
        parameters = request.parameters
        for completed, (stage, index) in enumerate(STAGES, start=1):
            if stage == images_pb2.STAGE_DECODE and parameters.preview_every:
                for step in range(parameters.preview_every, PREVIEW_STEPS + 1, parameters.preview_every):
                    pngs = [encode_png(fake_pixels(step, 4), {}) for _ in range(parameters.n or 1)]
                    yield images_pb2.GenerateStreamResponse(
                        preview=images_pb2.Preview(step=step, total_steps=PREVIEW_STEPS, png=pngs)
                    )
            progress = images_pb2.StageProgress(
                stage=stage, stage_index=index, completed_stages=completed, total_stages=len(STAGES), stage_seconds=0.25
            )
            yield images_pb2.GenerateStreamResponse(progress=progress)
            if self.fail_after_first_event:
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake failure mid-stream")
        yield images_pb2.GenerateStreamResponse(result=fake_images(parameters, request.delivery))

    def CreateVariations(self, request, context):
        self._start(request, context)
        return images_pb2.CreateVariationsResponse(result=fake_images(request.parameters, request.delivery))

    def Edit(self, request, context):
        self._start(request, context)
        return images_pb2.EditResponse(result=fake_images(request.parameters, request.delivery))

    def Interpolate(self, request, context):
        self._start(request, context)
        return images_pb2.InterpolateResponse(result=fake_animation(request))

    def TextDiff(self, request, context):
        self._start(request, context)
        return images_pb2.TextDiffResponse(result=fake_animation(request))


@pytest.fixture
def service() -> FakeImageService:
    return FakeImageService()


@pytest.fixture
def target(service: FakeImageService) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    images_pb2_grpc.add_ImageServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def fast_client(target: str, **kwargs) -> Client:
    return Client(target, **{"timeout": 10.0, "backoff": 0.01, "max_backoff": 0.05, **kwargs})


def fast_async_client(target: str, **kwargs) -> AsyncClient:
    return AsyncClient(target, **{"timeout": 10.0, "backoff": 0.01, "max_backoff": 0.05, **kwargs})


def check_images(images: list[GeneratedImage], prompt: str, seeds: list[int], size: int) -> None:
    assert [image.seed for image in images] == seeds
    for image in images:
        assert isinstance(image.image, Image.Image)
        assert image.image.size == (size, size) and (image.width, image.height) == (size, size)
        np.testing.assert_array_equal(np.asarray(image.image), fake_pixels(image.seed, size))
        assert image.metadata["prompt"] == prompt
        assert image.metadata["seed"] == image.seed
        assert image.metadata["parameters"]["size"] == size
        assert image.metadata["models"] == MODELS
        assert image.metadata["Software"] == "unclip test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Generate -------------------------------------------------------------------------------------


def test_generate_returns_images_with_metadata_from_the_png(target, tmp_path):
    with fast_client(target) as client:
        images = client.generate("a red cube", n=2, seed=42, size=16)

    check_images(images, "a red cube", [42, 43], 16)
    path = tmp_path / "cube.png"
    images[0].save(path)
    assert path.read_bytes() == images[0].png


def test_parameters_not_given_are_not_set(target, service):
    with fast_client(target) as client:
        client.generate("a red cube")

    (sent,) = service.requests
    assert sent.prompt == "a red cube" and sent.n == 0  # unset: the server's default, 1
    assert sent.size == 0 and sent.sampler == sampling_pb2.SAMPLER_UNSPECIFIED
    assert [name for name in OPTIONAL_FIELDS if sent.HasField(name)] == []


def test_application_metadata_routes_through_a_ray_serve_proxy(target, service):
    with fast_client(target) as client:
        client.generate("a red cube")
    with Client(target, application="gateway", retries=0, timeout=10) as client:
        client.generate("a red cube")
    assert "application" not in service.metadata[0]
    assert service.metadata[1]["application"] == "gateway"


def test_parameters_given_arrive(target, service):
    with fast_client(target) as client:
        client.generate(
            "a red cube",
            n=3,
            size=16,
            seed=0,
            prior_guidance_scale=4.0,
            decoder_guidance_scale=0.0,
            decoder_text_guidance_scale=2.5,
            prior_steps=5,
            decoder_steps=6,
            upsampler_steps=7,
            sampler="ddpm",
            prior_candidates=2,
        )

    (sent,) = service.requests
    # Zeros included: "given" means set, even where the value equals proto3's default.
    assert all(sent.HasField(name) for name in OPTIONAL_FIELDS)
    assert (sent.n, sent.size, sent.seed) == (3, 16, 0)
    assert (sent.prior_guidance_scale, sent.decoder_guidance_scale, sent.decoder_text_guidance_scale) == (4.0, 0.0, 2.5)
    assert (sent.prior_steps, sent.decoder_steps, sent.upsampler_steps, sent.prior_candidates) == (5, 6, 7, 2)
    assert sent.sampler == sampling_pb2.SAMPLER_DDPM


def test_arguments_that_cannot_be_sent_raise_before_any_call(target, service):
    with fast_client(target) as client:
        with pytest.raises(ValueError, match="sampler"):
            client.generate("a red cube", sampler="euler")
        with pytest.raises(ValueError, match="seed"):
            client.generate("a red cube", seed=-1)
        with pytest.raises(ValueError, match="n"):
            client.generate("a red cube", n=0)
    assert service.requests == []


# --- Errors and retries ---------------------------------------------------------------------------


def test_unavailable_is_retried_until_it_succeeds(target, service):
    service.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    with fast_client(target, retries=3) as client:
        images = client.generate("a red cube", seed=5)

    assert len(service.requests) == 3
    check_images(images, "a red cube", [5], DEFAULT_SIZE)


def test_invalid_argument_is_not_retried(target, service):
    service.always = grpc.StatusCode.INVALID_ARGUMENT
    with fast_client(target, retries=3) as client, pytest.raises(UnclipError) as caught:
        client.generate("a red cube")

    assert len(service.requests) == 1
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details == "fake failure INVALID_ARGUMENT"
    assert error.target == target and error.attempts == 1
    assert target in str(error) and "INVALID_ARGUMENT" in str(error)


def test_retries_are_limited_by_count(target, service):
    service.always = grpc.StatusCode.UNAVAILABLE
    with fast_client(target, retries=2) as client, pytest.raises(UnclipError) as caught:
        client.generate("a red cube")

    assert len(service.requests) == 3
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.attempts == 3
    assert "after 3 attempts" in str(caught.value)


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_retry_that_runs_out_of_time_still_names_the_failure_it_retried():
    from unclip.client.retry import Attempts, RetryPolicy

    attempts = Attempts("Generate", "gateway:50051", RetryPolicy(retries=5, backoff=0.0, max_backoff=0.0), timeout=60)
    attempts.start()
    assert attempts.failed(_Failed(grpc.StatusCode.UNAVAILABLE, "connection refused")) == 0.0
    attempts.start()
    with pytest.raises(UnclipError) as caught:
        attempts.failed(_Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert str(caught.value).endswith("(after 2 attempts); the earlier attempts failed with UNAVAILABLE: connection refused")


def test_retries_stop_at_the_deadline(target, service):
    service.always = grpc.StatusCode.UNAVAILABLE
    timeout = 0.5
    with Client(target, timeout=timeout, retries=1000, backoff=0.02, max_backoff=0.1) as client:
        started = time.monotonic()
        with pytest.raises(UnclipError) as caught:
            client.generate("a red cube")
        elapsed = time.monotonic() - started

    assert elapsed < timeout + 0.3
    assert 1 < len(service.requests) < 1000
    # Retries stop before a backoff would cross the deadline (UNAVAILABLE); on a loaded machine
    # the last retry itself may run out of time, and its error still names the real failure.
    if caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert "the earlier attempts failed with UNAVAILABLE" in str(caught.value)
    else:
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "timeout" in str(caught.value)


def test_each_attempt_gets_only_the_time_left(target, service):
    service.always = grpc.StatusCode.UNAVAILABLE
    service.delay = 0.3  # the second attempt starts with ~0.2 s left and runs out
    with Client(target, timeout=0.5, retries=5, backoff=0.0) as client:
        started = time.monotonic()
        with pytest.raises(UnclipError) as caught:
            client.generate("a red cube")
        elapsed = time.monotonic() - started

    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.45 < elapsed < 0.8
    assert len(service.requests) == 2


def test_per_call_timeout_overrides_the_clients(target, service):
    service.delay = 0.3
    with Client(target, timeout=0.1, retries=0) as client:
        assert len(client.generate("a red cube", timeout=5.0)) == 1
        with pytest.raises(UnclipError) as caught:
            client.generate("a red cube")
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unreachable_server_raises_unavailable_naming_the_target():
    target = f"127.0.0.1:{free_port()}"
    with fast_client(target, retries=1) as client, pytest.raises(UnclipError) as caught:
        client.generate("a red cube")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.attempts == 2
    assert target in str(caught.value)


# --- GenerateStream -------------------------------------------------------------------------------


def check_stream_events(events: list[StageProgress | list[GeneratedImage]]) -> None:
    *progress, images = events
    assert progress == [
        StageProgress("encode", 0, 1, 4, 0.25),
        StageProgress("prior", 0, 2, 4, 0.25),
        StageProgress("decode", 0, 3, 4, 0.25),
        StageProgress("upsample", 0, 4, 4, 0.25),
    ]
    check_images(images, "a red cube", [9, 10], DEFAULT_SIZE)


def test_stream_yields_progress_then_images(target, service):
    with fast_client(target) as client:
        events = list(client.generate_stream("a red cube", n=2, seed=9))

    check_stream_events(events)
    assert not service.requests[0].HasField("prior_steps")


def test_stream_is_retried_before_the_first_event(target, service):
    service.failures = [grpc.StatusCode.UNAVAILABLE]
    with fast_client(target) as client:
        events = list(client.generate_stream("a red cube", n=2, seed=9))

    check_stream_events(events)
    assert len(service.requests) == 2


def test_stream_is_not_retried_after_an_event(target, service):
    service.fail_after_first_event = True
    events = []
    with fast_client(target) as client, pytest.raises(UnclipError) as caught:
        for event in client.generate_stream("a red cube"):
            events.append(event)

    assert events == [StageProgress("encode", 0, 1, 4, 0.25)]
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(service.requests) == 1


# --- AsyncClient ----------------------------------------------------------------------------------


def test_async_generate(target, service, tmp_path):
    async def main() -> list[GeneratedImage]:
        async with fast_async_client(target) as client:
            return await client.generate("a red cube", n=2, seed=42, size=16, sampler="ddim", decoder_text_guidance_scale=3.0)

    images = asyncio.run(main())

    check_images(images, "a red cube", [42, 43], 16)
    (sent,) = service.requests
    assert sent.sampler == sampling_pb2.SAMPLER_DDIM
    assert [name for name in OPTIONAL_FIELDS if sent.HasField(name)] == ["seed", "decoder_text_guidance_scale"]
    assert sent.decoder_text_guidance_scale == 3.0
    images[1].save(tmp_path / "cube.png")
    assert (tmp_path / "cube.png").read_bytes() == images[1].png


def test_async_retries_unavailable_only(target, service):
    async def main() -> None:
        async with fast_async_client(target, retries=3) as client:
            service.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
            assert len(await client.generate("a red cube")) == 1
            assert len(service.requests) == 3

            service.requests.clear()
            service.failures = [grpc.StatusCode.INVALID_ARGUMENT]
            with pytest.raises(UnclipError) as caught:
                await client.generate("a red cube")
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert len(service.requests) == 1

    asyncio.run(main())


def test_async_retries_stop_at_the_deadline(target, service):
    service.always = grpc.StatusCode.UNAVAILABLE

    async def main() -> None:
        async with AsyncClient(target, timeout=0.5, retries=1000, backoff=0.02, max_backoff=0.1) as client:
            started = time.monotonic()
            with pytest.raises(UnclipError) as caught:
                await client.generate("a red cube")
            # It stops near the 0.5 s deadline instead of making 1000 attempts. The error is the
            # last refusal, or the deadline itself when it ran out during an attempt (a loaded machine).
            assert time.monotonic() - started < 1.5
            assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    asyncio.run(main())
    assert len(service.requests) > 1


def test_async_stream(target, service):
    service.failures = [grpc.StatusCode.UNAVAILABLE]

    async def main() -> list[StageProgress | list[GeneratedImage]]:
        async with fast_async_client(target) as client:
            return [event async for event in client.generate_stream("a red cube", n=2, seed=9)]

    check_stream_events(asyncio.run(main()))
    assert len(service.requests) == 2


def test_async_stream_is_not_retried_after_an_event(target, service):
    service.fail_after_first_event = True

    async def main() -> list[StageProgress | list[GeneratedImage]]:
        events = []
        async with fast_async_client(target) as client:
            with pytest.raises(UnclipError):
                async for event in client.generate_stream("a red cube"):
                    events.append(event)
        return events

    assert asyncio.run(main()) == [StageProgress("encode", 0, 1, 4, 0.25)]
    assert len(service.requests) == 1


# --- Delivery and previews ------------------------------------------------------------------------


def test_generate_sends_png_delivery_by_default_and_returns_the_request_id(target, service):
    with fast_client(target) as client:
        (image,) = client.generate("a red cube")

    (sent,) = service.received
    assert sent.delivery.response_format == images_pb2.RESPONSE_FORMAT_PNG_BYTES
    assert sent.delivery.idempotency_key == ""
    assert image.request_id == REQUEST_ID and image.url is None


def test_generate_with_urls_returns_urls_without_pngs(target, service, tmp_path):
    with fast_client(target) as client:
        images = client.generate("a red cube", n=2, seed=3, response_format="url", idempotency_key="order-17")

    (sent,) = service.received
    assert sent.delivery.response_format == images_pb2.RESPONSE_FORMAT_URL
    assert sent.delivery.idempotency_key == "order-17"
    assert [image.url for image in images] == [f"https://store.test/{REQUEST_ID}/{i}.png?signature=x" for i in (0, 1)]
    for index, image in enumerate(images):
        assert (image.png, image.image, image.metadata) == (b"", None, {})
        assert (image.seed, image.width, image.request_id) == (3 + index, DEFAULT_SIZE, REQUEST_ID)
    with pytest.raises(ValueError, match="URL"):
        images[0].save(tmp_path / "cube.png")


def test_stream_yields_previews_of_the_decoder(target, service):
    with fast_client(target) as client:
        events = list(client.generate_stream("a red cube", n=2, seed=9, preview_every=2))

    assert service.requests[0].preview_every == 2
    previews = [event for event in events if isinstance(event, Preview)]
    assert [(p.step, p.total_steps) for p in previews] == [(2, PREVIEW_STEPS), (4, PREVIEW_STEPS)]
    for preview in previews:
        assert len(preview.images) == 2
        np.testing.assert_array_equal(np.asarray(preview.images[0]), fake_pixels(preview.step, 4))
    # Previews come while the decoder runs: before its progress event; the images come last.
    assert [type(event).__name__ for event in events[2:5]] == ["Preview", "Preview", "StageProgress"]
    check_stream_events([event for event in events if not isinstance(event, Preview)])


def test_stream_sends_no_previews_unless_asked(target, service):
    with fast_client(target) as client:
        events = list(client.generate_stream("a red cube", n=2, seed=9))
    assert service.requests[0].preview_every == 0
    check_stream_events(events)


# --- Variations, edits, interpolations, text diffs ------------------------------------------------


def rgba_image() -> Image.Image:
    pixels = np.zeros((6, 6, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[..., 3] = 255
    pixels[2:4, 2:4, 3] = 0  # a transparent hole
    return Image.fromarray(pixels, mode="RGBA")


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_variations_send_a_pil_image_as_png_with_alpha(target, service):
    picture = rgba_image()
    with fast_client(target) as client:
        images = client.variations(picture, n=2, seed=5, decoder_steps=3)

    (sent,) = service.received
    uploaded = decode(sent.image)
    assert uploaded.format == "PNG" and uploaded.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(uploaded), np.asarray(picture))
    assert (sent.parameters.n, sent.parameters.seed, sent.parameters.decoder_steps) == (2, 5, 3)
    assert [name for name in OPTIONAL_FIELDS if sent.parameters.HasField(name)] == ["seed", "decoder_steps"]
    assert sent.parameters.prompt == "" and sent.parameters.size == 0
    assert sent.delivery.response_format == images_pb2.RESPONSE_FORMAT_PNG_BYTES
    check_images(images, "", [5, 6], DEFAULT_SIZE)
    assert {image.request_id for image in images} == {REQUEST_ID}


def test_variations_read_a_path_and_send_delivery(target, service, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"any bytes: the server decodes them")
    with fast_client(target) as client:
        (image,) = client.variations(path, response_format="url", idempotency_key="k1")
        client.variations(str(path))

    first, second = service.received
    assert first.image == second.image == path.read_bytes()
    assert first.delivery.response_format == images_pb2.RESPONSE_FORMAT_URL and first.delivery.idempotency_key == "k1"
    assert image.url and image.image is None and image.png == b""


def test_edit_sends_image_mask_and_prompt(target, service, tmp_path):
    mask_path = tmp_path / "mask.png"
    rgba_image().save(mask_path)
    with fast_client(target) as client:
        images = client.edit(b"image bytes", "a red cube on a table", mask=mask_path, n=2, seed=1, size=16, sampler="ddim")
        client.edit(rgba_image(), "a red cube")

    with_mask, without_mask = service.received
    assert with_mask.image == b"image bytes" and with_mask.mask == mask_path.read_bytes()
    parameters = with_mask.parameters
    assert (parameters.prompt, parameters.n, parameters.seed, parameters.size) == ("a red cube on a table", 2, 1, 16)
    assert parameters.sampler == sampling_pb2.SAMPLER_DDIM
    assert [name for name in OPTIONAL_FIELDS if parameters.HasField(name)] == ["seed"]
    check_images(images, "a red cube on a table", [1, 2], 16)
    assert without_mask.mask == b"" and decode(without_mask.image).mode == "RGBA"


def test_interpolate_prompts_returns_frames_and_a_gif(target, service, tmp_path):
    with fast_client(target) as client:
        animation = client.interpolate(prompts=("a red cube", "a blue ball"), frames=4, animated_gif=True, seed=8, prior_steps=2)

    (sent,) = service.received
    assert sent.WhichOneof("endpoints") == "prompts"
    assert (sent.prompts.first, sent.prompts.second) == ("a red cube", "a blue ball")
    assert (sent.frames, sent.animated_gif) == (4, True)
    assert [name for name in OPTIONAL_FIELDS if sent.parameters.HasField(name)] == ["seed", "prior_steps"]
    assert isinstance(animation, Animation) and animation.request_id == REQUEST_ID
    assert [frame.seed for frame in animation.frames] == [8] * 4
    assert animation.gif_url is None
    animation.save_gif(tmp_path / "a.gif")
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 4


def test_interpolate_images_sends_both_images(target, service, tmp_path):
    path = tmp_path / "first.png"
    path.write_bytes(b"first image")
    with fast_client(target) as client:
        animation = client.interpolate(images=(path, rgba_image()), response_format="url", animated_gif=True)

    (sent,) = service.received
    assert sent.WhichOneof("endpoints") == "images" and sent.frames == 5
    assert sent.images.first == b"first image" and decode(sent.images.second).mode == "RGBA"
    assert animation.gif is None and animation.gif_url == f"https://store.test/{REQUEST_ID}/animation.gif"
    assert all(frame.url and frame.image is None for frame in animation.frames)
    with pytest.raises(ValueError, match="URL"):
        animation.save_gif(tmp_path / "a.gif")


def test_text_diff_sends_captions_and_rotation(target, service):
    with fast_client(target) as client:
        animation = client.text_diff(b"cat", "a cat", "an angry cat", frames=3, seed=2, upsampler_steps=1)
        client.text_diff(b"cat", "a cat", "an angry cat", max_rotation=0.25)

    first, second = service.received
    assert (first.image, first.caption, first.target_caption, first.frames) == (b"cat", "a cat", "an angry cat", 3)
    assert not first.HasField("max_rotation") and not first.animated_gif
    assert [name for name in OPTIONAL_FIELDS if first.parameters.HasField(name)] == ["seed", "upsampler_steps"]
    assert second.max_rotation == 0.25 and second.frames == 5
    assert len(animation.frames) == 3 and animation.gif is None and animation.gif_url is None
    with pytest.raises(ValueError, match="animated_gif=True"):
        animation.save_gif("never-written.gif")


@pytest.mark.parametrize(
    ("call", "error", "field_name"),
    [
        (lambda c: c.variations(b"x", response_format="jpeg"), ValueError, "response_format"),
        (lambda c: c.variations(b"x", idempotency_key=""), ValueError, "idempotency_key"),
        (lambda c: c.variations(b"x", idempotency_key=7), TypeError, "idempotency_key"),
        (lambda c: c.variations(b"x", n=0), ValueError, "n"),
        (lambda c: c.variations(42), TypeError, "image"),
        (lambda c: c.variations(b""), ValueError, "image"),
        (lambda c: c.edit(b"x", "a cat", mask=3.5), TypeError, "mask"),
        (lambda c: c.edit(b"x", None), TypeError, "prompt"),
        (lambda c: c.interpolate(prompts=("a", "b"), frames=1), ValueError, "frames"),
        (lambda c: c.interpolate(), ValueError, "images, prompts"),
        (lambda c: c.interpolate(images=(b"a", b"b"), prompts=("a", "b")), ValueError, "images, prompts"),
        (lambda c: c.interpolate(prompts=("a", "b", "c")), ValueError, "prompts"),
        (lambda c: c.interpolate(prompts="ab"), ValueError, "prompts"),
        (lambda c: c.interpolate(prompts=("a", 2)), TypeError, "prompts"),
        (lambda c: c.text_diff(b"x", "a", "b", max_rotation=1.5), ValueError, "max_rotation"),
        (lambda c: c.text_diff(b"x", "a", None), TypeError, "target_caption"),
        (lambda c: c.text_diff(b"x", "a", "b", frames=0), ValueError, "frames"),
        (lambda c: c.generate_stream("a", preview_every=-1), ValueError, "preview_every"),
    ],
)
def test_arguments_of_the_new_calls_are_checked_before_any_call(target, service, call, error, field_name):
    with fast_client(target) as client, pytest.raises(error, match=field_name):
        call(client)
    assert service.received == []


def test_unreadable_path_raises_oserror(target, service, tmp_path):
    with fast_client(target) as client, pytest.raises(FileNotFoundError):
        client.variations(tmp_path / "missing.png")
    assert service.received == []


CALLS = {
    "CreateVariations": lambda c: c.variations(b"x"),
    "Edit": lambda c: c.edit(b"x", "a cat"),
    "Interpolate": lambda c: c.interpolate(prompts=("a", "b")),
    "TextDiff": lambda c: c.text_diff(b"x", "a", "b"),
}


@pytest.mark.parametrize("method", CALLS)
def test_new_calls_retry_unavailable_only(target, service, method):
    service.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    with fast_client(target, retries=3) as client:
        assert CALLS[method](client)
        assert len(service.received) == 3

        service.received.clear()
        service.failures = [grpc.StatusCode.INVALID_ARGUMENT]
        with pytest.raises(UnclipError) as caught:
            CALLS[method](client)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.attempts == 1
    assert method in str(caught.value)
    assert len(service.received) == 1


# --- AsyncClient: the new calls -------------------------------------------------------------------


def test_async_new_calls(target, service):
    async def main() -> tuple[list[GeneratedImage], list[GeneratedImage], Animation, Animation]:
        async with fast_async_client(target) as client:
            return (
                await client.variations(rgba_image(), n=2, seed=4),
                await client.edit(b"image", "a cat", mask=b"mask", response_format="url"),
                await client.interpolate(images=(b"a", b"b"), frames=3, animated_gif=True),
                await client.text_diff(b"cat", "a cat", "a dog", max_rotation=0.5, idempotency_key="td"),
            )

    variations, edits, interpolation, diff = asyncio.run(main())

    check_images(variations, "", [4, 5], DEFAULT_SIZE)
    assert edits[0].url and edits[0].image is None
    assert len(interpolation.frames) == 3 and interpolation.gif is not None
    assert len(diff.frames) == 5 and diff.request_id == REQUEST_ID
    sent_variation, sent_edit, sent_interpolation, sent_diff = service.received
    assert decode(sent_variation.image).mode == "RGBA"
    assert (sent_edit.mask, sent_edit.delivery.response_format) == (b"mask", images_pb2.RESPONSE_FORMAT_URL)
    assert (sent_interpolation.images.first, sent_interpolation.images.second) == (b"a", b"b")
    assert sent_diff.max_rotation == 0.5 and sent_diff.delivery.idempotency_key == "td"


@pytest.mark.parametrize("method", CALLS)
def test_async_new_calls_retry_unavailable_only(target, service, method):
    async def main() -> None:
        async with fast_async_client(target, retries=3) as client:
            service.failures = [grpc.StatusCode.UNAVAILABLE]
            await CALLS[method](client)
            assert len(service.received) == 2

            service.failures = [grpc.StatusCode.INVALID_ARGUMENT]
            with pytest.raises(UnclipError) as caught:
                await CALLS[method](client)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert len(service.received) == 3

    asyncio.run(main())


def test_async_stream_yields_previews(target, service):
    async def main() -> list:
        async with fast_async_client(target) as client:
            return [event async for event in client.generate_stream("a red cube", n=2, seed=9, preview_every=4)]

    events = asyncio.run(main())
    (preview,) = [event for event in events if isinstance(event, Preview)]
    assert (preview.step, preview.total_steps, len(preview.images)) == (4, PREVIEW_STEPS, 2)
    check_stream_events([event for event in events if not isinstance(event, Preview)])


# --- Import footprint -----------------------------------------------------------------------------


def test_sdk_imports_neither_torch_nor_server_modules():
    code = """
import sys
import unclip.client
client = unclip.client.Client("127.0.0.1:1")
client.close()
unclip.client.AsyncClient("127.0.0.1:1")
import unclip.tls  # the SDK's TLS options: documented for `credentials=`
unclip.client.Client("127.0.0.1:1", credentials=unclip.tls.channel_credentials()).close()
forbidden = ("torch", "unclip.stages", "unclip.serving", "unclip.local", "unclip.pipeline", "grpc_health.v1")
loaded = [name for name in sys.modules if any(name == f or name.startswith(f + ".") for f in forbidden)]
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
