"""Generation parameters: each one defined once, here, with its default, bounds and help.

Everything else derives from `GenerationParameters`: the client SDK's keyword arguments and
their documentation, the CLI's flags, the protobuf message (`codec.to_message` and
`from_message` copy fields by name), the HTTP API's fields, the settings each stage's call
receives (`stage_settings`), the checks the gateway applies (`validate`), and the PNG metadata
and stored record of every result. A new setting is a field here and in `GenerationParameters`
of images.proto; where a stage already takes it, its `to` entry carries it there.

Torch-free and server-free: the client SDK imports this module.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from unclip.errors import InvalidArgument
from unclip.options import SAMPLER_ENUM, SAMPLERS, SamplingOptions
from unclip.stage import Stage
from unclip.validation import MAX_CANDIDATES, MAX_GUIDANCE_SCALE, MAX_SEED

MAX_IMAGES_PER_REQUEST = 8
MAX_PROMPT_CHARS = 1000
# As DALL-E 2: two prior samples per image, the one closer to the text kept (BENCHMARKS.md measures it).
DEFAULT_PRIOR_CANDIDATES = 2


class Group(enum.Enum):
    """What a parameter is about, which decides the operations that take it."""

    PROMPT = "prompt"
    COUNT = "count"  # how many images: operations whose images are independent samples
    OUTPUT = "output"  # every operation: size, seed, sampler
    PRIOR = "prior"  # operations that sample the prior from text
    DECODER = "decoder"
    UPSAMPLER = "upsampler"
    STREAM = "stream"  # streaming generation only


_ALL_STAGES = {Group.OUTPUT, Group.DECODER, Group.UPSAMPLER}
OPERATIONS: dict[str, frozenset[Group]] = {
    "generate": frozenset({Group.PROMPT, Group.COUNT, Group.PRIOR, *_ALL_STAGES}),
    "generate_stream": frozenset({Group.PROMPT, Group.COUNT, Group.PRIOR, Group.STREAM, *_ALL_STAGES}),
    "edit": frozenset({Group.PROMPT, Group.COUNT, Group.PRIOR, *_ALL_STAGES}),
    "variations": frozenset({Group.COUNT, *_ALL_STAGES}),
    "interpolate": frozenset({Group.PRIOR, *_ALL_STAGES}),  # the two prompts are endpoints, not `prompt`
    "text_diff": frozenset(_ALL_STAGES),
}
"""Operation -> the groups of parameters it takes."""


@dataclass(frozen=True)
class Spec:
    """What is known about one parameter besides its name, type and default.

    `to`: where the value goes in stage calls, as (stage, call field); "sampling.x" is field x of
    the call's SamplingOptions. `flag`: the CLI flag (default: --the-name-with-dashes).
    """

    group: Group
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    to: tuple[tuple[Stage, str], ...] = ()

    def check(self, name: str, value: Any) -> None:
        if self.choices is not None and value not in self.choices:
            raise InvalidArgument(f"{name}: must be one of {self.choices}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"{name}: must be a finite number, got {value}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise InvalidArgument(f"{name}: must be {_bounds(self.low, self.high)}, got {value}")


def _bounds(low: float | None, high: float | None) -> str:
    if high is None:
        return f"at least {low}"
    if low is None:
        return f"at most {high}"
    return f"between {low} and {high}"


def _param(default: Any, group: Group, help: str, **spec: Any) -> Any:
    metadata: dict[str, Any] = {"spec": Spec(group, help, **spec)}
    if spec.get("choices") == SAMPLERS:
        metadata["proto_enum"] = SAMPLER_ENUM
    return field(default=default, metadata=metadata)


_EVERY_DIFFUSION_STAGE = (Stage.PRIOR, Stage.DECODER, Stage.UPSAMPLER)


@dataclass(frozen=True)
class GenerationParameters:
    """One request's settings. None: the model's (or the gateway's) default."""

    prompt: str = _param("", Group.PROMPT, "what to draw")
    n: int = _param(1, Group.COUNT, "number of images; image i uses seed + i", low=1, high=MAX_IMAGES_PER_REQUEST, flag="-n")
    size: int | None = _param(
        None, Group.OUTPUT, "output side in pixels, the decoder's side times upsampler factors; unset: the largest served", low=1
    )
    seed: int | None = _param(None, Group.OUTPUT, "unset: random (each image reports its seed)", low=0, high=MAX_SEED)
    prior_guidance_scale: float | None = _param(
        None,
        Group.PRIOR,
        "the prior's classifier-free guidance scale",
        low=0.0,
        high=MAX_GUIDANCE_SCALE,
        flag="--prior-guidance",
        to=((Stage.PRIOR, "guidance_scale"),),
    )
    decoder_guidance_scale: float | None = _param(
        None,
        Group.DECODER,
        "the decoder's classifier-free guidance scale for the image embedding",
        low=0.0,
        high=MAX_GUIDANCE_SCALE,
        flag="--decoder-guidance",
        to=((Stage.DECODER, "guidance_scale"),),
    )
    decoder_text_guidance_scale: float | None = _param(
        None,
        Group.DECODER,
        "the caption's own decoder guidance scale, on top of the image embedding's (unset: the model's default, "
        "else the image embedding's; no effect where the decoder sees no prompt)",
        low=0.0,
        high=MAX_GUIDANCE_SCALE,
        flag="--decoder-text-guidance",
        to=((Stage.DECODER, "text_guidance_scale"),),
    )
    prior_steps: int | None = _param(
        None, Group.PRIOR, "the prior's denoising steps", low=1, to=((Stage.PRIOR, "sampling.steps"),)
    )
    decoder_steps: int | None = _param(
        None, Group.DECODER, "the decoder's denoising steps", low=1, to=((Stage.DECODER, "sampling.steps"),)
    )
    upsampler_steps: int | None = _param(
        None, Group.UPSAMPLER, "each upsampler's denoising steps", low=1, to=((Stage.UPSAMPLER, "sampling.steps"),)
    )
    sampler: str | None = _param(
        None,
        Group.OUTPUT,
        "the reverse-diffusion sampler of every stage",
        choices=SAMPLERS,
        to=tuple((stage, "sampling.sampler") for stage in _EVERY_DIFFUSION_STAGE),
    )
    prior_candidates: int = _param(
        DEFAULT_PRIOR_CANDIDATES,
        Group.PRIOR,
        "prior samples per image; the one closest to the prompt is kept",
        low=1,
        high=MAX_CANDIDATES,
        flag="--candidates",
        to=((Stage.PRIOR, "num_candidates"),),
    )
    preview_every: int = _param(0, Group.STREAM, "a decoder preview every this many steps; 0: none", low=0)

    def validate(self, operation: str) -> None:
        """Raise InvalidArgument naming the first parameter out of its bounds."""
        if Group.PROMPT in OPERATIONS[operation] and not self.prompt.strip():
            raise InvalidArgument("prompt: must not be empty")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"prompt: {len(self.prompt)} characters exceed the limit of {MAX_PROMPT_CHARS}")
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is not None:
                spec_of(item).check(item.name, value)

    def stage_settings(self, stage: Stage) -> dict[str, Any]:
        """The keyword arguments of `stage`'s call these parameters set, e.g. for the decoder
        {"guidance_scale": ..., "text_guidance_scale": ..., "sampling": SamplingOptions(...)}."""
        settings: dict[str, Any] = {}
        sampling: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            for target, name in spec_of(item).to:
                if target is stage:
                    value = getattr(self, item.name)
                    if name.startswith("sampling."):
                        sampling[name.removeprefix("sampling.")] = value
                    else:
                        settings[name] = value
        if sampling:
            settings["sampling"] = SamplingOptions(**sampling)
        return settings


def spec_of(item: dataclasses.Field) -> Spec:
    return item.metadata["spec"]


_FIELDS = {item.name: item for item in dataclasses.fields(GenerationParameters)}
_TYPES = typing.get_type_hints(GenerationParameters)


def parameters(operation: str | None = None) -> list[dataclasses.Field]:
    """The parameters `operation` takes (all of them for None), in definition order."""
    groups = set(Group) if operation is None else OPERATIONS[operation]
    return [item for item in _FIELDS.values() if spec_of(item).group in groups]


def value_type(name: str) -> type:
    """The type of parameter `name`'s values, None aside: int, float or str."""
    hint = _TYPES[name]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if args else hint


def check_names(operation: str, given: typing.Iterable[str]) -> None:
    """TypeError for a name `operation` does not take, as for an unexpected keyword argument."""
    taken = {item.name for item in parameters(operation)}
    for name in given:
        if name not in taken:
            hint = "" if name not in _FIELDS else f" (it does not apply to {operation})"
            raise TypeError(f"{operation}() got an unexpected keyword argument {name!r}{hint}")


def describe(operation: str, skip: tuple[str, ...] = ("prompt",)) -> str:
    """The parameters `operation` takes, one line each: for docstrings and reference docs."""
    lines = []
    for item in parameters(operation):
        if item.name in skip:
            continue
        spec = spec_of(item)
        default = "" if item.default is None else f" Default: {item.default}."
        choices = f" One of {', '.join(spec.choices)}." if spec.choices else ""
        lines.append(f"{item.name} ({value_type(item.name).__name__}): {spec.help}.{choices}{default}")
    return "\n".join(lines)
