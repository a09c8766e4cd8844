"""Tensor messages <-> torch tensors, for tests that compare the codec against torch's own dtypes
(bfloat16 stays bfloat16 here; the services only decode to numpy)."""

from __future__ import annotations

import numpy as np
import torch

from unclip.codec import WIRE_DTYPES, DataType, checked_layout
from unclip.v1 import tensor_pb2


def _torch_dtypes() -> dict[int, torch.dtype]:

    return {
        DataType.DATA_TYPE_FLOAT32: torch.float32,
        DataType.DATA_TYPE_FLOAT16: torch.float16,
        DataType.DATA_TYPE_BFLOAT16: torch.bfloat16,
        DataType.DATA_TYPE_INT64: torch.int64,
        DataType.DATA_TYPE_UINT8: torch.uint8,
        DataType.DATA_TYPE_BOOL: torch.bool,
    }


def to_torch(message: tensor_pb2.Tensor, name: str = "tensor") -> torch.Tensor:
    """Decode to a CPU torch tensor of the wire dtype (bfloat16 stays bfloat16)."""

    wire, shape = checked_layout(message, name)
    array = np.frombuffer(message.data, dtype=wire).astype(wire.newbyteorder("="), copy=True).reshape(shape)
    tensor = torch.from_numpy(array)
    if message.dtype == DataType.DATA_TYPE_BFLOAT16:
        return tensor.view(torch.bfloat16)
    return tensor


def from_torch(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a torch tensor (moved to CPU) with its own dtype."""

    wire_dtype = {v: k for k, v in _torch_dtypes().items()}.get(tensor.dtype)
    if wire_dtype is None:
        raise TypeError(f"cannot encode torch dtype {tensor.dtype}")
    tensor = tensor.detach().cpu().contiguous()
    array = tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[wire_dtype]).tobytes()
    return tensor_pb2.Tensor(dtype=wire_dtype, shape=tuple(tensor.shape), data=data)
