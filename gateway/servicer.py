"""gRPC ImageService: prompt in, PNG images out, through the four stage services."""

from __future__ import annotations

import asyncio
import logging
import time

from unclip.errors import UnclipError
from unclip.options import sampler_from_proto
from unclip.pipeline import GeneratedImage, GenerationParameters, StageBackend, StageEvent, generate
from unclip.serving import ServiceSpec, rpc, streaming_rpc
from unclip.v1 import images_pb2, images_pb2_grpc

log = logging.getLogger("unclip.gateway")
STAGE_ENUM = {
    "encode": images_pb2.STAGE_ENCODE,
    "prior": images_pb2.STAGE_PRIOR,
    "decode": images_pb2.STAGE_DECODE,
    "upsample": images_pb2.STAGE_UPSAMPLE,
}
STAGE_RETRY_SECONDS = 1.0


def parameters_from_proto(message: images_pb2.GenerationParameters) -> GenerationParameters:
    def optional(name: str):
        return getattr(message, name) if message.HasField(name) else None

    return GenerationParameters(
        prompt=message.prompt,
        n=message.n or 1,
        size=message.size or None,
        seed=optional("seed"),
        prior_guidance_scale=optional("prior_guidance_scale"),
        decoder_guidance_scale=optional("decoder_guidance_scale"),
        prior_steps=optional("prior_steps"),
        decoder_steps=optional("decoder_steps"),
        upsampler_steps=optional("upsampler_steps"),
        sampler=sampler_from_proto(message.sampler),
        prior_candidates=optional("prior_candidates") or 1,
    )


def response_from_images(images: list[GeneratedImage]) -> images_pb2.GenerateResponse:
    return images_pb2.GenerateResponse(
        images=[
            images_pb2.GeneratedImage(png=image.png, seed=image.seed, width=image.width, height=image.height)
            for image in images
        ]
    )


def progress_from_event(event: StageEvent) -> images_pb2.StageProgress:
    return images_pb2.StageProgress(
        stage=STAGE_ENUM[event.stage], stage_index=event.index, completed_stages=event.completed,
        total_stages=event.total, stage_seconds=event.seconds,
    )


class ImageServicer(images_pb2_grpc.ImageServiceServicer):
    def __init__(self, backend: StageBackend):
        self.backend = backend

    async def load(self) -> None:
        """Ready once every stage answers; until then health says NOT_SERVING."""
        while True:
            try:
                info = await self.backend.describe()
            except UnclipError as error:
                log.info("waiting for the stage services: %s", error)
                await asyncio.sleep(STAGE_RETRY_SECONDS)
                continue
            log.info("stages ready: sizes %s, models %s", info.output_sizes(), info.model_versions)
            return

    async def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            await close()

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    @rpc
    async def Generate(self, request, context):
        params = parameters_from_proto(request.parameters)
        images = await generate(self.backend, params, deadline=self._deadline(context))
        return response_from_images(images)

    @streaming_rpc
    async def GenerateStream(self, request, context):
        params = parameters_from_proto(request.parameters)
        events: asyncio.Queue[StageEvent] = asyncio.Queue()
        task = asyncio.create_task(
            generate(self.backend, params, deadline=self._deadline(context), on_stage=events.put_nowait)
        )
        try:
            while not task.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield images_pb2.GenerateStreamResponse(progress=progress_from_event(getter.result()))
                else:
                    getter.cancel()
            yield images_pb2.GenerateStreamResponse(result=response_from_images(task.result()))
        finally:
            task.cancel()  # the client went away: stop the chain (and, through gRPC, the stages)


SERVICES = [ServiceSpec(images_pb2_grpc.add_ImageServiceServicer_to_server, "unclip.v1.ImageService")]
