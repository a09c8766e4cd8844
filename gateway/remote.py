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
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import grpc
from google.protobuf.message import Message
from opentelemetry.trace import SpanKind

from unclip import codec, observe, tracing
from unclip.calls import SERVICE_NAMES, DecodeCall, StageCall, grpc_module, info_call
from unclip.errors import (
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
    UnclipError,
    error_for_status,
)
from unclip.pipeline import PipelineInfo, PreviewFn
from unclip.stage import Stage
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import decoder_pb2

R = TypeVar("R")
Metadata = Sequence[tuple[str, str]]  # what a hop forwards: request id, trace context
INFO_TIMEOUT_SECONDS = 5.0
INFO_TTL_SECONDS = 30.0  # re-read what the stages serve now and then: they may be redeployed


class StageTransport(Protocol):
    """Delivers stage requests. Stages are named by instance ("encoder", ..., "upsampler0");
    failures are raised as `UnclipError`s carrying the stage's status code."""

    async def unary(self, stage: str, method: str, request: Message, timeout: float | None, metadata: Metadata) -> Message: ...

    def server_stream(
        self, stage: str, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> AsyncIterator[Message]: ...

    async def close(self) -> None: ...


def _stub(name: str, channel: grpc.aio.Channel) -> Any:
    stage = Stage.from_instance(name)
    return getattr(grpc_module(stage), f"{SERVICE_NAMES[stage]}Stub")(channel)


class GrpcTransport:
    """gRPC stubs on one channel per stage; `targets` maps each stage to its host:port."""

    def __init__(self, targets: Mapping[str, str]):
        self.addresses = dict(targets)
        self._channels = {stage: grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS) for stage, addr in targets.items()}
        self._stubs = {stage: _stub(stage, channel) for stage, channel in self._channels.items()}

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))

    def _error(self, stage: str, error: grpc.aio.AioRpcError) -> UnclipError:
        return error_for_status(error.code().name, f"{stage} service at {self.addresses[stage]}: {error.details()}")

    async def unary(self, stage: str, method: str, request: Message, timeout: float | None, metadata: Metadata) -> Message:
        try:
            return await getattr(self._stubs[stage], method)(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            raise self._error(stage, error) from None

    async def server_stream(
        self, stage: str, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> AsyncIterator[Message]:
        try:
            async for reply in getattr(self._stubs[stage], method)(request, timeout=timeout, metadata=metadata):
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

    async def unary(self, stage: str, method: str, request: Message, timeout: float | None, metadata: Metadata) -> Message:
        response = self._method(stage, method).remote(request, timeout_s=timeout, metadata=dict(metadata))
        try:
            async with asyncio.timeout(timeout):
                return await response
        except asyncio.CancelledError:
            response.cancel()  # our caller went away: stop the stage's work too
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes a status
            response.cancel()
            raise error_from_ray(self._where(stage), error) from None

    async def server_stream(
        self, stage: str, method: str, request: Message, timeout: float | None, metadata: Metadata
    ) -> AsyncIterator[Message]:
        responses = self._method(stage, method, stream=True).remote(request, timeout_s=timeout, metadata=dict(metadata))
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


def _hop_span(stage: str, method: str) -> contextlib.AbstractContextManager[Any]:
    """The client span of one call to a stage; the headers forwarded inside it name it as the
    stage's parent."""
    return tracing.span(f"{stage}/{method}", SpanKind.CLIENT, rpc__system="grpc", rpc__method=method, unclip__stage=stage)


class RemoteStages:
    """The stages behind a transport. `encoder`, `prior`, `decoder` and `upsamplers` are what the
    transport calls them: host:port addresses for gRPC (the default), app names for Ray Serve."""

    def __init__(
        self,
        encoder: str,
        prior: str,
        decoder: str,
        upsamplers: Sequence[str],
        *,
        transport: Callable[[Mapping[str, str]], StageTransport] = GrpcTransport,
    ):
        targets = {Stage.ENCODER.instance(): encoder, Stage.PRIOR.instance(): prior, Stage.DECODER.instance(): decoder}
        targets |= {Stage.UPSAMPLER.instance(i): target for i, target in enumerate(upsamplers)}
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

    async def describe(self) -> PipelineInfo:
        if self._info is not None and time.monotonic() - self._info_time < INFO_TTL_SECONDS:
            return self._info
        deadline = time.monotonic() + INFO_TIMEOUT_SECONDS
        stages = [(Stage.ENCODER, 0), (Stage.PRIOR, 0), (Stage.DECODER, 0)]
        stages += [(Stage.UPSAMPLER, i) for i in range(self.upsampler_count)]
        infos = await asyncio.gather(*(self.run(info_call(stage)(), index=i, deadline=deadline) for stage, i in stages))
        encoder, prior, decoder, *upsamplers = infos
        self._info = PipelineInfo.from_models(encoder, prior, decoder, upsamplers)
        self._info_time = time.monotonic()
        return self._info

    async def run(
        self,
        call: StageCall[R],
        *,
        index: int = 0,
        deadline: float | None,
        on_preview: PreviewFn | None = None,
        preview_every: int = 0,
    ) -> R:
        name = call.STAGE.instance(index)
        if isinstance(call, DecodeCall) and on_preview is not None and preview_every > 0:
            return await self._decode_stream(call, on_preview, preview_every, deadline)
        with _hop_span(name, call.METHOD):
            reply = await self.transport.unary(
                name, call.METHOD, call.to_proto(), self._timeout(name, deadline), observe.forwarded()
            )
        return call.result(reply)

    async def _decode_stream(self, call: DecodeCall, on_preview: PreviewFn, preview_every: int, deadline: float | None) -> Any:
        name = Stage.DECODER.instance()
        stream = decoder_pb2.DecodeStreamRequest(
            request=cast(decoder_pb2.DecodeRequest, call.to_proto()), preview_every=preview_every
        )
        with _hop_span(name, "DecodeStream"):
            timeout = self._timeout(name, deadline)
            events: Any = self.transport.server_stream(name, "DecodeStream", stream, timeout, observe.forwarded())
            async with contextlib.aclosing(events):  # ends the call as soon as the images are here
                async for event in events:
                    if event.HasField("preview"):
                        on_preview(event.preview.step, event.preview.total_steps, codec.to_numpy(event.preview.images, "preview"))
                    else:
                        return call.result(event.result)
        raise Unavailable("decoder: the stream ended without images")
