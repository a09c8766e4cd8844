"""gRPC PriorService: CLIP text embeddings to CLIP image embeddings."""

from __future__ import annotations

from unclip.calls import SampleCall, info_call
from unclip.serving import ServiceSpec, StageServicer, call_rpc
from unclip.stage import Stage
from unclip.v1 import prior_pb2_grpc


class PriorServicer(prior_pb2_grpc.PriorServiceServicer, StageServicer):
    STAGE = Stage.PRIOR

    GetPriorInfo = call_rpc(info_call(Stage.PRIOR))
    Sample = call_rpc(SampleCall)


SERVICES = [ServiceSpec.of_stage(Stage.PRIOR)]
