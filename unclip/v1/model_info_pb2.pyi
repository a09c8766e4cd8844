from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ModelInfo(_message.Message):
    __slots__ = ("kind", "version", "embed_dim", "image_size", "scale_factor", "max_steps", "compute_batch", "default_steps")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_BATCH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    version: str
    embed_dim: int
    image_size: int
    scale_factor: int
    max_steps: int
    compute_batch: int
    default_steps: int
    def __init__(self, kind: _Optional[str] = ..., version: _Optional[str] = ..., embed_dim: _Optional[int] = ..., image_size: _Optional[int] = ..., scale_factor: _Optional[int] = ..., max_steps: _Optional[int] = ..., compute_batch: _Optional[int] = ..., default_steps: _Optional[int] = ...) -> None: ...
