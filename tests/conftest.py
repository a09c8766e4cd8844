"""Shared fixtures and tiny configs. Servers are started by the tests themselves, on 127.0.0.1 only."""

from __future__ import annotations

import dataclasses

import pytest

from unclip.config import DecoderStageConfig, DiffusionConfig, PriorStageConfig, SamplingDefaults, UpsamplerStageConfig
from unclip.models.prior import PriorConfig
from unclip.models.unet import decoder_config_tiny, upsampler_config_tiny

# Few denoising steps: the tests check plumbing and determinism, not image quality.
FAST_STEPS = dict(prior_steps=3, decoder_steps=3, upsampler_steps=2)


@pytest.fixture(scope="session")
def local_stages():
    """The four engines with the shipped weights, loaded once per test session."""
    from unclip.local import LocalStages

    return LocalStages.load()


@pytest.fixture(scope="session")
def local_stages_batched():
    """The shipped engines at the compute batches of parameter_cases.BATCHED (room for several
    requests' rows in one evaluation, so concurrent calls share them)."""
    from parameter_cases import BATCHED

    from unclip.local import LocalStages
    from unclip.stages.batcher import BatchSettings, compute_batches

    return LocalStages.load(settings={stage: BatchSettings(compute_batch=n) for stage, n in compute_batches(BATCHED).items()})


@pytest.fixture(scope="session")
def karlo(tmp_path_factory):
    """The tiny pipelines (in memory), saved as diffusers directories and imported twice:
    with the variation pipeline's image encoder and without."""
    import karlo_fixtures as kf

    from unclip.importers.diffusers_format import import_pipeline
    from unclip.local import LocalStages

    root = tmp_path_factory.mktemp("karlo")
    text = kf.text_pipeline()
    variation = kf.variation_pipeline(text)
    src, var = kf.save(text, root / "src"), kf.save(variation, root / "var")
    with_images = import_pipeline(src, root / "weights", variations=var)
    text_only = import_pipeline(src, root / "text-only")
    stages = LocalStages.load(with_images)
    yield {"text": text, "variation": variation, "src": src, "var": var, "root": root, "weights": with_images,
           "text_only": text_only, "stages": stages}  # fmt: skip
    stages.shutdown()


# -- tiny stage configs: networks small enough to build and run in milliseconds ---------------


def tiny_prior_config() -> PriorStageConfig:
    return PriorStageConfig(
        model=PriorConfig(width=32, layers=1, heads=2),
        diffusion=DiffusionConfig(timesteps=100, schedule="linear", parameterization="x0"),
        sampling=SamplingDefaults(steps=7, sampler="ddpm", eta=0.5, guidance_scale=1.5),
    )


def tiny_decoder_config() -> DecoderStageConfig:
    model = dataclasses.replace(
        decoder_config_tiny(),
        model_channels=16,
        num_head_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_downsample_rates=(2,),
        num_image_tokens=2,
        position_embedding_size=16,
    )
    return DecoderStageConfig(model=model, image_size=16, weights="decoder.safetensors")


def tiny_upsampler_config() -> UpsamplerStageConfig:
    model = dataclasses.replace(upsampler_config_tiny(), model_channels=16, channel_mult=(1, 2))
    return UpsamplerStageConfig(model=model, scale_factor=2, input_size=8)
