"""gRPC ImageService: the gateway's public API, a thin layer over `gateway.api.ImageAPI`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from gateway.api import ImageAPI, RequestOptions, Result
from gateway.streaming import PendingPreview, StreamEvents, preview_message
from unclip import codec
from unclip.errors import InvalidArgument, UnclipError
from unclip.limits import time_remaining
from unclip.parameters import GenerationParameters
from unclip.pipeline import StageEvent
from unclip.serving import ServiceSpec, events_until_done, rpc, streaming_rpc
from unclip.v1 import images_pb2, images_pb2_grpc

log = logging.getLogger("unclip.gateway")
STAGE_RETRY_SECONDS = 1.0
STAGE_WATCH_SECONDS = 2.0  # how often the gateway checks its stages' health


def parameters_from_proto(message: images_pb2.GenerationParameters) -> GenerationParameters:
    return codec.from_message(GenerationParameters, message)


def response_from_result(result: Result, delivery: images_pb2.Delivery) -> images_pb2.GenerateResponse:
    as_url = delivery.response_format == images_pb2.RESPONSE_FORMAT_URL
    return images_pb2.GenerateResponse(
        request_id=result.request_id,
        images=[
            images_pb2.GeneratedImage(
                png=b"" if as_url else image.png,
                url=image.url or "",
                seed=image.seed,
                width=image.width,
                height=image.height,
            )
            for image in result.images
        ],
        gif=b"" if as_url or result.gif is None else result.gif,
        gif_url=result.gif_url or "",
    )


def request_options(request: Any, context: Any, **callbacks: Any) -> RequestOptions:
    """How a request is served: its Delivery, and the deadline of its call."""
    remaining = time_remaining(context)  # the caller's, or the server's default deadline
    return RequestOptions(
        want_url=request.delivery.response_format == images_pb2.RESPONSE_FORMAT_URL,
        idempotency_key=request.delivery.idempotency_key or None,
        deadline=None if remaining is None else time.monotonic() + remaining,
        **callbacks,
    )


def progress_from_event(event: StageEvent) -> images_pb2.StageProgress:
    return images_pb2.StageProgress(
        stage=cast(images_pb2.Stage, images_pb2.Stage.Value(f"STAGE_{event.stage.event.upper()}")),
        stage_index=event.index,
        completed_stages=event.completed,
        total_stages=event.total,
        stage_seconds=event.seconds,
    )


class ImageServicer(images_pb2_grpc.ImageServiceServicer):
    def __init__(self, api: ImageAPI):
        self.api = api

    def authorize(self, method: str, headers: Mapping[str, str]) -> None:
        """Every RPC's caller, checked before its body runs (`unclip.serving.rpc`): with API keys
        on, `authorization: Bearer <key>` or UNAUTHENTICATED (`gateway.auth`). Health checks and
        reflection are other services, open to all."""
        self.api.access.authenticate(headers)

    async def load(self) -> None:
        """Ready once every stage answers; until then health says NOT_SERVING."""
        while True:
            try:
                info = await self.api.backend.describe()
            except UnclipError as error:
                log.info("waiting for the stage services: %s", error)
                await asyncio.sleep(STAGE_RETRY_SECONDS)
                continue
            log.info("stages ready: sizes %s, models %s", info.output_sizes(), info.model_versions)
            return

    async def watch(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        """Keep the gateway's health in step with the stages': NOT_SERVING while a stage it needs
        does not answer its health check, SERVING once all do again (load balancers and
        Kubernetes then send requests elsewhere instead of failing them)."""
        check = getattr(self.api.backend, "unreachable", None)
        if check is None:  # a backend without services of its own (in-process stages)
            return
        serving = True
        while True:
            await asyncio.sleep(STAGE_WATCH_SECONDS)
            down = await check()
            if bool(down) == serving:
                serving = not down
                if down:
                    log.warning("not serving: unreachable stage(s) %s", ", ".join(down))
                else:
                    log.info("serving again: every stage answers")
                await set_serving(serving)

    async def close(self) -> None:
        for resource in (self.api.backend, self.api.store):
            close = getattr(resource, "close", None)
            if close is not None:
                await close()

    @rpc
    async def Generate(self, request, context):
        result = await self.api.generate(parameters_from_proto(request.parameters), request_options(request, context))
        return response_from_result(result, request.delivery)

    @streaming_rpc
    async def GenerateStream(self, request, context):
        # Bounded however slowly the client reads: a waiting preview is replaced by a newer one.
        events = StreamEvents()

        def on_preview(step: int, total: int, images) -> None:
            events.put_preview(PendingPreview(step, total, images))

        def on_stage(event: StageEvent) -> None:
            events.put(images_pb2.GenerateStreamResponse(progress=progress_from_event(event)))

        options = request_options(request, context, on_stage=on_stage, on_preview=on_preview)
        task = asyncio.ensure_future(self.api.generate(parameters_from_proto(request.parameters), options))
        try:
            async for event in events_until_done(events, task):
                yield await preview_message(event) if isinstance(event, PendingPreview) else event
            yield images_pb2.GenerateStreamResponse(result=response_from_result(await task, request.delivery))
        finally:
            task.cancel()  # the client went away: stop the chain (and, through gRPC, the stages)

    @rpc
    async def CreateVariations(self, request, context):
        params = parameters_from_proto(request.parameters)
        result = await self.api.variations(request.image, params, request_options(request, context))
        return images_pb2.CreateVariationsResponse(result=response_from_result(result, request.delivery))

    @rpc
    async def Interpolate(self, request, context):
        endpoints = request.WhichOneof("endpoints")
        if endpoints is None:
            raise InvalidArgument("endpoints: give two images or two prompts")
        pair = getattr(request, endpoints)
        ends: dict[str, Any] = {endpoints: (pair.first, pair.second)}
        result = await self.api.interpolate(
            parameters_from_proto(request.parameters), request.frames, animated_gif=request.animated_gif,
            options=request_options(request, context), **ends,
        )  # fmt: skip
        return images_pb2.InterpolateResponse(result=response_from_result(result, request.delivery))

    @rpc
    async def TextDiff(self, request, context):
        result = await self.api.text_diff(
            request.image, request.caption, request.target_caption, parameters_from_proto(request.parameters),
            request.frames, max_rotation=request.max_rotation if request.HasField("max_rotation") else 0.5,
            animated_gif=request.animated_gif, options=request_options(request, context),
        )  # fmt: skip
        return images_pb2.TextDiffResponse(result=response_from_result(result, request.delivery))

    @rpc
    async def Edit(self, request, context):
        params = parameters_from_proto(request.parameters)
        result = await self.api.edit(request.image, request.mask or None, params, request_options(request, context))
        return images_pb2.EditResponse(result=response_from_result(result, request.delivery))


SERVICES = [ServiceSpec(images_pb2_grpc.add_ImageServiceServicer_to_server, "unclip.v1.ImageService")]
