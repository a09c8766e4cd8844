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
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
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
log = logging.getLogger("unclip.gateway")
Metadata = Sequence[tuple[str, str]]  # what a hop forwards: request id, trace context
INFO_TIMEOUT_SECONDS = 5.0
HEALTH_TIMEOUT_SECONDS = 2.0
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


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
    return grpc.aio.secure_channel(address, credentials, options=GRPC_OPTIONS)


class GrpcTransport:
    """gRPC stubs on one channel per stage; `targets` maps each stage to its host:port. With
    `credentials` (`unclip.tls.TlsFiles.channel_credentials`: the gateway's client certificate
    and the stages' CA) every channel is TLS, as stages serving mutual TLS require."""

    def __init__(self, targets: Mapping[str, str], credentials: grpc.ChannelCredentials | None = None):
        self.addresses = dict(targets)
        self._channels = {stage: _channel(addr, credentials) for stage, addr in targets.items()}
        self._stubs = {stage: _stub(stage, channel) for stage, channel in self._channels.items()}

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))

    async def unreachable(self) -> list[str]:
        """The stages whose health check does not answer SERVING within HEALTH_TIMEOUT_SECONDS."""

        async def serving(channel: grpc.aio.Channel) -> bool:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_SECONDS
                )
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        answers = await asyncio.gather(*(serving(channel) for channel in self._channels.values()))
        return [stage for stage, ok in zip(self._channels, answers, strict=True) if not ok]

    def _error(self, stage: str, error: grpc.aio.AioRpcError) -> UnclipError:
        return stage_error(stage, error.code().name, error.details() or "", f"at {self.addresses[stage]}")

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


# Codes whose details a stage wrote about the request itself (which field, which limit): they
# reach the caller. Other codes' details come from the transport (addresses, connection errors)
# or from a failure inside the stage: the caller gets a plain sentence, the log the details.
_CALLER_FACING = frozenset(
    {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED"}
)
_PLAIN = {
    "UNAVAILABLE": "is unavailable; retry shortly",
    "DEADLINE_EXCEEDED": "did not answer before the deadline",
    "CANCELLED": "call was cancelled",
}


def stage_error(stage: str, status_name: str, details: str, where: str = "") -> UnclipError:
    """The error a stage's failed call becomes at the gateway, with the stage's status code;
    details that could name hosts, ports or internals are logged (under the request id), not
    answered."""
    if status_name in _CALLER_FACING:
        return error_for_status(status_name, f"{stage} service: {details}")
    log.warning("%s service %s failed with %s: %s", stage, where, status_name, details)
    return error_for_status(status_name, f"{stage} service {_PLAIN.get(status_name, f'failed ({status_name})')}")


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

    async def unreachable(self) -> list[str]:
        """The stages that do not answer their health check ([] for transports that leave
        health to their platform, as Ray Serve does)."""
        check = getattr(self.transport, "unreachable", None)
        return [] if check is None else await check()

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
