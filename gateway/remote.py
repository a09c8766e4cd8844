"""The stage backend that calls the four stage services over gRPC with protobuf tensors.

Each hop gets the time left until the request's deadline, so a slow stage cannot make the
gateway overrun what its caller asked for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
import numpy as np

from unclip import codec
from unclip.errors import DeadlineExceeded, Unavailable, error_for_status
from unclip.options import SamplingOptions
from unclip.pipeline import PipelineInfo, PreviewFn, TextEncoding
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    prior_pb2,
    prior_pb2_grpc,
    upsampler_pb2,
    upsampler_pb2_grpc,
)

INFO_TIMEOUT_SECONDS = 5.0
INFO_TTL_SECONDS = 30.0  # re-read what the stages serve now and then: they may be redeployed


class RemoteStages:
    def __init__(self, encoder: str, prior: str, decoder: str, upsamplers: Sequence[str]):
        self.addresses = {"encoder": encoder, "prior": prior, "decoder": decoder}
        self.addresses |= {f"upsampler{i}": address for i, address in enumerate(upsamplers)}
        self._channels = {name: grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS) for name, addr in self.addresses.items()}
        self.encoder = encoder_pb2_grpc.ClipEncoderServiceStub(self._channels["encoder"])
        self.prior = prior_pb2_grpc.PriorServiceStub(self._channels["prior"])
        self.decoder = decoder_pb2_grpc.DecoderServiceStub(self._channels["decoder"])
        self.upsamplers = [
            upsampler_pb2_grpc.UpsamplerServiceStub(self._channels[f"upsampler{i}"]) for i in range(len(upsamplers))
        ]
        self._info: PipelineInfo | None = None
        self._info_time = 0.0

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))

    @staticmethod
    def _timeout(stage: str, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise DeadlineExceeded(f"the deadline passed before the {stage} stage was called")
        return timeout

    def _error(self, stage: str, error: grpc.aio.AioRpcError):
        return error_for_status(error.code().name, f"{stage} service at {self.addresses[stage]}: {error.details()}")

    async def _call(self, stage: str, method, request, deadline: float | None):
        timeout = self._timeout(stage, deadline)
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._error(stage, error) from None

    async def describe(self) -> PipelineInfo:
        if self._info is not None and time.monotonic() - self._info_time < INFO_TTL_SECONDS:
            return self._info
        deadline = time.monotonic() + INFO_TIMEOUT_SECONDS
        replies = await asyncio.gather(
            self._call("encoder", self.encoder.GetEncoderInfo, encoder_pb2.GetEncoderInfoRequest(), deadline),
            self._call("prior", self.prior.GetPriorInfo, prior_pb2.GetPriorInfoRequest(), deadline),
            self._call("decoder", self.decoder.GetDecoderInfo, decoder_pb2.GetDecoderInfoRequest(), deadline),
            *(
                self._call(f"upsampler{i}", stub.GetUpsamplerInfo, upsampler_pb2.GetUpsamplerInfoRequest(), deadline)
                for i, stub in enumerate(self.upsamplers)
            ),
        )
        encoder, prior, decoder, *ups = (reply.info for reply in replies)
        versions = {"clip": encoder.version, "prior": prior.version, "decoder": decoder.version}
        versions |= {f"upsampler{i}": up.version for i, up in enumerate(ups)}
        self._info = PipelineInfo(decoder.image_size, [up.scale_factor for up in ups], versions)
        self._info_time = time.monotonic()
        return self._info

    async def encode_text(self, texts: list[str], *, deadline: float | None) -> TextEncoding:
        reply = await self._call("encoder", self.encoder.EncodeText, encoder_pb2.EncodeTextRequest(texts=texts), deadline)
        return TextEncoding(
            codec.to_numpy(reply.text_embeddings, "text_embeddings"),
            codec.to_numpy(reply.text_encodings, "text_encodings"),
            codec.to_numpy(reply.text_mask, "text_mask"),
        )

    async def sample_prior(
        self, text: TextEncoding, seeds: list[int], *, num_candidates: int, guidance_scale: float | None,
        sampling: SamplingOptions, deadline: float | None,
    ) -> np.ndarray:
        request = prior_pb2.SampleRequest(
            text_embeddings=codec.from_numpy(text.embeddings), text_encodings=codec.from_numpy(text.encodings),
            text_mask=codec.from_numpy(text.mask), seeds=seeds, num_candidates=num_candidates,
            sampling=sampling.to_proto(),
        )
        if guidance_scale is not None:
            request.guidance_scale = guidance_scale
        reply = await self._call("prior", self.prior.Sample, request, deadline)
        return codec.to_numpy(reply.image_embeddings, "image_embeddings")

    async def encode_image(self, images: np.ndarray, *, deadline: float | None) -> np.ndarray:
        request = encoder_pb2.EncodeImageRequest(images=codec.from_numpy(images))
        reply = await self._call("encoder", self.encoder.EncodeImage, request, deadline)
        return codec.to_numpy(reply.image_embeddings, "image_embeddings")

    async def decode(
        self, image_embeddings: np.ndarray, text: TextEncoding | None, seeds: list[int], *,
        guidance_scale: float | None, sampling: SamplingOptions, deadline: float | None,
        inpaint: tuple[np.ndarray, np.ndarray] | None = None, preview_every: int = 0, on_preview: PreviewFn | None = None,
    ) -> np.ndarray:
        request = decoder_pb2.DecodeRequest(
            image_embeddings=codec.from_numpy(image_embeddings), seeds=seeds, sampling=sampling.to_proto()
        )
        if text is not None:
            request.text_encodings.CopyFrom(codec.from_numpy(text.encodings))
            request.text_mask.CopyFrom(codec.from_numpy(text.mask))
        if guidance_scale is not None:
            request.guidance_scale = guidance_scale
        _set_inpaint(request, inpaint)
        if on_preview is None or preview_every <= 0:
            reply = await self._call("decoder", self.decoder.Decode, request, deadline)
            return codec.to_numpy(reply.images, "images")
        return await self._decode_streaming(decoder_pb2.DecodeStreamRequest(request=request, preview_every=preview_every), deadline, on_preview)

    async def _decode_streaming(self, request, deadline: float | None, on_preview: PreviewFn) -> np.ndarray:
        timeout = self._timeout("decoder", deadline)
        try:
            async for event in self.decoder.DecodeStream(request, timeout=timeout):
                if event.HasField("preview"):
                    on_preview(event.preview.step, event.preview.total_steps, codec.to_numpy(event.preview.images, "preview"))
                else:
                    return codec.to_numpy(event.result.images, "images")
        except grpc.aio.AioRpcError as error:
            raise self._error("decoder", error) from None
        raise Unavailable(f"decoder service at {self.addresses['decoder']}: the stream ended without images")

    async def upsample(
        self, index: int, images: np.ndarray, seeds: list[int], *, sampling: SamplingOptions, deadline: float | None,
        inpaint: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        request = upsampler_pb2.UpsampleRequest(images=codec.from_numpy(images), seeds=seeds, sampling=sampling.to_proto())
        _set_inpaint(request, inpaint)
        reply = await self._call(f"upsampler{index}", self.upsamplers[index].Upsample, request, deadline)
        return codec.to_numpy(reply.images, "images")


def _set_inpaint(request, inpaint: tuple[np.ndarray, np.ndarray] | None) -> None:
    if inpaint is not None:
        request.inpaint_images.CopyFrom(codec.from_numpy(inpaint[0]))
        request.inpaint_mask.CopyFrom(codec.from_numpy(inpaint[1]))
