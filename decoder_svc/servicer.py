"""gRPC DecoderService (embedding to small image) and UpsamplerService (low-res to high-res)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from unclip import codec
from unclip.errors import InvalidArgument
from unclip.options import SamplingOptions
from unclip.pipeline import preview_due
from unclip.serving import ModelServicer, ServiceSpec, events_until_done, rpc, streaming_rpc
from unclip.stages.base import unit_to_images
from unclip.v1 import decoder_pb2, decoder_pb2_grpc, model_info_pb2, upsampler_pb2, upsampler_pb2_grpc


def inpaint_from_proto(request) -> tuple[np.ndarray, np.ndarray] | None:
    """The (images, regenerate mask) pair of a Decode or Upsample request, if it has one."""
    if request.HasField("inpaint_images") != request.HasField("inpaint_mask"):
        raise InvalidArgument("inpaint_images and inpaint_mask must be given together")
    if not request.HasField("inpaint_images"):
        return None
    return codec.to_numpy(request.inpaint_images, "inpaint_images"), codec.to_numpy(request.inpaint_mask, "inpaint_mask")


@dataclass
class DecodeCall:
    """A parsed DecodeRequest: the engine call it stands for (the Ray layer batches these)."""

    image_embeddings: np.ndarray
    seeds: list[int]
    text_encodings: np.ndarray | None
    text_mask: np.ndarray | None
    guidance_scale: float | None
    text_guidance_scale: float | None
    sampling: SamplingOptions
    inpaint: tuple[np.ndarray, np.ndarray] | None

    @classmethod
    def from_proto(cls, request: decoder_pb2.DecodeRequest) -> DecodeCall:
        return cls(
            codec.to_numpy(request.image_embeddings, "image_embeddings"),
            list(request.seeds),
            codec.to_numpy(request.text_encodings, "text_encodings") if request.HasField("text_encodings") else None,
            codec.to_numpy(request.text_mask, "text_mask") if request.HasField("text_mask") else None,
            request.guidance_scale if request.HasField("guidance_scale") else None,
            request.text_guidance_scale if request.HasField("text_guidance_scale") else None,
            SamplingOptions.from_proto(request.sampling),
            inpaint_from_proto(request),
        )

    def run(self, engine, cancel, progress=None) -> np.ndarray:
        return engine.decode(
            self.image_embeddings, self.seeds, text_encodings=self.text_encodings, text_mask=self.text_mask,
            guidance_scale=self.guidance_scale, text_guidance_scale=self.text_guidance_scale, sampling=self.sampling,
            inpaint=self.inpaint, cancel=cancel, progress=progress,
        )


@dataclass
class UpsampleCall:
    """A parsed UpsampleRequest: the engine call it stands for (the Ray layer batches these)."""

    images: np.ndarray
    seeds: list[int]
    sampling: SamplingOptions
    inpaint: tuple[np.ndarray, np.ndarray] | None

    @classmethod
    def from_proto(cls, request: upsampler_pb2.UpsampleRequest) -> UpsampleCall:
        return cls(
            codec.to_numpy(request.images, "images"), list(request.seeds), SamplingOptions.from_proto(request.sampling),
            inpaint_from_proto(request),
        )

    def run(self, engine, cancel) -> np.ndarray:
        return engine.upsample(self.images, self.seeds, sampling=self.sampling, inpaint=self.inpaint, cancel=cancel)


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer, ModelServicer):
    STAGE_KIND = "decoder"

    @rpc
    async def GetDecoderInfo(self, request, context):
        engine = self.require_engine()
        info = model_info_pb2.ModelInfo(
            kind="decoder", version=engine.version, embed_dim=engine.config.model.image_embed_dim,
            image_size=engine.image_size, max_steps=engine.config.diffusion.timesteps,
        )
        return decoder_pb2.GetDecoderInfoResponse(info=info)

    @rpc
    async def Decode(self, request, context):
        call = DecodeCall.from_proto(request)
        images = await self.run(context, lambda cancel: call.run(self.engine, cancel))
        return decoder_pb2.DecodeResponse(images=codec.from_numpy(images))

    @streaming_rpc
    async def DecodeStream(self, request, context):
        loop = asyncio.get_running_loop()
        previews: asyncio.Queue = asyncio.Queue()
        every = request.preview_every

        def on_step(step: int, total: int, x0) -> None:  # on the model thread
            done = step + 1
            if preview_due(done, total, every):
                loop.call_soon_threadsafe(previews.put_nowait, (done, total, unit_to_images(x0)))

        call = DecodeCall.from_proto(request.request)
        task = asyncio.ensure_future(self.run(context, lambda cancel: call.run(self.engine, cancel, on_step)))
        try:
            async for done, total, images in events_until_done(previews, task):
                preview = decoder_pb2.DecodePreview(step=done, total_steps=total, images=codec.from_numpy(images))
                yield decoder_pb2.DecodeStreamResponse(preview=preview)
            images = await task
            yield decoder_pb2.DecodeStreamResponse(result=decoder_pb2.DecodeResponse(images=codec.from_numpy(images)))
        finally:
            task.cancel()


class UpsamplerServicer(upsampler_pb2_grpc.UpsamplerServiceServicer, ModelServicer):
    STAGE_KIND = "upsampler"

    @rpc
    async def GetUpsamplerInfo(self, request, context):
        engine = self.require_engine()
        info = model_info_pb2.ModelInfo(
            kind="upsampler", version=engine.version, scale_factor=engine.scale_factor,
            max_steps=engine.config.diffusion.timesteps,
        )
        return upsampler_pb2.GetUpsamplerInfoResponse(info=info)

    @rpc
    async def Upsample(self, request, context):
        call = UpsampleCall.from_proto(request)
        upsampled = await self.run(context, lambda cancel: call.run(self.engine, cancel))
        return upsampler_pb2.UpsampleResponse(images=codec.from_numpy(upsampled))


DECODER_SERVICES = [ServiceSpec(decoder_pb2_grpc.add_DecoderServiceServicer_to_server, "unclip.v1.DecoderService")]
UPSAMPLER_SERVICES = [ServiceSpec(upsampler_pb2_grpc.add_UpsamplerServiceServicer_to_server, "unclip.v1.UpsamplerService")]
