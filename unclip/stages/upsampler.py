"""Stage 4 engine: a diffusion upsampler conditioned on a low-resolution image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unclip.config import UpsamplerStageConfig
from unclip.errors import InvalidArgument
from unclip.models.unet import UNet
from unclip.options import SamplingOptions
from unclip.stages.base import (
    MAX_BATCH,
    CancelToken,
    ProgressFn,
    StageStats,
    build_diffusion,
    images_to_unit,
    inpaint_condition,
    load_module,
    one_row_at_a_time,
    row_generators,
    sample_rows,
    unit_to_images,
)
from unclip.validation import check_array, check_batch, check_seeds

MAX_OUTPUT_SIDE = 1024


class ImageUpsampler:
    def __init__(self, config: UpsamplerStageConfig, model: UNet, version: str = "unversioned"):
        self.config = config
        self.version = version
        self.device = next(model.parameters()).device
        self.model = model
        self.diffusion = build_diffusion(config.diffusion)
        self.stats = StageStats()
        # The network halves the resolution this many times, so output sides must divide by it.
        self.size_multiple = 2 ** (len(config.model.channel_mult) - 1)

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> ImageUpsampler:
        return cls(*load_module(directory, "upsampler", lambda c: UNet(c.model)))

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    @torch.no_grad()
    def upsample(
        self,
        images: np.ndarray,
        seeds: list[int],
        *,
        sampling: SamplingOptions = SamplingOptions(),
        cancel: CancelToken | None = None,
        progress: ProgressFn | None = None,
        inpaint: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """uint8 [B, h, w, 3] -> uint8 [B, h*f, w*f, 3]; convolutional, so any size that fits.
        `inpaint = (images, mask)` at the output size keeps the images' pixels where mask is False."""
        check_array(images, "images", shape=(None, None, None, 3), dtypes=[np.uint8])
        batch, height, width, _ = images.shape
        check_batch(batch, "images", MAX_BATCH)
        out_h, out_w = height * self.scale_factor, width * self.scale_factor
        if not (0 < out_h <= MAX_OUTPUT_SIDE and 0 < out_w <= MAX_OUTPUT_SIDE):
            raise InvalidArgument(
                f"images: {height}x{width} would upsample to {out_h}x{out_w}; the limit is {MAX_OUTPUT_SIDE} per side"
            )
        if out_h % self.size_multiple or out_w % self.size_multiple:
            raise InvalidArgument(
                f"images: output sides {out_h}x{out_w} must be multiples of {self.size_multiple} for this upsampler"
            )
        seeds = check_seeds(seeds, batch)
        options = sampling.resolve(self.config.sampling, self.config.diffusion.timesteps)
        known = inpaint_condition(inpaint, batch, out_h, out_w, self.device)
        low_res = images_to_unit(images).to(self.device)
        row_model = one_row_at_a_time(self.model)
        samples = sample_rows(
            self.diffusion,
            lambda x_t, t: row_model(x_t, t, low_res=low_res),
            (batch, self.config.model.out_channels, out_h, out_w),
            row_generators(seeds, f"upsampler/x{self.scale_factor}"),
            options,
            self.stats,
            cancel=cancel,
            denoised_fn=lambda x0: x0.clamp(-1, 1),
            progress=progress,
            known=known,
            device=self.device,
        )
        return unit_to_images(samples)
