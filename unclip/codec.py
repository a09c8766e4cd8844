"""The shared codec: protobuf messages <-> numpy arrays and dataclasses.

Tensors travel as raw little-endian row-major bytes plus dtype and shape (`unclip.v1.Tensor`).
Decoding is one `np.frombuffer` (no per-element Python work) and every message is checked for
consistency first: a byte length that disagrees with shape and dtype is an `InvalidTensor`,
which the services turn into INVALID_ARGUMENT.

Requests are dataclasses on this side of the wire (generation parameters, sampling options, a
stage's call): `to_message` and `from_message` copy them field by field to and from the message
fields of the same names, so a field added to both is carried without more code, and a field
missing from either is an error rather than a value silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
from google.protobuf.message import Message

from unclip.errors import InvalidArgument
from unclip.v1 import tensor_pb2

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

M = TypeVar("M", bound=Message)
D = TypeVar("D", bound="DataclassInstance")

DataType = tensor_pb2.DataType

# Wire dtype -> little-endian numpy dtype. bfloat16 has no numpy dtype: its bits travel as
# uint16 and numpy callers see it widened (exactly) to float32.
WIRE_DTYPES: dict[tensor_pb2.DataType, np.dtype] = {
    DataType.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    DataType.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    DataType.DATA_TYPE_BFLOAT16: np.dtype("<u2"),
    DataType.DATA_TYPE_INT64: np.dtype("<i8"),
    DataType.DATA_TYPE_UINT8: np.dtype("u1"),
    DataType.DATA_TYPE_BOOL: np.dtype("?"),
}
_NUMPY_WIRE: dict[np.dtype, tensor_pb2.DataType] = {
    np.dtype(np.float32): DataType.DATA_TYPE_FLOAT32,
    np.dtype(np.float16): DataType.DATA_TYPE_FLOAT16,
    np.dtype(np.int64): DataType.DATA_TYPE_INT64,
    np.dtype(np.uint8): DataType.DATA_TYPE_UINT8,
    np.dtype(np.bool_): DataType.DATA_TYPE_BOOL,
}
_MAX_RANK = 8


class InvalidTensor(InvalidArgument):
    """A Tensor message whose dtype, shape and byte length do not agree."""


def checked_layout(message: tensor_pb2.Tensor, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    if message.dtype not in WIRE_DTYPES:
        raise InvalidTensor(
            f"{name}: unsupported dtype {DataType.Name(message.dtype) if message.dtype in DataType.values() else message.dtype}"
        )
    shape = tuple(message.shape)
    if len(shape) > _MAX_RANK:
        raise InvalidTensor(f"{name}: rank {len(shape)} exceeds {_MAX_RANK}")
    if any(dim < 0 for dim in shape):
        raise InvalidTensor(f"{name}: negative dimension in shape {list(shape)}")
    wire = WIRE_DTYPES[message.dtype]
    expected = math.prod(shape) * wire.itemsize
    if len(message.data) != expected:
        raise InvalidTensor(
            f"{name}: shape {list(shape)} of {DataType.Name(message.dtype)} needs {expected} bytes, got {len(message.data)}"
        )
    return wire, shape


def _bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    # np.left_shift with out= keeps 0-d inputs as arrays (the << operator returns a scalar).
    widened = bits.astype(np.uint32)
    return np.left_shift(widened, 16, out=widened).view(np.float32)


def _float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    # Round to nearest even on the 16 dropped mantissa bits; NaN stays NaN.
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = np.where(np.isnan(values), (bits >> 16) | 0x40, rounded)
    return rounded.astype(np.uint16)


def to_numpy(message: tensor_pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """Decode to a writable numpy array in native byte order (bfloat16 widened to float32)."""
    wire, shape = checked_layout(message, name)
    array = np.frombuffer(message.data, dtype=wire).reshape(shape)
    if message.dtype == DataType.DATA_TYPE_BFLOAT16:
        return _bfloat16_bits_to_float32(array)
    return array.astype(wire.newbyteorder("="), copy=True)


def from_numpy(array: np.ndarray, dtype: tensor_pb2.DataType | None = None) -> tensor_pb2.Tensor:
    """Encode a numpy array. `dtype=DATA_TYPE_BFLOAT16` rounds float data to bfloat16."""
    array = np.asarray(array)
    if dtype == DataType.DATA_TYPE_BFLOAT16:
        data = _float32_to_bfloat16_bits(array.astype(np.float32, copy=False)).astype("<u2").tobytes()
        return tensor_pb2.Tensor(dtype=dtype, shape=array.shape, data=data)
    if dtype is not None and dtype not in WIRE_DTYPES:
        raise TypeError(f"cannot encode as dtype {dtype}; supported: {[DataType.Name(d) for d in WIRE_DTYPES]}")
    # Byte order is a wire detail: a big-endian float32 is still float32.
    wire_dtype = _NUMPY_WIRE.get(array.dtype.newbyteorder("=")) if dtype is None else dtype
    if wire_dtype is None:
        raise TypeError(f"cannot encode numpy dtype {array.dtype}; supported: {sorted(str(d) for d in _NUMPY_WIRE)}")
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[wire_dtype]).tobytes()
    return tensor_pb2.Tensor(dtype=wire_dtype, shape=array.shape, data=data)


def to_message(obj: Any, message: M, names: typing.Iterable[str] | None = None) -> M:
    """Set `message`'s fields from dataclass `obj`, each from the field of the same name.

    None leaves a field unset; arrays become Tensors, nested dataclasses nested messages, and a
    field whose metadata has a "proto_enum" mapping (name -> number) its enum number. `names`:
    only these fields. A value the message cannot hold raises TypeError or ValueError naming the
    field, as does the zero of a proto3 field without presence where the dataclass's default is
    not zero: on the wire it would read as "unset".
    """
    fields_by_name = message.DESCRIPTOR.fields_by_name
    wanted = None if names is None else set(names)
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if value is None or (wanted is not None and field.name not in wanted):
            continue
        descriptor = fields_by_name.get(field.name)
        if descriptor is None:
            raise TypeError(f"{type(message).__name__} has no field {field.name!r} for {type(obj).__name__}.{field.name}")
        if _reads_as_unset(descriptor, field, value):
            raise ValueError(f"{field.name}: cannot send {value!r}: it would arrive as unset (default {field.default!r})")
        try:
            if isinstance(value, np.ndarray):
                getattr(message, field.name).CopyFrom(from_numpy(value))
            elif dataclasses.is_dataclass(value):
                to_message(value, getattr(message, field.name))
            elif isinstance(value, list | tuple):
                getattr(message, field.name).extend(value)
            else:
                enum = field.metadata.get("proto_enum")
                setattr(message, field.name, _enum_number(enum, value, field.name) if enum else value)
        except (TypeError, ValueError) as error:
            if isinstance(error, InvalidArgument):
                raise
            raise type(error)(f"{field.name}: cannot send {value!r}: {error}") from None
    return message


def from_message(cls: type[D], message: Message) -> D:
    """The dataclass `cls` from `message`, each field from the message field of the same name.

    A field the message does not set keeps the dataclass default: a field with presence that is
    absent, or a proto3 scalar at zero. An array field must be present unless it may be None.
    """
    hints = typing.get_type_hints(cls)
    fields_by_name = message.DESCRIPTOR.fields_by_name
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        descriptor = fields_by_name.get(field.name)
        if descriptor is None:
            raise TypeError(f"{type(message).__name__} has no field {field.name!r} for {cls.__name__}.{field.name}")
        kind, optional = _unwrap_optional(hints[field.name])
        value = getattr(message, field.name)
        if kind is np.ndarray:
            if not message.HasField(field.name):
                if optional:
                    continue
                raise InvalidArgument(f"{field.name}: required")
            kwargs[field.name] = to_numpy(value, field.name)
        elif dataclasses.is_dataclass(kind):
            kwargs[field.name] = from_message(cast("type[DataclassInstance]", kind), value)
        elif descriptor.is_repeated:
            kwargs[field.name] = list(value)
        elif descriptor.has_presence:
            if message.HasField(field.name):
                kwargs[field.name] = value
        elif value:  # proto3 scalars have no "unset": zero stands for the default
            enum = field.metadata.get("proto_enum")
            kwargs[field.name] = _enum_name(enum, value, field.name) if enum else value
    return cls(**kwargs)


def _reads_as_unset(descriptor: Any, field: dataclasses.Field, value: Any) -> bool:
    if descriptor.has_presence or descriptor.is_repeated or "proto_enum" in field.metadata:
        return False
    zero = descriptor.default_value
    return type(value) is not bool and value == zero and field.default != zero


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, (T, False) for T; generic aliases become their origin (list[int] -> list)."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else hint
    return typing.get_origin(hint) or hint, optional


def _enum_number(enum: dict[str, int], name: Any, field: str) -> int:
    if name not in enum:
        raise InvalidArgument(f"{field}: must be one of {tuple(enum)}, got {name!r}")
    return enum[name]


def _enum_name(enum: dict[str, int], number: int, field: str) -> str:
    for name, value in enum.items():
        if value == number:
            return name
    raise InvalidArgument(f"{field}: unknown enum value {number}")
