"""Tests for unclip.codec: Tensor protobuf <-> numpy / torch."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from torch_codec import from_torch, to_torch

from unclip.codec import InvalidTensor, from_numpy, to_numpy
from unclip.errors import InvalidArgument
from unclip.v1 import tensor_pb2

DT = tensor_pb2.DataType
FLOAT32, FLOAT16, BFLOAT16 = DT.DATA_TYPE_FLOAT32, DT.DATA_TYPE_FLOAT16, DT.DATA_TYPE_BFLOAT16
INT64, UINT8, BOOL = DT.DATA_TYPE_INT64, DT.DATA_TYPE_UINT8, DT.DATA_TYPE_BOOL

NUMPY_CASES = [
    (np.float32, FLOAT32),
    (np.float16, FLOAT16),
    (np.int64, INT64),
    (np.uint8, UINT8),
    (np.bool_, BOOL),
]
TORCH_CASES = [
    (torch.float32, FLOAT32),
    (torch.float16, FLOAT16),
    (torch.bfloat16, BFLOAT16),
    (torch.int64, INT64),
    (torch.uint8, UINT8),
    (torch.bool, BOOL),
]
SHAPES = [(), (1,), (7,), (2, 3), (2, 0, 4), (0,), (1, 2, 1, 3)]


def random_numpy(dtype, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype == np.int64:
        return rng.integers(-(2**62), 2**62, shape, dtype=np.int64)
    values = rng.standard_normal(shape) * 1000
    return np.asarray(values, dtype=dtype)


def random_torch(dtype, shape, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=generator, dtype=torch.int64)
    return (torch.randn(shape, generator=generator) * 1000).to(dtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("np_dtype,wire", NUMPY_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_numpy_round_trip_is_exact(np_dtype, wire, shape):
    array = random_numpy(np_dtype, shape)
    message = from_numpy(array)
    assert message.dtype == wire
    assert list(message.shape) == list(shape)
    assert len(message.data) == array.size * np.dtype(np_dtype).itemsize
    decoded = to_numpy(message)
    assert isinstance(decoded, np.ndarray)
    assert decoded.dtype == np.dtype(np_dtype)
    assert decoded.shape == shape
    assert same_bits(decoded, array)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("torch_dtype,wire", TORCH_CASES, ids=str)
def test_torch_round_trip_is_exact(torch_dtype, wire, shape):
    tensor = random_torch(torch_dtype, shape)
    message = from_torch(tensor)
    assert message.dtype == wire
    assert list(message.shape) == list(shape)
    decoded = to_torch(message)
    assert decoded.dtype == torch_dtype
    assert tuple(decoded.shape) == shape
    assert decoded.device.type == "cpu"
    assert torch.equal(decoded, tensor)
    if torch_dtype.is_floating_point:  # bitwise, not just numerically (signed zeros etc.)
        bits = torch.int16 if tensor.element_size() == 2 else torch.int32
        assert torch.equal(decoded.view(bits), tensor.view(bits))


def test_torch_and_numpy_encodings_agree():
    """The two encoders produce identical messages for the same data, so either side can decode."""
    for torch_dtype, _ in TORCH_CASES:
        if torch_dtype == torch.bfloat16:
            continue
        tensor = random_torch(torch_dtype, (3, 5), seed=3)
        assert from_torch(tensor) == from_numpy(tensor.numpy())
        assert same_bits(to_numpy(from_torch(tensor)), tensor.numpy())
        assert torch.equal(to_torch(from_numpy(tensor.numpy())), tensor)


def test_special_float_values_survive_exactly():
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4028235e38, 1.0000001], dtype=np.float32)
    assert same_bits(to_numpy(from_numpy(values)), values)
    with np.errstate(over="ignore"):
        halfs = values.astype(np.float16)
    assert same_bits(to_numpy(from_numpy(halfs)), halfs)
    tensor = torch.from_numpy(values)
    assert to_torch(from_torch(tensor)).view(torch.int32).tolist() == tensor.view(torch.int32).tolist()


# ---------------------------------------------------------------------------------------------
# bfloat16


def bf16_bits_from_torch(values: np.ndarray) -> np.ndarray:
    return (
        torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        .to(torch.bfloat16)
        .view(torch.int16)
        .numpy()
        .view(np.uint16)
    )


def tricky_float32() -> np.ndarray:
    """Random bit patterns over the whole float32 range plus every kind of rounding tie."""
    rng = np.random.default_rng(42)
    random_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    upper = rng.integers(0, 2**16, 20_000, dtype=np.uint64).astype(np.uint32) << 16
    ties = upper | 0x8000  # exactly halfway: even upper halves stay, odd ones round up
    just_below = upper | 0x7FFF
    just_above = upper | 0x8001
    special = np.array(
        [
            0x00000000,
            0x80000000,  # +-0
            0x7F800000,
            0xFF800000,  # +-inf
            0x7F7FFFFF,
            0xFF7FFFFF,  # largest finite: rounds to inf
            0x7F7F7FFF,
            0x7F7F8000,  # just below / at the tie below the largest bf16
            0x3F808000,
            0x3F818000,  # ties: 1.0+half ulp (even -> down), next (odd -> up)
            0x00008000,
            0x00018000,
            0x00000001,
            0x007FFFFF,  # subnormals
            0x3F800000,
            0xBF800000,
            0x3FFFFFFF,
        ],
        dtype=np.uint32,
    )
    bits = np.concatenate([random_bits, ties, just_below, just_above, special])
    return bits.view(np.float32)


def test_bfloat16_rounding_matches_torch():
    values = tricky_float32()
    finite_or_inf = ~np.isnan(values)
    assert finite_or_inf.sum() > 200_000 and (~finite_or_inf).sum() > 100  # NaNs are in the sample too
    message = from_numpy(values, BFLOAT16)
    assert message.dtype == BFLOAT16
    assert list(message.shape) == [values.size]
    assert len(message.data) == 2 * values.size
    ours = np.frombuffer(message.data, dtype="<u2")
    expected = bf16_bits_from_torch(values)
    mismatch = np.flatnonzero((ours != expected) & finite_or_inf)
    assert mismatch.size == 0, [
        (hex(values[i : i + 1].view(np.uint32)[0]), hex(ours[i]), hex(expected[i])) for i in mismatch[:10]
    ]
    # NaN stays NaN (torch's exact NaN payload is not specified).
    assert np.all(np.isnan(to_numpy(message)[~finite_or_inf]))


def test_bfloat16_ties_round_to_even():
    one = 1.0
    ulp = 2.0**-7  # bf16 spacing at 1.0
    values = np.array([one + ulp / 2, one + 3 * ulp / 2, -(one + ulp / 2), one + ulp / 2 + 2**-23], dtype=np.float32)
    decoded = to_numpy(from_numpy(values, BFLOAT16))
    np.testing.assert_array_equal(decoded, np.array([one, one + 2 * ulp, -one, one + ulp], dtype=np.float32))


def test_bfloat16_known_bytes():
    message = from_numpy(np.array([1.0, -2.0, np.inf], dtype=np.float32), BFLOAT16)
    assert message.data == bytes.fromhex("803f00c0807f")


def test_bfloat16_numpy_decode_widens_exactly():
    values = tricky_float32()
    values = values[~np.isnan(values)]
    message = from_numpy(values, BFLOAT16)
    decoded = to_numpy(message)
    assert decoded.dtype == np.float32
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    assert same_bits(decoded, expected)
    # Values already representable in bfloat16 survive the numpy path unchanged.
    assert same_bits(to_numpy(from_numpy(decoded, BFLOAT16)), decoded)
    # The torch decoder sees the same bits as bfloat16.
    as_torch = to_torch(message)
    assert as_torch.dtype == torch.bfloat16
    assert torch.equal(as_torch.float(), torch.from_numpy(expected))


def test_bfloat16_torch_message_decodes_in_numpy():
    tensor = random_torch(torch.bfloat16, (4, 6), seed=7)
    decoded = to_numpy(from_torch(tensor))
    assert decoded.dtype == np.float32
    assert same_bits(decoded, tensor.float().numpy())


def test_bfloat16_from_other_float_widths():
    values = np.array([[0.1, -7.25], [3e38, 1e-3]])
    for dtype in (np.float64, np.float16, np.float32):
        with np.errstate(over="ignore"):
            array = values.astype(dtype)
        expected = bf16_bits_from_torch(array.astype(np.float32))
        assert np.frombuffer(from_numpy(array, BFLOAT16).data, "<u2").tolist() == expected.ravel().tolist()


def test_bfloat16_empty_tensor():
    message = from_numpy(np.zeros((3, 0), np.float32), BFLOAT16)
    assert list(message.shape) == [3, 0] and message.data == b""
    assert to_numpy(message).shape == (3, 0)
    assert to_torch(message).shape == (3, 0)


def test_bfloat16_scalar_decodes_to_writable_array():
    message = from_numpy(np.float32(1.5), BFLOAT16)
    assert list(message.shape) == []
    decoded = to_numpy(message)
    assert isinstance(decoded, np.ndarray)
    assert decoded.shape == () and decoded == 1.5
    decoded[()] = 2.0
    assert decoded == 2.0


# ---------------------------------------------------------------------------------------------
# Wire layout


def test_wire_bytes_are_little_endian_row_major():
    array = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -0.25]], dtype=np.float32)
    expected = struct.pack("<6f", 1.0, -2.0, 0.5, 3.0, 0.0, -0.25)
    assert from_numpy(array).data == expected
    assert from_torch(torch.from_numpy(array)).data == expected
    # Column-major storage of the same logical array still goes out row-major.
    assert from_numpy(np.asfortranarray(array)).data == expected
    # Decoding the hand-built bytes gives the array back.
    assert same_bits(to_numpy(tensor_pb2.Tensor(dtype=FLOAT32, shape=[2, 3], data=expected)), array)


def test_known_bytes_other_dtypes():
    assert from_numpy(np.array([1, -2], np.int64)).data == struct.pack("<2q", 1, -2)
    assert from_numpy(np.array([1.0, -2.0], np.float16)).data == bytes.fromhex("003c00c0")
    assert from_numpy(np.array([0, 255, 7], np.uint8)).data == bytes([0, 255, 7])
    assert from_numpy(np.array([True, False, True])).data == b"\x01\x00\x01"
    assert from_torch(torch.tensor([1.0, -2.0], dtype=torch.bfloat16)).data == bytes.fromhex("803f00c0")
    assert from_numpy(np.float32(2.0)).data == struct.pack("<f", 2.0)
    assert list(from_numpy(np.float32(2.0)).shape) == []


def test_non_contiguous_inputs_are_encoded_in_logical_order():
    base = random_numpy(np.float32, (4, 5), seed=1)
    for view in (base.T, base[::2, 1::2], base[:, ::-1]):
        assert not view.flags.c_contiguous
        message = from_numpy(view)
        assert list(message.shape) == list(view.shape)
        assert message.data == np.ascontiguousarray(view).tobytes()
        assert same_bits(to_numpy(message), np.ascontiguousarray(view))
        assert same_bits(to_numpy(from_numpy(view, BFLOAT16)), to_numpy(from_numpy(np.ascontiguousarray(view), BFLOAT16)))

    tensor = random_torch(torch.float32, (4, 5), seed=2)
    for view in (tensor.t(), tensor[::2, 1::2], tensor.expand(3, 4, 5)):
        assert not view.is_contiguous()
        assert from_torch(view).data == view.contiguous().numpy().tobytes()
        assert torch.equal(to_torch(from_torch(view)), view)
    bf = tensor.to(torch.bfloat16).t()
    assert torch.equal(to_torch(from_torch(bf)), bf)


def test_from_torch_detaches_grad_tensors():
    tensor = torch.randn(3, requires_grad=True)
    decoded = to_torch(from_torch(tensor * 2))
    assert not decoded.requires_grad
    assert torch.equal(decoded, (tensor * 2).detach())


@pytest.mark.parametrize("big,native", [(">f4", np.float32), (">f2", np.float16), (">i8", np.int64)])
def test_big_endian_input_encodes_little_endian(big, native):
    native_array = random_numpy(native, (3, 4), seed=5)
    big_array = native_array.astype(big)
    assert big_array.tobytes() != native_array.tobytes()  # really a different memory layout
    message = from_numpy(big_array)
    assert message == from_numpy(native_array)
    assert same_bits(to_numpy(message), native_array)


def test_big_endian_input_with_bfloat16_target():
    values = random_numpy(np.float32, (3, 4), seed=6)
    assert from_numpy(values.astype(">f4"), BFLOAT16) == from_numpy(values, BFLOAT16)


def test_decoded_arrays_are_writable_and_independent_of_the_message():
    for array in (random_numpy(np.float32, (2, 3)), random_numpy(np.int64, (4,)), random_numpy(np.uint8, (2, 2))):
        message = from_numpy(array)
        wire_before = bytes(message.data)
        decoded = to_numpy(message)
        assert decoded.flags.writeable
        decoded[...] = 0
        assert message.data == wire_before
        assert same_bits(to_numpy(message), array)

    message = from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3), BFLOAT16)
    decoded = to_numpy(message)
    assert decoded.flags.writeable
    decoded += 1
    assert to_numpy(message)[0, 0] == 0.0

    for tensor in (random_torch(torch.float32, (2, 3)), random_torch(torch.bfloat16, (5,))):
        message = from_torch(tensor)
        decoded = to_torch(message)
        decoded.add_(1)  # would warn / fail on a read-only buffer
        assert torch.equal(to_torch(message), tensor)


def test_encoding_copies_the_input():
    array = np.ones(4, np.float32)
    message = from_numpy(array)
    array[:] = 5
    assert to_numpy(message).tolist() == [1.0] * 4
    tensor = torch.ones(4)
    message = from_torch(tensor)
    tensor.fill_(5)
    assert to_torch(message).tolist() == [1.0] * 4


def test_messages_survive_serialisation():
    array = random_numpy(np.float16, (2, 3, 4), seed=9)
    wire = from_numpy(array).SerializeToString()
    assert same_bits(to_numpy(tensor_pb2.Tensor.FromString(wire)), array)


def test_large_tensor_decodes_with_one_frombuffer():
    """4M elements: a per-element Python loop would take far longer than this test's budget."""
    n = 4 * 1024 * 1024
    array = np.arange(n, dtype=np.float32)
    message = from_numpy(array.reshape(1024, 4096))
    assert len(message.data) == 4 * n
    decoded = to_numpy(message, "big")
    assert decoded.shape == (1024, 4096)
    assert decoded[0, 0] == 0.0 and decoded[-1, -1] == n - 1
    np.testing.assert_array_equal(decoded.ravel(), array)
    as_torch = to_torch(message, "big")
    assert as_torch.shape == (1024, 4096) and as_torch[-1, -1].item() == n - 1


# ---------------------------------------------------------------------------------------------
# Rejections

INVALID_MESSAGES = {
    "too_short": (tensor_pb2.Tensor(dtype=FLOAT32, shape=[2, 3], data=b"\0" * 20), ["24 bytes", "got 20"]),
    "too_long": (tensor_pb2.Tensor(dtype=FLOAT32, shape=[2, 3], data=b"\0" * 28), ["24 bytes", "got 28"]),
    "odd_length_for_f16": (tensor_pb2.Tensor(dtype=FLOAT16, shape=[3], data=b"\0" * 5), ["6 bytes", "got 5"]),
    "scalar_without_data": (tensor_pb2.Tensor(dtype=INT64, shape=[], data=b""), ["8 bytes", "got 0"]),
    "empty_with_data": (tensor_pb2.Tensor(dtype=UINT8, shape=[0, 4], data=b"\0"), ["0 bytes", "got 1"]),
    "bf16_uses_2_bytes": (tensor_pb2.Tensor(dtype=BFLOAT16, shape=[2], data=b"\0" * 8), ["4 bytes", "got 8"]),
    "negative_dim": (tensor_pb2.Tensor(dtype=FLOAT32, shape=[-1, 2], data=b""), ["negative"]),
    "negative_dims_product_positive": (tensor_pb2.Tensor(dtype=UINT8, shape=[-2, -2], data=b"\0" * 4), ["negative"]),
    "unspecified_dtype": (tensor_pb2.Tensor(shape=[1], data=b"\0" * 4), ["dtype", "DATA_TYPE_UNSPECIFIED"]),
    "unknown_dtype": (tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0" * 4), ["dtype", "99"]),
    "rank_9": (tensor_pb2.Tensor(dtype=UINT8, shape=[1] * 9, data=b"\0"), ["rank 9"]),
}


@pytest.mark.parametrize("decode", [to_numpy, to_torch], ids=["numpy", "torch"])
@pytest.mark.parametrize("case", sorted(INVALID_MESSAGES))
def test_inconsistent_messages_are_rejected(case, decode):
    message, fragments = INVALID_MESSAGES[case]
    with pytest.raises(InvalidTensor) as info:
        decode(message, "request.image_embeddings")
    text = str(info.value)
    assert "request.image_embeddings" in text
    for fragment in fragments:
        assert fragment in text, text
    assert isinstance(info.value, InvalidArgument) and isinstance(info.value, ValueError)
    assert info.value.status_name == "INVALID_ARGUMENT"


def test_rank_8_is_accepted():
    message = tensor_pb2.Tensor(dtype=UINT8, shape=[1, 2, 1, 1, 1, 1, 1, 2], data=b"\1\2\3\4")
    assert to_numpy(message).shape == (1, 2, 1, 1, 1, 1, 1, 2)
    assert to_numpy(message).ravel().tolist() == [1, 2, 3, 4]


def test_huge_declared_shape_is_rejected_without_allocating():
    message = tensor_pb2.Tensor(dtype=FLOAT32, shape=[2**31, 2**31, 2**31], data=b"\0" * 4)
    with pytest.raises(InvalidTensor, match="got 4"):
        to_numpy(message, "x")


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, np.float64, np.int32, np.uint16, np.int8, object, "U3"], ids=str)
def test_unsupported_numpy_dtypes_raise_type_error(dtype):
    array = np.zeros((2,), dtype=dtype)
    with pytest.raises(TypeError, match="cannot encode"):
        from_numpy(array)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64, torch.int32, torch.int8, torch.int16], ids=str)
def test_unsupported_torch_dtypes_raise_type_error(dtype):
    with pytest.raises(TypeError, match="cannot encode"):
        from_torch(torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("wire", [DT.DATA_TYPE_UNSPECIFIED, 42])
def test_from_numpy_rejects_invalid_target_dtype(wire):
    with pytest.raises(TypeError):
        from_numpy(np.zeros(2, np.float32), wire)
