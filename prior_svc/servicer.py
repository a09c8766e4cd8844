"""gRPC PriorService: CLIP text embeddings to CLIP image embeddings."""

from __future__ import annotations

from unclip import codec
from unclip.options import SamplingOptions
from unclip.serving import ModelServicer, ServiceSpec, rpc
from unclip.v1 import model_info_pb2, prior_pb2, prior_pb2_grpc


class PriorServicer(prior_pb2_grpc.PriorServiceServicer, ModelServicer):
    STAGE_KIND = "prior"

    @rpc
    async def GetPriorInfo(self, request, context):
        engine = self.require_engine()
        info = model_info_pb2.ModelInfo(
            kind="prior", version=engine.version, embed_dim=engine.config.model.embed_dim,
            max_steps=engine.config.diffusion.timesteps,
        )
        return prior_pb2.GetPriorInfoResponse(info=info)

    @rpc
    async def Sample(self, request, context):
        text_embeddings = codec.to_numpy(request.text_embeddings, "text_embeddings")
        text_encodings = codec.to_numpy(request.text_encodings, "text_encodings")
        text_mask = codec.to_numpy(request.text_mask, "text_mask")
        seeds = list(request.seeds)
        candidates = request.num_candidates if request.HasField("num_candidates") else 1
        guidance = request.guidance_scale if request.HasField("guidance_scale") else None
        sampling = SamplingOptions.from_proto(request.sampling)
        embeddings = await self.run(
            context,
            lambda cancel: self.engine.sample(
                text_embeddings, text_encodings, text_mask, seeds, num_candidates=candidates,
                guidance_scale=guidance, sampling=sampling, cancel=cancel,
            ),
        )
        return prior_pb2.SampleResponse(image_embeddings=codec.from_numpy(embeddings))


SERVICES = [ServiceSpec(prior_pb2_grpc.add_PriorServiceServicer_to_server, "unclip.v1.PriorService")]
