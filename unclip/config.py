"""Stage configurations: dataclasses saved as config.json next to each checkpoint's weights.

A checkpoint directory holds everything a service needs to rebuild its model: the config
(kind, network geometry, diffusion process, sampling defaults) and safetensors weights.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from unclip.models.prior import PriorConfig
from unclip.models.unet import UNetConfig, decoder_config_tiny, upsampler_config_tiny
from unclip.stage import DIFFUSERS, FAMILIES, UNCLIP, Stage


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "cosine"
    parameterization: str = "eps"  # eps | x0 | v
    variance: str = "fixed_small"  # fixed_small | learned_range (unclip.diffusion.gaussian.VARIANCES)
    spacing: str = "even"  # how sampling picks its timesteps (unclip.diffusion.respace.SPACINGS)
    # The precision schedule buffers and step coefficients are computed in (held as float64
    # either way): "float32" reproduces diffusers' UnCLIPScheduler exactly, for imported weights.
    arithmetic: str = "float64"
    # Training only: Min-SNR-gamma loss weighting (0 = the plain loss of the parameterization).
    min_snr_gamma: float = 0.0


@dataclass
class SamplingDefaults:
    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    guidance_scale: float = 1.0


@dataclass
class DecoderSamplingDefaults(SamplingDefaults):
    # The caption's own guidance scale, on top of the image embedding's (guidance_scale); see
    # two_condition_guidance. None: one scale for both, plain classifier-free guidance.
    text_guidance_scale: float | None = None


@dataclass
class ClipStageConfig:
    # Any open_clip model name; "unclip-tiny" is registered from unclip/models/open_clip_configs.
    model_name: str = "unclip-tiny"
    # Weights file, relative to the checkpoint directory (or absolute): safetensors or an open_clip checkpoint.
    weights: str = "model.safetensors"
    # An open_clip model config given inline instead of model_name (imported CLIPs;
    # unclip.models.clip_import), with "unclip_no_image_tower" and an optional "preprocess".
    open_clip_config: dict[str, Any] | None = None
    # Unit-normalise the embeddings it returns (unclip's models); Karlo's take them as CLIP gives them.
    normalize: bool = True
    # The token after each text's end token, as the source tokenizer padded (open_clip: 0).
    pad_token_id: int = 0
    kind: str = Stage.ENCODER.kind
    family: str = UNCLIP


@dataclass
class PriorStageConfig:
    model: PriorConfig = field(default_factory=PriorConfig)
    # DALL-E 2's prior predicts the clean embedding directly.
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(parameterization="x0"))
    sampling: SamplingDefaults = field(default_factory=lambda: SamplingDefaults(steps=32, guidance_scale=2.0))
    weights: str = "model.safetensors"
    kind: str = Stage.PRIOR.kind
    family: str = UNCLIP


@dataclass
class DecoderStageConfig:
    model: UNetConfig = field(default_factory=decoder_config_tiny)
    # v-prediction (decoder and upsampler): unlike eps it stays well conditioned at high noise, where
    # background, layout and colour are decided; an eps model's x0 estimate there is its error
    # times up to 1/sqrt(acp), 2e4 at the last step of the cosine schedule.
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(parameterization="v"))
    sampling: DecoderSamplingDefaults = field(default_factory=lambda: DecoderSamplingDefaults(steps=25, guidance_scale=3.0))
    image_size: int = 32
    weights: str = "model.safetensors"
    kind: str = Stage.DECODER.kind
    family: str = UNCLIP

    def __post_init__(self) -> None:
        side = self.model.position_embedding_size
        if side not in (0, self.image_size):
            raise ValueError(
                f"decoder: model.position_embedding_size {side} must be 0 or the image_size {self.image_size} it runs at"
            )


@dataclass
class UpsamplerStageConfig:
    model: UNetConfig = field(default_factory=upsampler_config_tiny)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(parameterization="v"))
    sampling: SamplingDefaults = field(default_factory=lambda: SamplingDefaults(steps=10))
    scale_factor: int = 4
    input_size: int = 32
    # Side of the high-res training crops; 0: a quarter of the output side, as in DALL-E 2. Larger
    # crops cost more per row but put training pixels as far from a border as whole images have them.
    train_crop_size: int = 0
    weights: str = "model.safetensors"
    kind: str = Stage.UPSAMPLER.kind
    family: str = UNCLIP

    @property
    def size_multiple(self) -> int:
        """Output sides must divide by this: the network halves the resolution this many times."""
        return int(2 ** (len(self.model.channel_mult) - 1))


def _karlo_diffusion(**fields: Any) -> DiffusionConfig:
    # UnCLIPScheduler: the cosine schedule, timesteps rounded as Karlo rounds them, float32 arithmetic.
    return DiffusionConfig(schedule="squaredcos_cap_v2", spacing="karlo", arithmetic="float32", **fields)


@dataclass
class DiffusersPriorStageConfig:
    """An imported diffusers PriorTransformer (`prior`: its config) with Karlo's sampling."""

    prior: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 768  # CLIP's embedding width, also the text encodings' width
    context_length: int = 77  # text tokens, exactly
    diffusion: DiffusionConfig = field(default_factory=lambda: _karlo_diffusion(parameterization="x0"))
    sampling: SamplingDefaults = field(default_factory=lambda: SamplingDefaults(steps=25, sampler="ddpm", guidance_scale=4.0))
    clip_sample_range: float | None = 5.0  # predicted x_0 is clamped to +-this (None: not clamped)
    weights: str = "model.safetensors"
    kind: str = Stage.PRIOR.kind
    family: str = DIFFUSERS


@dataclass
class DiffusersDecoderStageConfig:
    """An imported UnCLIPTextProjModel + UNet2DConditionModel (their configs) with Karlo's sampling."""

    decoder: dict[str, Any] = field(default_factory=dict)
    text_proj: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 768
    context_length: int = 77
    image_size: int = 64
    channels: int = 3
    diffusion: DiffusionConfig = field(default_factory=lambda: _karlo_diffusion(parameterization="eps", variance="learned_range"))
    sampling: DecoderSamplingDefaults = field(
        default_factory=lambda: DecoderSamplingDefaults(steps=25, sampler="ddpm", guidance_scale=8.0)
    )
    clip_sample_range: float | None = 1.0
    weights: str = "model.safetensors"
    kind: str = Stage.DECODER.kind
    family: str = DIFFUSERS


@dataclass
class DiffusersUpsamplerStageConfig:
    """Karlo's two super-resolution UNet2DModels (their configs): the first for every step but
    the last, the second for the last."""

    super_res_first: dict[str, Any] = field(default_factory=dict)
    super_res_last: dict[str, Any] = field(default_factory=dict)
    scale_factor: int = 4
    input_size: int = 64
    channels: int = 3
    diffusion: DiffusionConfig = field(default_factory=lambda: _karlo_diffusion(parameterization="eps"))
    sampling: SamplingDefaults = field(default_factory=lambda: SamplingDefaults(steps=7, sampler="ddpm"))
    clip_sample_range: float | None = 1.0
    weights: str = "model.safetensors"
    kind: str = Stage.UPSAMPLER.kind
    family: str = DIFFUSERS

    @property
    def size_multiple(self) -> int:
        """Output sides must divide by this: the network halves the resolution this many times."""
        return int(2 ** (len(self.super_res_first.get("block_out_channels", (0,))) - 1))


StageConfig = (
    ClipStageConfig | PriorStageConfig | DecoderStageConfig | UpsamplerStageConfig | DiffusersPriorStageConfig
    | DiffusersDecoderStageConfig | DiffusersUpsamplerStageConfig
)  # fmt: skip
# Each (checkpoint kind, family)'s config class; an engine class per config class is in
# unclip.stages.ENGINES.
STAGE_CONFIGS: dict[tuple[str, str], type] = {
    (Stage.ENCODER.kind, UNCLIP): ClipStageConfig,
    (Stage.PRIOR.kind, UNCLIP): PriorStageConfig,
    (Stage.DECODER.kind, UNCLIP): DecoderStageConfig,
    (Stage.UPSAMPLER.kind, UNCLIP): UpsamplerStageConfig,
    (Stage.ENCODER.kind, DIFFUSERS): ClipStageConfig,
    (Stage.PRIOR.kind, DIFFUSERS): DiffusersPriorStageConfig,
    (Stage.DECODER.kind, DIFFUSERS): DiffusersDecoderStageConfig,
    (Stage.UPSAMPLER.kind, DIFFUSERS): DiffusersUpsamplerStageConfig,
}


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**{key: _convert(hints[key], value) for key, value in data.items()})


def _convert(hint: Any, value: Any) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value)
    return value


def stage_config_from_dict(data: dict[str, Any]) -> StageConfig:
    kind, family = data.get("kind"), data.get("family", UNCLIP)
    kinds = sorted({k for k, _ in STAGE_CONFIGS})
    if kind not in kinds:
        raise ValueError(f"config.json: 'kind' must be one of {kinds}, got {kind!r}")
    if family not in FAMILIES:
        raise ValueError(f"config.json: 'family' must be one of {list(FAMILIES)}, got {family!r}")
    return from_dict(STAGE_CONFIGS[kind, family], data)
