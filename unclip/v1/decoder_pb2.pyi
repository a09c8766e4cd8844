from unclip.v1 import sampling_pb2 as _sampling_pb2
from unclip.v1 import model_info_pb2 as _model_info_pb2
from unclip.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("image_embeddings", "text_encodings", "text_mask", "seeds", "guidance_scale", "sampling", "inpaint_images", "inpaint_mask", "text_guidance_scale", "text_embeddings", "float_images")
    IMAGE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    TEXT_MASK_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    INPAINT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    INPAINT_MASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    FLOAT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    image_embeddings: _tensor_pb2.Tensor
    text_encodings: _tensor_pb2.Tensor
    text_mask: _tensor_pb2.Tensor
    seeds: _containers.RepeatedScalarFieldContainer[int]
    guidance_scale: float
    sampling: _sampling_pb2.SamplingOptions
    inpaint_images: _tensor_pb2.Tensor
    inpaint_mask: _tensor_pb2.Tensor
    text_guidance_scale: float
    text_embeddings: _tensor_pb2.Tensor
    float_images: bool
    def __init__(self, image_embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., text_encodings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., text_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., seeds: _Optional[_Iterable[int]] = ..., guidance_scale: _Optional[float] = ..., sampling: _Optional[_Union[_sampling_pb2.SamplingOptions, _Mapping]] = ..., inpaint_images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., inpaint_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., text_guidance_scale: _Optional[float] = ..., text_embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., float_images: _Optional[bool] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _tensor_pb2.Tensor
    def __init__(self, images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GetDecoderInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDecoderInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _model_info_pb2.ModelInfo
    def __init__(self, info: _Optional[_Union[_model_info_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class DecodeStreamRequest(_message.Message):
    __slots__ = ("request", "preview_every")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    request: DecodeRequest
    preview_every: int
    def __init__(self, request: _Optional[_Union[DecodeRequest, _Mapping]] = ..., preview_every: _Optional[int] = ...) -> None: ...

class DecodePreview(_message.Message):
    __slots__ = ("step", "total_steps", "images")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    images: _tensor_pb2.Tensor
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DecodeStreamResponse(_message.Message):
    __slots__ = ("preview", "result")
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    preview: DecodePreview
    result: DecodeResponse
    def __init__(self, preview: _Optional[_Union[DecodePreview, _Mapping]] = ..., result: _Optional[_Union[DecodeResponse, _Mapping]] = ...) -> None: ...
