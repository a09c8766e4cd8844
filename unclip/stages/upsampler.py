"""Stage 4 engine: a diffusion upsampler conditioned on a low-resolution image."""

from __future__ import annotations

import numpy as np
import torch

from unclip.calls import UpsampleCall
from unclip.cancel import CancelToken
from unclip.config import UpsamplerStageConfig
from unclip.errors import InvalidArgument
from unclip.models.unet import UNet
from unclip.options import SamplingOptions
from unclip.stage import Stage
from unclip.stages.engine import DiffusionEngine, Job, ProgressFn, row_generators
from unclip.stages.guidance import unguided
from unclip.stages.tensors import floats_to_unit, image_finish, images_to_unit, unit_to_images
from unclip.validation import MAX_OUTPUT_SIDE, check_array


class ImageUpsampler(DiffusionEngine):
    STAGE = Stage.UPSAMPLER
    config: UpsamplerStageConfig

    def __init__(self, config: UpsamplerStageConfig, model: torch.nn.Module, version: str = "unversioned", **options: int):
        super().__init__(config, model, version, **options)
        self.size_multiple = config.size_multiple

    @classmethod
    def build(cls, config: UpsamplerStageConfig) -> torch.nn.Module:
        return UNet(config.model)

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    def describe(self) -> dict[str, int]:
        return {**super().describe(), "scale_factor": self.scale_factor}

    # What a model family changes (unclip/stages/diffusers_family.py overrides these).

    @property
    def out_channels(self) -> int:
        return self.config.model.out_channels

    def low_res(self, images: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The network's conditioning for low-resolution images in [-1, 1] (`input_images`),
        upsampled to height x width."""
        return images.to(self.device)

    # Whether float32 images are taken as they are; unclip's upsamplers were trained on 8-bit
    # images, so theirs are rounded to 8 bits first.
    takes_float_images = False

    def input_images(self, images: np.ndarray) -> torch.Tensor:
        """A call's images (uint8, or float32 in [-1, 1]) in [-1, 1]."""
        if images.dtype != np.float32:
            return images_to_unit(images)
        unit = floats_to_unit(images)
        return unit if self.takes_float_images else images_to_unit(unit_to_images(unit))

    def denoise(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1, 1)

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
        """uint8 (or float32 in [-1, 1]) [B, h, w, 3] -> uint8 [B, h*f, w*f, 3]; convolutional, so any size that fits.
        `inpaint = (images, mask)` at the output size keeps the images' pixels where mask is False."""
        call = UpsampleCall(
            images, seeds=seeds, sampling=sampling, inpaint_images=None if inpaint is None else inpaint[0],
            inpaint_mask=None if inpaint is None else inpaint[1],
        )  # fmt: skip
        return self.run_one(self.job(call, cancel, progress))

    @torch.no_grad()
    def job(self, call: UpsampleCall, cancel: CancelToken | None = None, progress: ProgressFn | None = None) -> Job:
        images = call.images
        check_array(images, "images", shape=(None, None, None, 3), dtypes=[np.uint8, np.float32])
        batch, height, width, _ = images.shape
        seeds = self.check_rows(batch, "images", call.seeds)
        out_h, out_w = height * self.scale_factor, width * self.scale_factor
        if not (0 < out_h <= MAX_OUTPUT_SIDE and 0 < out_w <= MAX_OUTPUT_SIDE):
            raise InvalidArgument(
                f"images: {height}x{width} would upsample to {out_h}x{out_w}; the limit is {MAX_OUTPUT_SIDE} per side"
            )
        if out_h % self.size_multiple or out_w % self.size_multiple:
            raise InvalidArgument(
                f"images: output sides {out_h}x{out_w} must be multiples of {self.size_multiple} for this upsampler"
            )
        options = self.sampling_options(call.sampling)
        known = self.inpaint_condition(call.inpaint, batch, out_h, out_w)
        run = self.sampling_run(
            (batch, self.out_channels, out_h, out_w),
            row_generators(seeds, f"upsampler/x{self.scale_factor}"),
            options,
            denoised_fn=self.denoise,
            known=known,
        )
        low_res = self.low_res(self.input_images(images), out_h, out_w)
        return Job(run, unguided({"low_res": low_res}), image_finish(call.float_images), cancel, progress)
