from unclip.v1 import model_info_pb2 as _model_info_pb2
from unclip.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeTextRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EncodeTextResponse(_message.Message):
    __slots__ = ("text_embeddings", "text_encodings", "text_mask")
    TEXT_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    TEXT_MASK_FIELD_NUMBER: _ClassVar[int]
    text_embeddings: _tensor_pb2.Tensor
    text_encodings: _tensor_pb2.Tensor
    text_mask: _tensor_pb2.Tensor
    def __init__(self, text_embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., text_encodings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., text_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class EncodeImageRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _tensor_pb2.Tensor
    def __init__(self, images: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class EncodeImageResponse(_message.Message):
    __slots__ = ("image_embeddings",)
    IMAGE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    image_embeddings: _tensor_pb2.Tensor
    def __init__(self, image_embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GetEncoderInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetEncoderInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _model_info_pb2.ModelInfo
    def __init__(self, info: _Optional[_Union[_model_info_pb2.ModelInfo, _Mapping]] = ...) -> None: ...
