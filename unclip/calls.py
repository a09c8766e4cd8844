"""What a stage is asked to do: one call class per stage RPC, the same object in every mode.

The pipeline builds calls. The in-process backend runs them on the engines; the gRPC backend
sends them as requests (`to_proto`); a stage service turns a request back into the call
(`from_proto`), runs it and answers with `reply`; Ray Serve merges concurrent calls row-wise.
A call's fields are its request message's fields, converted by the shared codec, so a setting
added to a request and to its call travels through every mode without more code.

Torch-free: engines are passed in, never imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar, cast

import numpy as np
from google.protobuf.message import Message

from unclip import codec
from unclip.errors import InvalidArgument
from unclip.options import SamplingOptions
from unclip.stage import Stage
from unclip.v1 import decoder_pb2, encoder_pb2, model_info_pb2, prior_pb2, upsampler_pb2

R = TypeVar("R")


@dataclass
class TextEncoding:
    """The encoder's answer for a batch of texts."""

    embeddings: np.ndarray  # [B, D] float32, unit norm
    encodings: np.ndarray  # [B, L, W] float32
    mask: np.ndarray  # [B, L] bool

    def repeat(self, n: int) -> TextEncoding:
        return TextEncoding(*(np.repeat(a, n, axis=0) for a in (self.embeddings, self.encodings, self.mask)))


@dataclass
class ModelInfo:
    """What a stage serves (`unclip.v1.ModelInfo`): the gateway plans requests with it."""

    kind: str
    version: str
    embed_dim: int = 0
    image_size: int = 0  # decoder: the side of its images
    scale_factor: int = 0  # upsampler: output side / input side
    max_steps: int = 0  # diffusion stages: the upper bound for steps
    compute_batch: int = 1  # rows per network evaluation; images depend on it
    default_steps: int = 0  # diffusion stages: the steps of a call that gives none


class StageCall(Generic[R]):
    """Base of the calls: the stage and RPC a call belongs to, and its conversions.

    Subclasses are dataclasses whose fields are the request's; `run` calls the engine.
    """

    STAGE: ClassVar[Stage]
    METHOD: ClassVar[str]  # the RPC
    REQUEST: ClassVar[type[Message]]
    RESPONSE: ClassVar[type[Message]]
    RESULT: ClassVar[str]  # the response field holding the result array
    QUEUED: ClassVar[bool] = True  # runs on the model thread (False: answered at once)

    @classmethod
    def from_proto(cls, request: Message) -> Any:
        return codec.from_message(cast(Any, cls), request)

    def to_proto(self) -> Message:
        return codec.to_message(self, self.REQUEST())

    def reply(self, result: R) -> Message:
        return self.RESPONSE(**{self.RESULT: codec.from_numpy(result)})  # type: ignore[arg-type]

    def result(self, reply: Any) -> R:
        return codec.to_numpy(getattr(reply, self.RESULT), self.RESULT)  # type: ignore[return-value]

    def run(self, engine: Any, cancel: Any = None, progress: Any = None) -> R:
        """The call's result from `engine`, alone."""
        raise NotImplementedError


@dataclass
class EncodeTextCall(StageCall[TextEncoding]):
    texts: list[str]

    STAGE = Stage.ENCODER
    METHOD = "EncodeText"
    REQUEST = encoder_pb2.EncodeTextRequest
    RESPONSE = encoder_pb2.EncodeTextResponse

    def run(self, engine: Any, cancel: Any = None, progress: Any = None) -> TextEncoding:
        return engine.encode_text(self.texts)

    def reply(self, result: TextEncoding) -> Message:
        return encoder_pb2.EncodeTextResponse(
            text_embeddings=codec.from_numpy(result.embeddings),
            text_encodings=codec.from_numpy(result.encodings),
            text_mask=codec.from_numpy(result.mask),
        )

    def result(self, reply: Any) -> TextEncoding:
        return TextEncoding(
            codec.to_numpy(reply.text_embeddings, "text_embeddings"),
            codec.to_numpy(reply.text_encodings, "text_encodings"),
            codec.to_numpy(reply.text_mask, "text_mask"),
        )


@dataclass
class EncodeImageCall(StageCall[np.ndarray]):
    images: np.ndarray

    STAGE = Stage.ENCODER
    METHOD = "EncodeImage"
    REQUEST = encoder_pb2.EncodeImageRequest
    RESPONSE = encoder_pb2.EncodeImageResponse
    RESULT = "image_embeddings"

    def run(self, engine: Any, cancel: Any = None, progress: Any = None) -> np.ndarray:
        return engine.encode_image(self.images)


@dataclass(kw_only=True)
class _RowsCall(StageCall[np.ndarray]):
    """A diffusion stage's call: one seed per row, and how to sample. The engine turns it into
    a job of a sampling run (`DiffusionEngine.job`), which may share its network calls."""

    seeds: list[int]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    def run(self, engine: Any, cancel: Any = None, progress: Any = None) -> np.ndarray:
        return engine.run_one(engine.job(self, cancel, progress))


@dataclass(kw_only=True)
class _InpaintingCall(_RowsCall):
    """A call that answers images, whose rows may keep part of an image: pixels where
    inpaint_mask is false."""

    inpaint_images: np.ndarray | None = None
    inpaint_mask: np.ndarray | None = None
    # Answer float32 images in [-1, 1], unrounded (for the next upsampler), instead of uint8.
    float_images: bool = False

    @property
    def inpaint(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.inpaint_images is None and self.inpaint_mask is None:
            return None
        if self.inpaint_images is None or self.inpaint_mask is None:
            raise InvalidArgument("inpaint_images and inpaint_mask must be given together")
        return self.inpaint_images, self.inpaint_mask


@dataclass
class SampleCall(_RowsCall):
    text_embeddings: np.ndarray
    text_encodings: np.ndarray
    text_mask: np.ndarray
    num_candidates: int = 1
    guidance_scale: float | None = None

    STAGE = Stage.PRIOR
    METHOD = "Sample"
    REQUEST = prior_pb2.SampleRequest
    RESPONSE = prior_pb2.SampleResponse
    RESULT = "image_embeddings"


@dataclass
class DecodeCall(_InpaintingCall):
    image_embeddings: np.ndarray
    text_encodings: np.ndarray | None = None
    text_mask: np.ndarray | None = None
    text_embeddings: np.ndarray | None = None
    guidance_scale: float | None = None
    text_guidance_scale: float | None = None

    STAGE = Stage.DECODER
    METHOD = "Decode"
    REQUEST = decoder_pb2.DecodeRequest
    RESPONSE = decoder_pb2.DecodeResponse
    RESULT = "images"


@dataclass
class UpsampleCall(_InpaintingCall):
    images: np.ndarray

    STAGE = Stage.UPSAMPLER
    METHOD = "Upsample"
    REQUEST = upsampler_pb2.UpsampleRequest
    RESPONSE = upsampler_pb2.UpsampleResponse
    RESULT = "images"


# -- the stage services' RPC names, derived from the stage ----------------------------------

# The gRPC service of each stage; its generated code follows from the name.
SERVICE_NAMES = {
    Stage.ENCODER: "ClipEncoderService",
    Stage.PRIOR: "PriorService",
    Stage.DECODER: "DecoderService",
    Stage.UPSAMPLER: "UpsamplerService",
}


def service_full_name(stage: Stage) -> str:
    return f"unclip.v1.{SERVICE_NAMES[stage]}"


def grpc_module(stage: Stage) -> ModuleType:
    """The generated `*_pb2_grpc` module of the stage's service (stub, servicer base, registration)."""
    return importlib.import_module(f"unclip.v1.{stage.value}_pb2_grpc")


def info_call(stage: Stage) -> type[StageCall[ModelInfo]]:
    """The call class for the stage's Get*Info RPC."""
    return _INFO_CALLS[stage]


def _make_info_call(stage: Stage) -> type[StageCall[ModelInfo]]:
    module = importlib.import_module(f"unclip.v1.{stage.value}_pb2")
    name = stage.value.capitalize()

    @dataclass
    class InfoCall(StageCall[ModelInfo]):
        STAGE = stage
        METHOD = f"Get{name}Info"
        REQUEST = getattr(module, f"Get{name}InfoRequest")
        RESPONSE = getattr(module, f"Get{name}InfoResponse")
        QUEUED = False

        def run(self, engine: Any, cancel: Any = None, progress: Any = None) -> ModelInfo:
            return engine.info()

        def reply(self, result: ModelInfo) -> Message:
            return self.RESPONSE(info=codec.to_message(result, model_info_pb2.ModelInfo()))

        def result(self, reply: Any) -> ModelInfo:
            return codec.from_message(ModelInfo, reply.info)

    InfoCall.__name__ = InfoCall.__qualname__ = f"{name}InfoCall"
    return InfoCall


_INFO_CALLS = {stage: _make_info_call(stage) for stage in Stage}
