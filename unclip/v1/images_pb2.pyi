from unclip.v1 import sampling_pb2 as _sampling_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResponseFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESPONSE_FORMAT_UNSPECIFIED: _ClassVar[ResponseFormat]
    RESPONSE_FORMAT_PNG_BYTES: _ClassVar[ResponseFormat]
    RESPONSE_FORMAT_URL: _ClassVar[ResponseFormat]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_ENCODE: _ClassVar[Stage]
    STAGE_PRIOR: _ClassVar[Stage]
    STAGE_DECODE: _ClassVar[Stage]
    STAGE_UPSAMPLE: _ClassVar[Stage]
RESPONSE_FORMAT_UNSPECIFIED: ResponseFormat
RESPONSE_FORMAT_PNG_BYTES: ResponseFormat
RESPONSE_FORMAT_URL: ResponseFormat
STAGE_UNSPECIFIED: Stage
STAGE_ENCODE: Stage
STAGE_PRIOR: Stage
STAGE_DECODE: Stage
STAGE_UPSAMPLE: Stage

class Delivery(_message.Message):
    __slots__ = ("response_format", "idempotency_key")
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    response_format: ResponseFormat
    idempotency_key: str
    def __init__(self, response_format: _Optional[_Union[ResponseFormat, str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GenerationParameters(_message.Message):
    __slots__ = ("prompt", "n", "size", "seed", "prior_guidance_scale", "decoder_guidance_scale", "decoder_text_guidance_scale", "prior_steps", "decoder_steps", "upsampler_steps", "sampler", "prior_candidates", "preview_every")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRIOR_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DECODER_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DECODER_TEXT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODER_STEPS_FIELD_NUMBER: _ClassVar[int]
    UPSAMPLER_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    PRIOR_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    n: int
    size: int
    seed: int
    prior_guidance_scale: float
    decoder_guidance_scale: float
    decoder_text_guidance_scale: float
    prior_steps: int
    decoder_steps: int
    upsampler_steps: int
    sampler: _sampling_pb2.Sampler
    prior_candidates: int
    preview_every: int
    def __init__(self, prompt: _Optional[str] = ..., n: _Optional[int] = ..., size: _Optional[int] = ..., seed: _Optional[int] = ..., prior_guidance_scale: _Optional[float] = ..., decoder_guidance_scale: _Optional[float] = ..., decoder_text_guidance_scale: _Optional[float] = ..., prior_steps: _Optional[int] = ..., decoder_steps: _Optional[int] = ..., upsampler_steps: _Optional[int] = ..., sampler: _Optional[_Union[_sampling_pb2.Sampler, str]] = ..., prior_candidates: _Optional[int] = ..., preview_every: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("parameters", "delivery")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    parameters: GenerationParameters
    delivery: Delivery
    def __init__(self, parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ..., delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("png", "seed", "width", "height", "url")
    PNG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    seed: int
    width: int
    height: int
    url: str
    def __init__(self, png: _Optional[bytes] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., url: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "request_id", "gif", "gif_url")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GIF_FIELD_NUMBER: _ClassVar[int]
    GIF_URL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    request_id: str
    gif: bytes
    gif_url: str
    def __init__(self, images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., request_id: _Optional[str] = ..., gif: _Optional[bytes] = ..., gif_url: _Optional[str] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("parameters", "delivery")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    parameters: GenerationParameters
    delivery: Delivery
    def __init__(self, parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ..., delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...

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

class Preview(_message.Message):
    __slots__ = ("step", "total_steps", "png")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    png: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., png: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("progress", "result", "preview")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    progress: StageProgress
    result: GenerateResponse
    preview: Preview
    def __init__(self, progress: _Optional[_Union[StageProgress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ...) -> None: ...

class CreateVariationsRequest(_message.Message):
    __slots__ = ("image", "parameters", "delivery")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    parameters: GenerationParameters
    delivery: Delivery
    def __init__(self, image: _Optional[bytes] = ..., parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ..., delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...

class CreateVariationsResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: GenerateResponse
    def __init__(self, result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class ImagePair(_message.Message):
    __slots__ = ("first", "second")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    first: bytes
    second: bytes
    def __init__(self, first: _Optional[bytes] = ..., second: _Optional[bytes] = ...) -> None: ...

class PromptPair(_message.Message):
    __slots__ = ("first", "second")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    first: str
    second: str
    def __init__(self, first: _Optional[str] = ..., second: _Optional[str] = ...) -> None: ...

class InterpolateRequest(_message.Message):
    __slots__ = ("images", "prompts", "frames", "animated_gif", "parameters", "delivery")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    ANIMATED_GIF_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    images: ImagePair
    prompts: PromptPair
    frames: int
    animated_gif: bool
    parameters: GenerationParameters
    delivery: Delivery
    def __init__(self, images: _Optional[_Union[ImagePair, _Mapping]] = ..., prompts: _Optional[_Union[PromptPair, _Mapping]] = ..., frames: _Optional[int] = ..., animated_gif: _Optional[bool] = ..., parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ..., delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...

class InterpolateResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: GenerateResponse
    def __init__(self, result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class TextDiffRequest(_message.Message):
    __slots__ = ("image", "caption", "target_caption", "frames", "max_rotation", "animated_gif", "parameters", "delivery")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_CAPTION_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_ROTATION_FIELD_NUMBER: _ClassVar[int]
    ANIMATED_GIF_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    caption: str
    target_caption: str
    frames: int
    max_rotation: float
    animated_gif: bool
    parameters: GenerationParameters
    delivery: Delivery
    def __init__(self, image: _Optional[bytes] = ..., caption: _Optional[str] = ..., target_caption: _Optional[str] = ..., frames: _Optional[int] = ..., max_rotation: _Optional[float] = ..., animated_gif: _Optional[bool] = ..., parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ..., delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...

class TextDiffResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: GenerateResponse
    def __init__(self, result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("image", "mask", "parameters", "delivery")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    mask: bytes
    parameters: GenerationParameters
    delivery: Delivery
    def __init__(self, image: _Optional[bytes] = ..., mask: _Optional[bytes] = ..., parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ..., delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: GenerateResponse
    def __init__(self, result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...
