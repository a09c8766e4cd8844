"""gRPC ClipEncoderService: texts and images to CLIP embeddings."""

from __future__ import annotations

from unclip import codec
from unclip.serving import ModelServicer, ServiceSpec, rpc
from unclip.v1 import encoder_pb2, encoder_pb2_grpc, model_info_pb2


class ClipEncoderServicer(encoder_pb2_grpc.ClipEncoderServiceServicer, ModelServicer):
    STAGE_KIND = "clip"

    @rpc
    async def GetEncoderInfo(self, request, context):
        engine = self.require_engine()
        info = model_info_pb2.ModelInfo(kind="clip", version=engine.version, embed_dim=engine.embed_dim)
        return encoder_pb2.GetEncoderInfoResponse(info=info)

    @rpc
    async def EncodeText(self, request, context):
        texts = list(request.texts)
        encoding = await self.run(context, lambda cancel: self.engine.encode_text(texts))
        return encoder_pb2.EncodeTextResponse(
            text_embeddings=codec.from_numpy(encoding.embeddings),
            text_encodings=codec.from_numpy(encoding.encodings),
            text_mask=codec.from_numpy(encoding.mask),
        )

    @rpc
    async def EncodeImage(self, request, context):
        images = codec.to_numpy(request.images, "images")
        embeddings = await self.run(context, lambda cancel: self.engine.encode_image(images))
        return encoder_pb2.EncodeImageResponse(image_embeddings=codec.from_numpy(embeddings))


SERVICES = [ServiceSpec(encoder_pb2_grpc.add_ClipEncoderServiceServicer_to_server, "unclip.v1.ClipEncoderService")]
