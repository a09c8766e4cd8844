"""Checks shared by every stage's inputs; each failure names the field and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unclip.errors import InvalidArgument

MAX_SEED = 2**64 - 1
# Bounds on one stage call's cost.
MAX_BATCH = 64
MAX_CANDIDATES = 16
MAX_GUIDANCE_SCALE = 50.0
# The largest side an upsampler makes; message size limits (unclip.limits) follow from it.
MAX_OUTPUT_SIDE = 1024


def check_array(
    array: np.ndarray,
    name: str,
    *,
    shape: Sequence[int | None],
    dtypes: Sequence[type | np.dtype],
    finite: bool = True,
) -> np.ndarray:
    """Check rank, the dimensions given (None = any), dtype and finiteness."""
    if array.ndim != len(shape):
        raise InvalidArgument(f"{name}: expected {len(shape)} dimensions {_pretty(shape)}, got shape {list(array.shape)}")
    for axis, (want, got) in enumerate(zip(shape, array.shape, strict=True)):
        if want is not None and want != got:
            raise InvalidArgument(f"{name}: dimension {axis} must be {want} {_pretty(shape)}, got shape {list(array.shape)}")
    if not any(array.dtype == np.dtype(d) for d in dtypes):
        raise InvalidArgument(f"{name}: dtype must be one of {[np.dtype(d).name for d in dtypes]}, got {array.dtype.name}")
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidArgument(f"{name}: contains NaN or Inf")
    return array


def check_batch(batch_size: int, name: str, limit: int) -> None:
    if not 1 <= batch_size <= limit:
        raise InvalidArgument(f"{name}: batch size must be between 1 and {limit}, got {batch_size}")


def check_seeds(seeds: Sequence[int], batch_size: int) -> list[int]:
    if len(seeds) != batch_size:
        raise InvalidArgument(f"seeds: need one seed per row ({batch_size}), got {len(seeds)}")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise InvalidArgument(f"seeds: {seed} is outside 0..2**64-1")
    return [int(s) for s in seeds]


def check_range(value: float, name: str, low: float, high: float) -> float:
    if not (low <= value <= high):  # also rejects NaN
        raise InvalidArgument(f"{name}: must be between {low} and {high}, got {value}")
    return value


def check_guidance(scale: float | None, default: float, name: str = "guidance_scale") -> float:
    """A classifier-free guidance scale, or the default when None: 0 .. MAX_GUIDANCE_SCALE."""
    return check_range(default if scale is None else scale, name, 0.0, MAX_GUIDANCE_SCALE)


def check_fraction(value: float, name: str) -> float:
    """A share or mixing weight: a number in [0, 1] (NaN is refused too)."""
    if not 0.0 <= value <= 1.0:
        raise InvalidArgument(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def _pretty(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
