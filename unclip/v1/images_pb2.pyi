from unclip.v1 import sampling_pb2 as _sampling_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_ENCODE: _ClassVar[Stage]
    STAGE_PRIOR: _ClassVar[Stage]
    STAGE_DECODE: _ClassVar[Stage]
    STAGE_UPSAMPLE: _ClassVar[Stage]
STAGE_UNSPECIFIED: Stage
STAGE_ENCODE: Stage
STAGE_PRIOR: Stage
STAGE_DECODE: Stage
STAGE_UPSAMPLE: Stage

class GenerationParameters(_message.Message):
    __slots__ = ("prompt", "n", "size", "seed", "prior_guidance_scale", "decoder_guidance_scale", "prior_steps", "decoder_steps", "upsampler_steps", "sampler", "prior_candidates")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRIOR_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DECODER_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODER_STEPS_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLER_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    PRIOR_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    n: int
    size: int
    seed: int
    prior_guidance_scale: float
    decoder_guidance_scale: float
    prior_steps: int
    decoder_steps: int
    upsampler_steps: int
    sampler: _sampling_pb2.Sampler
    prior_candidates: int
    def __init__(self, prompt: _Optional[str] = ..., n: _Optional[int] = ..., size: _Optional[int] = ..., seed: _Optional[int] = ..., prior_guidance_scale: _Optional[float] = ..., decoder_guidance_scale: _Optional[float] = ..., prior_steps: _Optional[int] = ..., decoder_steps: _Optional[int] = ..., upsampler_steps: _Optional[int] = ..., sampler: _Optional[_Union[_sampling_pb2.Sampler, str]] = ..., prior_candidates: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("parameters",)
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    parameters: GenerationParameters
    def __init__(self, parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("png", "seed", "width", "height")
    PNG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    seed: int
    width: int
    height: int
    def __init__(self, png: _Optional[bytes] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    def __init__(self, images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("parameters",)
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    parameters: GenerationParameters
    def __init__(self, parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ...) -> None: ...

class StageProgress(_message.Message):
    __slots__ = ("stage", "stage_index", "completed_stages", "total_stages", "stage_seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STAGES_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    stage_index: int
    completed_stages: int
    total_stages: int
    stage_seconds: float
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., stage_index: _Optional[int] = ..., completed_stages: _Optional[int] = ..., total_stages: _Optional[int] = ..., stage_seconds: _Optional[float] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: StageProgress
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[StageProgress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...
