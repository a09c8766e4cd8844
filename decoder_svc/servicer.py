"""gRPC DecoderService (embedding to small image) and UpsamplerService (low-res to high-res)."""

from __future__ import annotations

import asyncio

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

    @staticmethod
    def _decode_call(request: decoder_pb2.DecodeRequest, progress=None):
        """Parse a DecodeRequest into the engine call `call(cancel)` the model thread runs."""
        embeddings = codec.to_numpy(request.image_embeddings, "image_embeddings")
        text_encodings = codec.to_numpy(request.text_encodings, "text_encodings") if request.HasField("text_encodings") else None
        text_mask = codec.to_numpy(request.text_mask, "text_mask") if request.HasField("text_mask") else None
        seeds = list(request.seeds)
        guidance = request.guidance_scale if request.HasField("guidance_scale") else None
        sampling = SamplingOptions.from_proto(request.sampling)
        inpaint = inpaint_from_proto(request)

        def call(engine, cancel):
            return engine.decode(
                embeddings, seeds, text_encodings=text_encodings, text_mask=text_mask, guidance_scale=guidance,
                sampling=sampling, inpaint=inpaint, cancel=cancel, progress=progress,
            )

        return call

    @rpc
    async def Decode(self, request, context):
        call = self._decode_call(request)
        images = await self.run(context, lambda cancel: call(self.engine, cancel))
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

        call = self._decode_call(request.request, progress=on_step)
        task = asyncio.ensure_future(self.run(context, lambda cancel: call(self.engine, cancel)))
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
        images = codec.to_numpy(request.images, "images")
        seeds = list(request.seeds)
        sampling = SamplingOptions.from_proto(request.sampling)
        inpaint = inpaint_from_proto(request)
        upsampled = await self.run(
            context, lambda cancel: self.engine.upsample(images, seeds, sampling=sampling, inpaint=inpaint, cancel=cancel)
        )
        return upsampler_pb2.UpsampleResponse(images=codec.from_numpy(upsampled))


DECODER_SERVICES = [ServiceSpec(decoder_pb2_grpc.add_DecoderServiceServicer_to_server, "unclip.v1.DecoderService")]
UPSAMPLER_SERVICES = [ServiceSpec(upsampler_pb2_grpc.add_UpsamplerServiceServicer_to_server, "unclip.v1.UpsamplerService")]
