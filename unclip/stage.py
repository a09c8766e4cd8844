"""The four model stages, and every name each one goes by, defined once.

A stage is served by its own service (`unclip serve encoder`, the Ray Serve application
"encoder"), loads a checkpoint of its kind (config.json's "kind", the subdirectory of a weights
directory: "clip" for the encoder), reports progress under an event name ("encode") and listens
on a default port next to the gateway's. Upsamplers form a chain; the i-th is "upsampler{i}"
where stages are told apart by instance (model versions, the gateway's stage addresses).
"""

from __future__ import annotations

import enum

GATEWAY = "gateway"  # the gateway's serve target and Ray Serve application name
DEFAULT_GATEWAY_PORT = 50051


class Stage(enum.Enum):
    """A model stage; its value is the stage's service name."""

    ENCODER = "encoder"
    PRIOR = "prior"
    DECODER = "decoder"
    UPSAMPLER = "upsampler"

    @property
    def kind(self) -> str:
        """The checkpoint kind, which is also the stage's subdirectory of a weights directory."""
        return _KINDS[self]

    @property
    def event(self) -> str:
        """The stage's name in progress events ("encode", "prior", "decode", "upsample")."""
        return _EVENTS[self]

    @property
    def port(self) -> int:
        """The default port: next to the default gateway port."""
        return self.port_next_to(DEFAULT_GATEWAY_PORT)

    def port_next_to(self, gateway_port: int) -> int:
        """The gateway's port plus 1 for the encoder, ..., plus 4 for the upsampler."""
        return gateway_port + 1 + list(Stage).index(self)

    def instance(self, index: int = 0) -> str:
        """The name of one instance: the service name, numbered for upsamplers ("upsampler0")."""
        return f"{self.value}{index}" if self is Stage.UPSAMPLER else self.value

    def version_key(self, index: int = 0) -> str:
        """The key of this instance's model version in PNG metadata and stored records."""
        return f"{self.kind}{index}" if self is Stage.UPSAMPLER else self.kind

    @classmethod
    def from_instance(cls, name: str) -> Stage:
        """The stage of an instance name ("upsampler1" -> UPSAMPLER)."""
        return cls(name.rstrip("0123456789"))

    @classmethod
    def from_kind(cls, kind: str) -> Stage:
        """The stage of a checkpoint kind ("clip" -> ENCODER)."""
        for stage, stage_kind in _KINDS.items():
            if stage_kind == kind:
                return stage
        raise ValueError(f"unknown stage {kind!r}; expected one of {list(_KINDS.values())}")


_KINDS = {Stage.ENCODER: "clip", Stage.PRIOR: "prior", Stage.DECODER: "decoder", Stage.UPSAMPLER: "upsampler"}
_EVENTS = {Stage.ENCODER: "encode", Stage.PRIOR: "prior", Stage.DECODER: "decode", Stage.UPSAMPLER: "upsample"}
SERVICE_NAMES = tuple(stage.value for stage in Stage)
KINDS = tuple(stage.kind for stage in Stage)


# Model families: how a stage's network is built and conditioned. "unclip": unclip's own networks
# (unclip/models). "diffusers": a diffusers-format unCLIP such as Karlo, imported with
# `unclip import diffusers` (unclip/stages/diffusers_family.py). A checkpoint's config.json says
# which in "family"; without it, unclip's.
UNCLIP = "unclip"
DIFFUSERS = "diffusers"
FAMILIES = (UNCLIP, DIFFUSERS)
