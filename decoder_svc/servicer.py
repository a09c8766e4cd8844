"""gRPC DecoderService (embedding to small image) and UpsamplerService (low-res to high-res)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from unclip import codec
from unclip.calls import DecodeCall, UpsampleCall, info_call
from unclip.pipeline import preview_due
from unclip.serving import ServiceSpec, StageServicer, call_rpc, events_until_done, streaming_rpc
from unclip.stage import Stage
from unclip.stages.tensors import unit_to_images
from unclip.v1 import decoder_pb2, decoder_pb2_grpc, upsampler_pb2_grpc


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer, StageServicer):
    STAGE = Stage.DECODER

    GetDecoderInfo = call_rpc(info_call(Stage.DECODER))
    Decode = call_rpc(DecodeCall)

    @streaming_rpc
    async def DecodeStream(self, request: decoder_pb2.DecodeStreamRequest, context: Any) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        previews: asyncio.Queue = asyncio.Queue()
        every = request.preview_every

        def on_step(step: int, total: int, x0: Any) -> None:  # on the model thread
            done = step + 1
            if preview_due(done, total, every):
                loop.call_soon_threadsafe(previews.put_nowait, (done, total, unit_to_images(x0)))

        call = DecodeCall.from_proto(request.request)
        task = asyncio.ensure_future(self.answer(call, context, on_step))
        try:
            async for done, total, images in events_until_done(previews, task):
                preview = decoder_pb2.DecodePreview(step=done, total_steps=total, images=codec.from_numpy(images))
                yield decoder_pb2.DecodeStreamResponse(preview=preview)
            yield decoder_pb2.DecodeStreamResponse(result=call.reply(await task))
        finally:
            task.cancel()


class UpsamplerServicer(upsampler_pb2_grpc.UpsamplerServiceServicer, StageServicer):
    STAGE = Stage.UPSAMPLER

    GetUpsamplerInfo = call_rpc(info_call(Stage.UPSAMPLER))
    Upsample = call_rpc(UpsampleCall)


DECODER_SERVICES = [ServiceSpec.of_stage(Stage.DECODER)]
UPSAMPLER_SERVICES = [ServiceSpec.of_stage(Stage.UPSAMPLER)]
