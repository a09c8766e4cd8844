"""Tensor <-> numpy / torch conversion for the `unclip.v1.Tensor` protobuf message.

Tensors travel as raw little-endian row-major bytes plus dtype and shape. Decoding is one
`np.frombuffer` (no per-element Python work) and every message is checked for consistency
first: a byte length that disagrees with shape and dtype is an `InvalidTensor`, which the
services turn into INVALID_ARGUMENT. torch is imported lazily so that the gateway and the
client SDK can use the numpy half without it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from unclip.errors import InvalidArgument
from unclip.v1 import tensor_pb2

if TYPE_CHECKING:
    import torch

DataType = tensor_pb2.DataType

# Wire dtype -> little-endian numpy dtype. bfloat16 has no numpy dtype: its bits travel as
# uint16 and numpy callers see it widened (exactly) to float32.
_WIRE_NUMPY = {
    DataType.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    DataType.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    DataType.DATA_TYPE_BFLOAT16: np.dtype("<u2"),
    DataType.DATA_TYPE_INT64: np.dtype("<i8"),
    DataType.DATA_TYPE_UINT8: np.dtype("u1"),
    DataType.DATA_TYPE_BOOL: np.dtype("?"),
}
_NUMPY_WIRE = {
    np.dtype(np.float32): DataType.DATA_TYPE_FLOAT32,
    np.dtype(np.float16): DataType.DATA_TYPE_FLOAT16,
    np.dtype(np.int64): DataType.DATA_TYPE_INT64,
    np.dtype(np.uint8): DataType.DATA_TYPE_UINT8,
    np.dtype(np.bool_): DataType.DATA_TYPE_BOOL,
}
_MAX_RANK = 8


class InvalidTensor(InvalidArgument):
    """A Tensor message whose dtype, shape and byte length do not agree."""


def _checked_layout(message: tensor_pb2.Tensor, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    if message.dtype not in _WIRE_NUMPY:
        raise InvalidTensor(f"{name}: unsupported dtype {DataType.Name(message.dtype) if message.dtype in DataType.values() else message.dtype}")
    shape = tuple(message.shape)
    if len(shape) > _MAX_RANK:
        raise InvalidTensor(f"{name}: rank {len(shape)} exceeds {_MAX_RANK}")
    if any(dim < 0 for dim in shape):
        raise InvalidTensor(f"{name}: negative dimension in shape {list(shape)}")
    wire = _WIRE_NUMPY[message.dtype]
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
    wire, shape = _checked_layout(message, name)
    array = np.frombuffer(message.data, dtype=wire).reshape(shape)
    if message.dtype == DataType.DATA_TYPE_BFLOAT16:
        return _bfloat16_bits_to_float32(array)
    return array.astype(wire.newbyteorder("="), copy=True)


def from_numpy(array: np.ndarray, dtype: int | None = None) -> tensor_pb2.Tensor:
    """Encode a numpy array. `dtype=DATA_TYPE_BFLOAT16` rounds float data to bfloat16."""
    array = np.asarray(array)
    if dtype == DataType.DATA_TYPE_BFLOAT16:
        data = _float32_to_bfloat16_bits(array.astype(np.float32, copy=False)).astype("<u2").tobytes()
        return tensor_pb2.Tensor(dtype=dtype, shape=array.shape, data=data)
    if dtype is not None and dtype not in _WIRE_NUMPY:
        raise TypeError(f"cannot encode as dtype {dtype}; supported: {[DataType.Name(d) for d in _WIRE_NUMPY]}")
    # Byte order is a wire detail: a big-endian float32 is still float32.
    wire_dtype = _NUMPY_WIRE.get(array.dtype.newbyteorder("=")) if dtype is None else dtype
    if wire_dtype is None:
        raise TypeError(f"cannot encode numpy dtype {array.dtype}; supported: {sorted(str(d) for d in _NUMPY_WIRE)}")
    data = np.ascontiguousarray(array, dtype=_WIRE_NUMPY[wire_dtype]).tobytes()
    return tensor_pb2.Tensor(dtype=wire_dtype, shape=array.shape, data=data)


def _torch_dtypes() -> dict[int, "torch.dtype"]:
    import torch

    return {
        DataType.DATA_TYPE_FLOAT32: torch.float32,
        DataType.DATA_TYPE_FLOAT16: torch.float16,
        DataType.DATA_TYPE_BFLOAT16: torch.bfloat16,
        DataType.DATA_TYPE_INT64: torch.int64,
        DataType.DATA_TYPE_UINT8: torch.uint8,
        DataType.DATA_TYPE_BOOL: torch.bool,
    }


def to_torch(message: tensor_pb2.Tensor, name: str = "tensor") -> "torch.Tensor":
    """Decode to a CPU torch tensor of the wire dtype (bfloat16 stays bfloat16)."""
    import torch

    wire, shape = _checked_layout(message, name)
    array = np.frombuffer(message.data, dtype=wire).astype(wire.newbyteorder("="), copy=True).reshape(shape)
    tensor = torch.from_numpy(array)
    if message.dtype == DataType.DATA_TYPE_BFLOAT16:
        return tensor.view(torch.bfloat16)
    return tensor


def from_torch(tensor: "torch.Tensor") -> tensor_pb2.Tensor:
    """Encode a torch tensor (moved to CPU) with its own dtype."""
    import torch

    wire_dtype = {v: k for k, v in _torch_dtypes().items()}.get(tensor.dtype)
    if wire_dtype is None:
        raise TypeError(f"cannot encode torch dtype {tensor.dtype}")
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        array = tensor.view(torch.uint16).numpy()
    else:
        array = tensor.numpy()
    data = np.ascontiguousarray(array, dtype=_WIRE_NUMPY[wire_dtype]).tobytes()
    return tensor_pb2.Tensor(dtype=wire_dtype, shape=tuple(tensor.shape), data=data)
