from unclip.v1 import sampling_pb2 as _sampling_pb2
from unclip.v1 import model_info_pb2 as _model_info_pb2
from unclip.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpsampleRequest(_message.Message):
    __slots__ = ("images", "seeds", "sampling", "inpaint_images", "inpaint_mask", "float_images")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    INPAINT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    INPAINT_MASK_FIELD_NUMBER: _ClassVar[int]
    FLOAT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _tensor_pb2.Tensor
    seeds: _containers.RepeatedScalarFieldContainer[int]
    sampling: _sampling_pb2.SamplingOptions
    inpaint_images: _tensor_pb2.Tensor
    inpaint_mask: _tensor_pb2.Tensor
    float_images: bool
    def __init__(self, images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., seeds: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_sampling_pb2.SamplingOptions, _Mapping]] = ..., inpaint_images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., inpaint_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., float_images: _Optional[bool] = ...) -> None: ...

class UpsampleResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _tensor_pb2.Tensor
    def __init__(self, images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GetUpsamplerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetUpsamplerInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _model_info_pb2.ModelInfo
    def __init__(self, info: _Optional[_Union[_model_info_pb2.ModelInfo, _Mapping]] = ...) -> None: ...
