"""A diffusion stage's sampling options as every layer sees them (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from unclip.errors import InvalidArgument
from unclip.v1 import sampling_pb2
from unclip.validation import check_range

SAMPLERS = ("ddim", "ddpm")
SAMPLER_ENUM = {"ddim": sampling_pb2.SAMPLER_DDIM, "ddpm": sampling_pb2.SAMPLER_DDPM}
"""Sampler name -> its `unclip.v1.Sampler` number; unset (None) travels as SAMPLER_UNSPECIFIED."""


class DefaultsLike(Protocol):
    """A checkpoint's sampling defaults (unclip.config.SamplingDefaults, kept torch-free here)."""

    steps: int
    sampler: str
    eta: float


@dataclass(frozen=True)
class SamplingOptions:
    """A request's sampling choices; None means the checkpoint's default."""

    steps: int | None = None
    sampler: str | None = field(default=None, metadata={"proto_enum": SAMPLER_ENUM})
    eta: float | None = None

    def resolve(self, defaults: DefaultsLike, max_steps: int) -> ResolvedSampling:
        steps = defaults.steps if self.steps is None else self.steps
        if not 1 <= steps <= max_steps:
            raise InvalidArgument(f"steps: must be between 1 and {max_steps}, got {steps}")
        sampler = self.sampler or defaults.sampler
        if sampler not in SAMPLERS:
            raise InvalidArgument(f"sampler: must be one of {SAMPLERS}, got {sampler!r}")
        eta = check_range(defaults.eta if self.eta is None else self.eta, "eta", 0.0, 1.0)
        return ResolvedSampling(steps=steps, sampler=sampler, eta=eta)


@dataclass(frozen=True)
class ResolvedSampling:
    """Sampling options with every choice made: what a sampler runs with."""

    steps: int
    sampler: str
    eta: float
