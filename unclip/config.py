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
from unclip.stage import Stage


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "cosine"
    parameterization: str = "eps"  # eps | x0 | v
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
    kind: str = Stage.ENCODER.kind


@dataclass
class PriorStageConfig:
    model: PriorConfig = field(default_factory=PriorConfig)
    # DALL-E 2's prior predicts the clean embedding directly.
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(parameterization="x0"))
    sampling: SamplingDefaults = field(default_factory=lambda: SamplingDefaults(steps=32, guidance_scale=2.0))
    weights: str = "model.safetensors"
    kind: str = Stage.PRIOR.kind


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


StageConfig = ClipStageConfig | PriorStageConfig | DecoderStageConfig | UpsamplerStageConfig
STAGE_CONFIGS: dict[str, type] = {
    Stage.ENCODER.kind: ClipStageConfig,
    Stage.PRIOR.kind: PriorStageConfig,
    Stage.DECODER.kind: DecoderStageConfig,
    Stage.UPSAMPLER.kind: UpsamplerStageConfig,
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
    kind = data.get("kind")
    if kind not in STAGE_CONFIGS:
        raise ValueError(f"config.json: 'kind' must be one of {sorted(STAGE_CONFIGS)}, got {kind!r}")
    return from_dict(STAGE_CONFIGS[kind], data)
