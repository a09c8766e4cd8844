"""Gaussian diffusion math for the prior and the decoders; networks are plain callables passed in."""

from unclip.diffusion.gaussian import PARAMETERIZATIONS, GaussianDiffusion
from unclip.diffusion.respace import respace, respace_to_steps, space_timesteps
from unclip.diffusion.sampling import (
    SAMPLERS,
    SamplingRun,
    classifier_free_guidance,
    row_noise,
    sample,
    two_condition_guidance,
)
from unclip.diffusion.schedules import SCHEDULES, cosine_betas, linear_betas, make_betas

__all__ = [
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "SCHEDULES",
    "GaussianDiffusion",
    "SamplingRun",
    "classifier_free_guidance",
    "cosine_betas",
    "linear_betas",
    "make_betas",
    "respace",
    "respace_to_steps",
    "row_noise",
    "sample",
    "space_timesteps",
    "two_condition_guidance",
]
