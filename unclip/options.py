"""Sampling options as every layer sees them, and their protobuf form (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from unclip.errors import InvalidArgument
from unclip.v1 import sampling_pb2
from unclip.validation import check_range

SAMPLERS = ("ddim", "ddpm")
_SAMPLER_ENUM = {"ddim": sampling_pb2.SAMPLER_DDIM, "ddpm": sampling_pb2.SAMPLER_DDPM}


class DefaultsLike(Protocol):
    """A checkpoint's sampling defaults (unclip.config.SamplingDefaults, kept torch-free here)."""

    steps: int
    sampler: str
    eta: float


@dataclass(frozen=True)
class SamplingOptions:
    """A request's sampling choices; None means the checkpoint's default."""

    steps: int | None = None
    sampler: str | None = None
    eta: float | None = None

    def resolve(self, defaults: DefaultsLike, max_steps: int) -> SamplingOptions:
        steps = defaults.steps if self.steps is None else self.steps
        if not 1 <= steps <= max_steps:
            raise InvalidArgument(f"steps: must be between 1 and {max_steps}, got {steps}")
        sampler = self.sampler or defaults.sampler
        if sampler not in SAMPLERS:
            raise InvalidArgument(f"sampler: must be one of {SAMPLERS}, got {sampler!r}")
        eta = check_range(defaults.eta if self.eta is None else self.eta, "eta", 0.0, 1.0)
        return SamplingOptions(steps=steps, sampler=sampler, eta=eta)

    def to_proto(self) -> sampling_pb2.SamplingOptions:
        message = sampling_pb2.SamplingOptions(sampler=sampler_to_proto(self.sampler))
        if self.steps is not None:
            message.steps = self.steps
        if self.eta is not None:
            message.eta = self.eta
        return message

    @classmethod
    def from_proto(cls, message: sampling_pb2.SamplingOptions) -> SamplingOptions:
        return cls(
            steps=message.steps if message.HasField("steps") else None,
            sampler=sampler_from_proto(message.sampler),
            eta=message.eta if message.HasField("eta") else None,
        )


def sampler_to_proto(sampler: str | None) -> int:
    if sampler is None:
        return sampling_pb2.SAMPLER_UNSPECIFIED
    if sampler not in _SAMPLER_ENUM:
        raise InvalidArgument(f"sampler: must be one of {SAMPLERS}, got {sampler!r}")
    return _SAMPLER_ENUM[sampler]


def sampler_from_proto(value: int) -> str | None:
    if value == sampling_pb2.SAMPLER_UNSPECIFIED:
        return None
    for name, enum in _SAMPLER_ENUM.items():
        if enum == value:
            return name
    raise InvalidArgument(f"sampler: unknown enum value {value}")
