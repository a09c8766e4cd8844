from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_DDIM: _ClassVar[Sampler]
    SAMPLER_DDPM: _ClassVar[Sampler]
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_DDIM: Sampler
SAMPLER_DDPM: Sampler

class SamplingOptions(_message.Message):
    __slots__ = ("steps", "sampler", "eta")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    steps: int
    sampler: Sampler
    eta: float
    def __init__(self, steps: _Optional[int] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., eta: _Optional[float] = ...) -> None: ...
