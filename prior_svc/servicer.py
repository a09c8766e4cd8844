"""gRPC PriorService: CLIP text embeddings to CLIP image embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unclip import codec
from unclip.options import SamplingOptions
from unclip.serving import ModelServicer, ServiceSpec, rpc
from unclip.v1 import model_info_pb2, prior_pb2, prior_pb2_grpc


@dataclass
class SampleCall:
    """A parsed SampleRequest: the engine call it stands for (the Ray layer batches these)."""

    text_embeddings: np.ndarray
    text_encodings: np.ndarray
    text_mask: np.ndarray
    seeds: list[int]
    num_candidates: int
    guidance_scale: float | None
    sampling: SamplingOptions

    @classmethod
    def from_proto(cls, request: prior_pb2.SampleRequest) -> SampleCall:
        return cls(
            codec.to_numpy(request.text_embeddings, "text_embeddings"),
            codec.to_numpy(request.text_encodings, "text_encodings"),
            codec.to_numpy(request.text_mask, "text_mask"),
            list(request.seeds),
            request.num_candidates if request.HasField("num_candidates") else 1,
            request.guidance_scale if request.HasField("guidance_scale") else None,
            SamplingOptions.from_proto(request.sampling),
        )

    def run(self, engine, cancel) -> np.ndarray:
        return engine.sample(
            self.text_embeddings, self.text_encodings, self.text_mask, self.seeds, num_candidates=self.num_candidates,
            guidance_scale=self.guidance_scale, sampling=self.sampling, cancel=cancel,
        )


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
        call = SampleCall.from_proto(request)
        embeddings = await self.run(context, lambda cancel: call.run(self.engine, cancel))
        return prior_pb2.SampleResponse(image_embeddings=codec.from_numpy(embeddings))


SERVICES = [ServiceSpec(prior_pb2_grpc.add_PriorServiceServicer_to_server, "unclip.v1.PriorService")]
