"""Stage 3 engine: the diffusion decoder, CLIP image embedding -> small image."""

from __future__ import annotations

import numpy as np
import torch

from unclip.calls import DecodeCall
from unclip.cancel import CancelToken
from unclip.config import DecoderStageConfig
from unclip.errors import InvalidArgument
from unclip.models.unet import UNet
from unclip.options import SamplingOptions
from unclip.stage import Stage
from unclip.stages.engine import DiffusionEngine, Job, ProgressFn, row_generators
from unclip.stages.guidance import guided, guided_two_conditions
from unclip.stages.tensors import embedding_to_model_space, unit_to_images
from unclip.validation import check_array, check_guidance


class ImageDecoder(DiffusionEngine):
    STAGE = Stage.DECODER
    config: DecoderStageConfig

    @classmethod
    def build(cls, config: DecoderStageConfig) -> torch.nn.Module:
        return UNet(config.model)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def describe(self) -> dict[str, int]:
        return {**super().describe(), "embed_dim": self.config.model.image_embed_dim, "image_size": self.image_size}

    def decode(
        self,
        image_embeddings: np.ndarray,
        seeds: list[int],
        *,
        text_encodings: np.ndarray | None = None,
        text_mask: np.ndarray | None = None,
        guidance_scale: float | None = None,
        text_guidance_scale: float | None = None,
        sampling: SamplingOptions = SamplingOptions(),
        cancel: CancelToken | None = None,
        progress: ProgressFn | None = None,
        inpaint: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """uint8 images [B, S, S, 3]. Text encodings are used by decoders trained with them and
        ignored otherwise; without them a text-conditioned decoder decodes from the image alone.
        With text, `guidance_scale` guides by the image embedding and `text_guidance_scale`
        (default: the checkpoint's; unset there too: the same as `guidance_scale`) by the caption
        on top of it, at the cost of a third network pass per step.
        `inpaint = (images, mask)` keeps the images' pixels where mask is False."""
        call = DecodeCall(
            image_embeddings, seeds=seeds, text_encodings=text_encodings, text_mask=text_mask,
            guidance_scale=guidance_scale, text_guidance_scale=text_guidance_scale, sampling=sampling,
            inpaint_images=None if inpaint is None else inpaint[0], inpaint_mask=None if inpaint is None else inpaint[1],
        )  # fmt: skip
        return self.run_one(self.job(call, cancel, progress))

    @torch.no_grad()
    def job(self, call: DecodeCall, cancel: CancelToken | None = None, progress: ProgressFn | None = None) -> Job:
        cfg = self.config.model
        image_embeddings, text_encodings, text_mask = call.image_embeddings, call.text_encodings, call.text_mask
        batch = image_embeddings.shape[0] if image_embeddings.ndim else 0
        seeds = self.check_rows(batch, "image_embeddings", call.seeds)
        check_array(image_embeddings, "image_embeddings", shape=(None, cfg.image_embed_dim), dtypes=[np.float32])
        if (text_encodings is None) != (text_mask is None):
            raise InvalidArgument("text_encodings and text_mask must be given together")
        scale = check_guidance(call.guidance_scale, self.config.sampling.guidance_scale)
        text_default = self.config.sampling.text_guidance_scale
        text_scale = check_guidance(
            call.text_guidance_scale, scale if text_default is None else text_default, "text_guidance_scale"
        )
        options = self.sampling_options(call.sampling)

        with_text = text_encodings is not None and cfg.text_width > 0
        device = self.device
        keep = torch.zeros(batch, dtype=torch.bool, device=device)
        cond = dict(image_embed=embedding_to_model_space(torch.from_numpy(image_embeddings)).to(device), drop_image=keep)
        if cfg.text_width > 0:
            if text_encodings is None or text_mask is None:
                text_encodings = np.zeros((batch, 1, cfg.text_width), np.float32)
                text_mask = np.zeros((batch, 1), np.bool_)
                text_dropped = ~keep
            else:
                check_array(text_encodings, "text_encodings", shape=(batch, None, cfg.text_width), dtypes=[np.float32])
                check_array(text_mask, "text_mask", shape=text_encodings.shape[:2], dtypes=[np.bool_])
                text_dropped = keep
            cond |= dict(
                text_encodings=torch.from_numpy(text_encodings).to(device),
                text_mask=torch.from_numpy(text_mask).to(device),
                drop_text=text_dropped,
            )
        # Unconditional for guidance: both the image embedding and the text dropped.
        uncond = {**cond, "drop_image": ~keep}
        if "drop_text" in cond:
            uncond["drop_text"] = ~keep
        if with_text and text_scale != scale:
            # The image embedding first, then the caption on top: a stronger pull toward the
            # caption's words helps where the embedding is ambiguous (colour-shape pairs the
            # decoder never saw). The image-only pass is one the decoder trained on often (45% of
            # rows); a text-only pass (5%) would be the weaker base.
            image_only = {**cond, "drop_text": ~keep}
            guidance = guided_two_conditions(cond, image_only, uncond, scale, text_scale)
        else:
            guidance = guided(cond, uncond, scale)
        size = self.config.image_size
        run = self.sampling_run(
            (batch, cfg.out_channels, size, size),
            row_generators(seeds, "decoder"),
            options,
            denoised_fn=lambda x0: x0.clamp(-1, 1),
            known=self.inpaint_condition(call.inpaint, batch, size, size),
        )
        return Job(run, guidance, unit_to_images, cancel, progress)
