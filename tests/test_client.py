"""Tests for the client SDK against a real gRPC server on 127.0.0.1 that fakes image generation."""

from __future__ import annotations

import asyncio
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
from PIL import Image

from unclip.client import AsyncClient, Client, GeneratedImage, StageProgress, UnclipError
from unclip.png import encode_png
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import images_pb2, images_pb2_grpc, sampling_pb2

OPTIONAL_FIELDS = (
    "seed",
    "prior_guidance_scale",
    "decoder_guidance_scale",
    "prior_steps",
    "decoder_steps",
    "upsampler_steps",
    "prior_candidates",
)
STAGES = [(images_pb2.STAGE_ENCODE, 0), (images_pb2.STAGE_PRIOR, 0), (images_pb2.STAGE_DECODE, 0), (images_pb2.STAGE_UPSAMPLE, 0)]
MODELS = {"clip": "clip-test", "prior": "prior-test", "decoder": "decoder-test"}
DEFAULT_SEED = 1234
DEFAULT_SIZE = 8


def fake_pixels(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def fake_images(parameters: images_pb2.GenerationParameters) -> images_pb2.GenerateResponse:
    """What the gateway would answer, with noise for pixels and the same PNG text chunks."""
    first_seed = parameters.seed if parameters.HasField("seed") else DEFAULT_SEED
    size = parameters.size or DEFAULT_SIZE
    images = []
    for seed in range(first_seed, first_seed + (parameters.n or 1)):
        text = {
            "prompt": parameters.prompt,
            "seed": str(seed),
            "parameters": {"size": size, "prior_steps": parameters.prior_steps or None},
            "models": MODELS,
            "Software": "unclip test",
        }
        png = encode_png(fake_pixels(seed, size), text)
        images.append(images_pb2.GeneratedImage(png=png, seed=seed, width=size, height=size))
    return images_pb2.GenerateResponse(images=images)


@dataclass
class FakeImageService(images_pb2_grpc.ImageServiceServicer):
    """ImageService that fails as told, then answers with fake images; records what it received."""

    failures: list[grpc.StatusCode] = field(default_factory=list)  # answered in order, one per call
    always: grpc.StatusCode | None = None
    delay: float = 0.0  # seconds each call takes before answering
    fail_after_first_event: bool = False
    requests: list[images_pb2.GenerationParameters] = field(default_factory=list)

    def _start(self, parameters: images_pb2.GenerationParameters, context: grpc.ServicerContext) -> None:
        self.requests.append(parameters)
        time.sleep(self.delay)
        code = self.failures.pop(0) if self.failures else self.always
        if code is not None:
            context.abort(code, f"fake failure {code.name}")

    def Generate(self, request, context):
        self._start(request.parameters, context)
        return fake_images(request.parameters)

    def GenerateStream(self, request, context):
        self._start(request.parameters, context)
        for completed, (stage, index) in enumerate(STAGES, start=1):
            progress = images_pb2.StageProgress(
                stage=stage, stage_index=index, completed_stages=completed, total_stages=len(STAGES), stage_seconds=0.25
            )
            yield images_pb2.GenerateStreamResponse(progress=progress)
            if self.fail_after_first_event:
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake failure mid-stream")
        yield images_pb2.GenerateStreamResponse(result=fake_images(request.parameters))


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
    assert sent.prompt == "a red cube" and sent.n == 1
    assert sent.size == 0 and sent.sampler == sampling_pb2.SAMPLER_UNSPECIFIED
    assert [name for name in OPTIONAL_FIELDS if sent.HasField(name)] == []


def test_parameters_given_arrive(target, service):
    with fast_client(target) as client:
        client.generate(
            "a red cube", n=3, size=16, seed=0, prior_guidance_scale=4.0, decoder_guidance_scale=0.0, prior_steps=5,
            decoder_steps=6, upsampler_steps=7, sampler="ddpm", prior_candidates=2,
        )

    (sent,) = service.requests
    # Zeros included: "given" means set, even where the value equals proto3's default.
    assert all(sent.HasField(name) for name in OPTIONAL_FIELDS)
    assert (sent.n, sent.size, sent.seed) == (3, 16, 0)
    assert (sent.prior_guidance_scale, sent.decoder_guidance_scale) == (4.0, 0.0)
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
    with fast_client(target, retries=3) as client:
        with pytest.raises(UnclipError) as caught:
            client.generate("a red cube")

    assert len(service.requests) == 1
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details == "fake failure INVALID_ARGUMENT"
    assert error.target == target and error.attempts == 1
    assert target in str(error) and "INVALID_ARGUMENT" in str(error)


def test_retries_are_limited_by_count(target, service):
    service.always = grpc.StatusCode.UNAVAILABLE
    with fast_client(target, retries=2) as client:
        with pytest.raises(UnclipError) as caught:
            client.generate("a red cube")

    assert len(service.requests) == 3
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.attempts == 3
    assert "after 3 attempts" in str(caught.value)


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
    with fast_client(target, retries=1) as client:
        with pytest.raises(UnclipError) as caught:
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
    with fast_client(target) as client:
        with pytest.raises(UnclipError) as caught:
            for event in client.generate_stream("a red cube"):
                events.append(event)

    assert events == [StageProgress("encode", 0, 1, 4, 0.25)]
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(service.requests) == 1


# --- AsyncClient ----------------------------------------------------------------------------------


def test_async_generate(target, service, tmp_path):
    async def main() -> list[GeneratedImage]:
        async with fast_async_client(target) as client:
            return await client.generate("a red cube", n=2, seed=42, size=16, sampler="ddim")

    images = asyncio.run(main())

    check_images(images, "a red cube", [42, 43], 16)
    (sent,) = service.requests
    assert sent.sampler == sampling_pb2.SAMPLER_DDIM
    assert [name for name in OPTIONAL_FIELDS if sent.HasField(name)] == ["seed"]
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
            assert time.monotonic() - started < 0.8
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE

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


# --- Import footprint -----------------------------------------------------------------------------


def test_sdk_imports_neither_torch_nor_server_modules():
    code = """
import sys
import unclip.client
client = unclip.client.Client("127.0.0.1:1")
client.close()
unclip.client.AsyncClient("127.0.0.1:1")
forbidden = ("torch", "unclip.stages", "unclip.serving", "unclip.local", "unclip.pipeline", "grpc_health.v1")
loaded = [name for name in sys.modules if any(name == f or name.startswith(f + ".") for f in forbidden)]
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
