"""gRPC ClipEncoderService: texts and images to CLIP embeddings."""

from __future__ import annotations

from unclip.calls import EncodeImageCall, EncodeTextCall, info_call
from unclip.serving import ServiceSpec, StageServicer, call_rpc
from unclip.stage import Stage
from unclip.v1 import encoder_pb2_grpc


class ClipEncoderServicer(encoder_pb2_grpc.ClipEncoderServiceServicer, StageServicer):
    STAGE = Stage.ENCODER

    GetEncoderInfo = call_rpc(info_call(Stage.ENCODER))
    EncodeText = call_rpc(EncodeTextCall)
    EncodeImage = call_rpc(EncodeImageCall)


SERVICES = [ServiceSpec.of_stage(Stage.ENCODER)]
