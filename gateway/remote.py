"""The stage backend that calls the four stage services with protobuf tensors.

The request building and reply parsing are written once (`RemoteStages`); how a request reaches
a stage is a transport: gRPC channels to host:port addresses (`GrpcTransport`, the default), or
Ray Serve handles to the stage applications (`RayTransport`). Each hop gets the time left until
the request's deadline, so a slow stage cannot make the gateway overrun what its caller asked
for, and a stage's status code (INVALID_ARGUMENT, ...) reaches the gateway's caller unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

import grpc
import numpy as np
from google.protobuf.message import Message

from unclip import codec
from unclip.errors import (
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
    UnclipError,
    error_for_status,
)
from unclip.options import SamplingOptions
from unclip.pipeline import PipelineInfo, PreviewFn, TextEncoding
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    prior_pb2,
    prior_pb2_grpc,
    upsampler_pb2,
    upsampler_pb2_grpc,
)

INFO_TIMEOUT_SECONDS = 5.0
INFO_TTL_SECONDS = 30.0  # re-read what the stages serve now and then: they may be redeployed


class StageTransport(Protocol):
    """Delivers stage requests. Stages are named "encoder", "prior", "decoder", "upsampler0", ...;
    failures are raised as `UnclipError`s carrying the stage's status code."""

    async def unary(self, stage: str, method: str, request: Message, timeout: float | None) -> Message: ...

    def server_stream(self, stage: str, method: str, request: Message, timeout: float | None) -> AsyncIterator[Message]: ...

    async def close(self) -> None: ...


def stage_kind(stage: str) -> str:
    """"upsampler1" -> "upsampler"."""
    return re.sub(r"\d+$", "", stage)


class GrpcTransport:
    """gRPC stubs on one channel per stage; `targets` maps each stage to its host:port."""

    STUBS = {
        "encoder": encoder_pb2_grpc.ClipEncoderServiceStub,
        "prior": prior_pb2_grpc.PriorServiceStub,
        "decoder": decoder_pb2_grpc.DecoderServiceStub,
        "upsampler": upsampler_pb2_grpc.UpsamplerServiceStub,
    }

    def __init__(self, targets: Mapping[str, str]):
        self.addresses = dict(targets)
        self._channels = {stage: grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS) for stage, addr in targets.items()}
        self._stubs = {stage: self.STUBS[stage_kind(stage)](channel) for stage, channel in self._channels.items()}

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))

    def _error(self, stage: str, error: grpc.aio.AioRpcError) -> UnclipError:
        return error_for_status(error.code().name, f"{stage} service at {self.addresses[stage]}: {error.details()}")

    async def unary(self, stage: str, method: str, request: Message, timeout: float | None) -> Message:
        try:
            return await getattr(self._stubs[stage], method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._error(stage, error) from None

    async def server_stream(self, stage: str, method: str, request: Message, timeout: float | None) -> AsyncIterator[Message]:
        try:
            async for reply in getattr(self._stubs[stage], method)(request, timeout=timeout):
                yield reply
        except grpc.aio.AioRpcError as error:
            raise self._error(stage, error) from None


def error_from_ray(where: str, error: BaseException) -> UnclipError:
    """The unclip error for what a Ray Serve handle call raised, keeping a stage's status code."""
    from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

    if isinstance(error, RayTaskError):
        error = error.cause  # what the deployment raised; stage deployments raise UnclipErrors
    if isinstance(error, UnclipError):
        return error_for_status(error.status_name, f"{where}: {error}")
    if isinstance(error, TimeoutError):
        return DeadlineExceeded(f"{where}: the deadline passed")
    if isinstance(error, BackPressureError):
        return ResourceExhausted(f"{where}: {error.message}")
    if isinstance(error, TaskCancelledError):
        return Cancelled(f"{where}: cancelled")
    if isinstance(error, (DeploymentUnavailableError, RayActorError, RayServeException)):
        return Unavailable(f"{where}: {error}")
    return UnclipError(f"{where}: {type(error).__name__}: {error}")


class RayTransport:
    """Ray Serve handles to the stage applications; `targets` maps each stage to its app name.

    The stage deployments' methods are named like the RPCs and take the same request messages,
    plus `timeout_s`, the time this hop has (a handle carries no gRPC deadline).
    """

    def __init__(self, targets: Mapping[str, str]):
        self.apps = dict(targets)
        self._handles: dict[str, Any] = {}

    async def close(self) -> None:
        self._handles.clear()

    def _method(self, stage: str, method: str, *, stream: bool = False):
        from ray import serve

        # Looked up on first use: the stage apps may be deployed after the gateway.
        if stage not in self._handles:
            try:
                self._handles[stage] = serve.get_app_handle(self.apps[stage])
            except Exception as error:  # noqa: BLE001 - "no such application" and friends
                raise error_from_ray(self._where(stage), error) from None
        handle = self._handles[stage].options(stream=True) if stream else self._handles[stage]
        return getattr(handle, method)

    def _where(self, stage: str) -> str:
        return f"{stage} app {self.apps[stage]!r}"

    async def unary(self, stage: str, method: str, request: Message, timeout: float | None) -> Message:
        response = self._method(stage, method).remote(request, timeout_s=timeout)
        try:
            async with asyncio.timeout(timeout):
                return await response
        except asyncio.CancelledError:
            response.cancel()  # our caller went away: stop the stage's work too
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes a status
            response.cancel()
            raise error_from_ray(self._where(stage), error) from None

    async def server_stream(self, stage: str, method: str, request: Message, timeout: float | None) -> AsyncIterator[Message]:
        responses = self._method(stage, method, stream=True).remote(request, timeout_s=timeout)
        try:
            async with asyncio.timeout(timeout):
                async for reply in responses:
                    yield reply
        except asyncio.CancelledError:
            responses.cancel()
            raise
        except Exception as error:  # noqa: BLE001
            responses.cancel()
            raise error_from_ray(self._where(stage), error) from None


class RemoteStages:
    """The stages behind a transport. `encoder`, `prior`, `decoder` and `upsamplers` are what the
    transport calls them: host:port addresses for gRPC (the default), app names for Ray Serve."""

    def __init__(
        self, encoder: str, prior: str, decoder: str, upsamplers: Sequence[str], *,
        transport: Callable[[Mapping[str, str]], StageTransport] = GrpcTransport,
    ):
        targets = {"encoder": encoder, "prior": prior, "decoder": decoder}
        targets |= {f"upsampler{i}": target for i, target in enumerate(upsamplers)}
        self.transport = transport(targets)
        self.upsampler_count = len(upsamplers)
        self._info: PipelineInfo | None = None
        self._info_time = 0.0

    async def close(self) -> None:
        await self.transport.close()

    @staticmethod
    def _timeout(stage: str, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise DeadlineExceeded(f"the deadline passed before the {stage} stage was called")
        return timeout

    async def _call(self, stage: str, method: str, request: Message, deadline: float | None) -> Any:
        return await self.transport.unary(stage, method, request, self._timeout(stage, deadline))

    async def describe(self) -> PipelineInfo:
        if self._info is not None and time.monotonic() - self._info_time < INFO_TTL_SECONDS:
            return self._info
        deadline = time.monotonic() + INFO_TIMEOUT_SECONDS
        replies = await asyncio.gather(
            self._call("encoder", "GetEncoderInfo", encoder_pb2.GetEncoderInfoRequest(), deadline),
            self._call("prior", "GetPriorInfo", prior_pb2.GetPriorInfoRequest(), deadline),
            self._call("decoder", "GetDecoderInfo", decoder_pb2.GetDecoderInfoRequest(), deadline),
            *(
                self._call(f"upsampler{i}", "GetUpsamplerInfo", upsampler_pb2.GetUpsamplerInfoRequest(), deadline)
                for i in range(self.upsampler_count)
            ),
        )
        encoder, prior, decoder, *ups = (reply.info for reply in replies)
        versions = {"clip": encoder.version, "prior": prior.version, "decoder": decoder.version}
        versions |= {f"upsampler{i}": up.version for i, up in enumerate(ups)}
        self._info = PipelineInfo(decoder.image_size, [up.scale_factor for up in ups], versions)
        self._info_time = time.monotonic()
        return self._info

    async def encode_text(self, texts: list[str], *, deadline: float | None) -> TextEncoding:
        reply = await self._call("encoder", "EncodeText", encoder_pb2.EncodeTextRequest(texts=texts), deadline)
        return TextEncoding(
            codec.to_numpy(reply.text_embeddings, "text_embeddings"),
            codec.to_numpy(reply.text_encodings, "text_encodings"),
            codec.to_numpy(reply.text_mask, "text_mask"),
        )

    async def sample_prior(
        self, text: TextEncoding, seeds: list[int], *, num_candidates: int, guidance_scale: float | None,
        sampling: SamplingOptions, deadline: float | None,
    ) -> np.ndarray:
        request = prior_pb2.SampleRequest(
            text_embeddings=codec.from_numpy(text.embeddings), text_encodings=codec.from_numpy(text.encodings),
            text_mask=codec.from_numpy(text.mask), seeds=seeds, num_candidates=num_candidates,
            sampling=sampling.to_proto(),
        )
        if guidance_scale is not None:
            request.guidance_scale = guidance_scale
        reply = await self._call("prior", "Sample", request, deadline)
        return codec.to_numpy(reply.image_embeddings, "image_embeddings")

    async def encode_image(self, images: np.ndarray, *, deadline: float | None) -> np.ndarray:
        request = encoder_pb2.EncodeImageRequest(images=codec.from_numpy(images))
        reply = await self._call("encoder", "EncodeImage", request, deadline)
        return codec.to_numpy(reply.image_embeddings, "image_embeddings")

    async def decode(
        self, image_embeddings: np.ndarray, text: TextEncoding | None, seeds: list[int], *,
        guidance_scale: float | None, text_guidance_scale: float | None = None, sampling: SamplingOptions,
        deadline: float | None, inpaint: tuple[np.ndarray, np.ndarray] | None = None, preview_every: int = 0,
        on_preview: PreviewFn | None = None,
    ) -> np.ndarray:
        request = decoder_pb2.DecodeRequest(
            image_embeddings=codec.from_numpy(image_embeddings), seeds=seeds, sampling=sampling.to_proto()
        )
        if text is not None:
            request.text_encodings.CopyFrom(codec.from_numpy(text.encodings))
            request.text_mask.CopyFrom(codec.from_numpy(text.mask))
        if guidance_scale is not None:
            request.guidance_scale = guidance_scale
        if text_guidance_scale is not None:
            request.text_guidance_scale = text_guidance_scale
        _set_inpaint(request, inpaint)
        if on_preview is None or preview_every <= 0:
            reply = await self._call("decoder", "Decode", request, deadline)
            return codec.to_numpy(reply.images, "images")
        stream = decoder_pb2.DecodeStreamRequest(request=request, preview_every=preview_every)
        events = self.transport.server_stream("decoder", "DecodeStream", stream, self._timeout("decoder", deadline))
        async with contextlib.aclosing(events):  # ends the call as soon as the images are here
            async for event in events:
                if event.HasField("preview"):
                    on_preview(event.preview.step, event.preview.total_steps, codec.to_numpy(event.preview.images, "preview"))
                else:
                    return codec.to_numpy(event.result.images, "images")
        raise Unavailable("decoder: the stream ended without images")

    async def upsample(
        self, index: int, images: np.ndarray, seeds: list[int], *, sampling: SamplingOptions, deadline: float | None,
        inpaint: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        request = upsampler_pb2.UpsampleRequest(images=codec.from_numpy(images), seeds=seeds, sampling=sampling.to_proto())
        _set_inpaint(request, inpaint)
        reply = await self._call(f"upsampler{index}", "Upsample", request, deadline)
        return codec.to_numpy(reply.images, "images")


def _set_inpaint(request, inpaint: tuple[np.ndarray, np.ndarray] | None) -> None:
    if inpaint is not None:
        request.inpaint_images.CopyFrom(codec.from_numpy(inpaint[0]))
        request.inpaint_mask.CopyFrom(codec.from_numpy(inpaint[1]))
