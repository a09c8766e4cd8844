"""gRPC DecoderService (embedding to small image) and UpsamplerService (low-res to high-res)."""

from __future__ import annotations

from unclip import codec
from unclip.options import SamplingOptions
from unclip.serving import ModelServicer, ServiceSpec, rpc
from unclip.v1 import decoder_pb2, decoder_pb2_grpc, model_info_pb2, upsampler_pb2, upsampler_pb2_grpc


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
        embeddings = codec.to_numpy(request.image_embeddings, "image_embeddings")
        has_text = request.HasField("text_encodings")
        text_encodings = codec.to_numpy(request.text_encodings, "text_encodings") if has_text else None
        text_mask = codec.to_numpy(request.text_mask, "text_mask") if request.HasField("text_mask") else None
        seeds = list(request.seeds)
        guidance = request.guidance_scale if request.HasField("guidance_scale") else None
        sampling = SamplingOptions.from_proto(request.sampling)
        images = await self.run(
            context,
            lambda cancel: self.engine.decode(
                embeddings, seeds, text_encodings=text_encodings, text_mask=text_mask,
                guidance_scale=guidance, sampling=sampling, cancel=cancel,
            ),
        )
        return decoder_pb2.DecodeResponse(images=codec.from_numpy(images))


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
        upsampled = await self.run(
            context, lambda cancel: self.engine.upsample(images, seeds, sampling=sampling, cancel=cancel)
        )
        return upsampler_pb2.UpsampleResponse(images=codec.from_numpy(upsampled))


DECODER_SERVICES = [ServiceSpec(decoder_pb2_grpc.add_DecoderServiceServicer_to_server, "unclip.v1.DecoderService")]
UPSAMPLER_SERVICES = [ServiceSpec(upsampler_pb2_grpc.add_UpsamplerServiceServicer_to_server, "unclip.v1.UpsamplerService")]
