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
from unclip.stages.tensors import embedding_to_model_space, image_finish
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
        return {**super().describe(), "embed_dim": self.embed_dim, "image_size": self.image_size}

    def decode(
        self,
        image_embeddings: np.ndarray,
        seeds: list[int],
        *,
        text_encodings: np.ndarray | None = None,
        text_mask: np.ndarray | None = None,
        text_embeddings: np.ndarray | None = None,
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
            text_embeddings=text_embeddings, guidance_scale=guidance_scale, text_guidance_scale=text_guidance_scale,
            sampling=sampling, inpaint_images=None if inpaint is None else inpaint[0],
            inpaint_mask=None if inpaint is None else inpaint[1],
        )  # fmt: skip
        return self.run_one(self.job(call, cancel, progress))

    # What a model family changes (unclip/stages/diffusers_family.py overrides these).

    @property
    def embed_dim(self) -> int:
        return self.config.model.image_embed_dim

    @property
    def text_width(self) -> int:
        return self.config.model.text_width

    @property
    def out_channels(self) -> int:
        return self.config.model.out_channels

    def check_text(self, call: DecodeCall, batch: int) -> bool:
        """Check the call's caption inputs; whether the network will see them."""
        if call.text_encodings is None or self.text_width == 0:
            return False
        check_array(call.text_encodings, "text_encodings", shape=(batch, None, self.text_width), dtypes=[np.float32])
        check_array(call.text_mask, "text_mask", shape=call.text_encodings.shape[:2], dtypes=[np.bool_])  # type: ignore[arg-type]
        return True

    def model_embedding(self, embeddings: np.ndarray) -> torch.Tensor:
        return embedding_to_model_space(torch.from_numpy(embeddings))

    def conditions(
        self, image_embed: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    ) -> tuple[dict, dict, dict]:
        """The (image and caption, image only, unconditional) conditioning of guidance. `text`:
        the caption's (embeddings, encodings, mask) rows, or None without a caption."""
        batch = image_embed.shape[0]
        keep = torch.zeros(batch, dtype=torch.bool, device=self.device)
        both: dict[str, torch.Tensor] = dict(image_embed=image_embed, drop_image=keep)
        if self.text_width > 0:
            if text is None:
                encodings = torch.zeros((batch, 1, self.text_width), device=self.device)
                both |= dict(text_encodings=encodings, text_mask=torch.zeros((batch, 1), dtype=torch.bool, device=self.device))
                both["drop_text"] = ~keep
            else:
                both |= dict(text_encodings=text[1], text_mask=text[2], drop_text=keep)
        # Unconditional for guidance: both the image embedding and the text dropped.
        uncond = {**both, "drop_image": ~keep}
        if "drop_text" in both:
            uncond["drop_text"] = ~keep
        return both, {**both, "drop_text": ~keep}, uncond

    def denoise(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1, 1)

    @torch.no_grad()
    def job(self, call: DecodeCall, cancel: CancelToken | None = None, progress: ProgressFn | None = None) -> Job:
        image_embeddings = call.image_embeddings
        batch = image_embeddings.shape[0] if image_embeddings.ndim else 0
        seeds = self.check_rows(batch, "image_embeddings", call.seeds)
        check_array(image_embeddings, "image_embeddings", shape=(None, self.embed_dim), dtypes=[np.float32])
        if (call.text_encodings is None) != (call.text_mask is None):
            raise InvalidArgument("text_encodings and text_mask must be given together")
        scale = check_guidance(call.guidance_scale, self.config.sampling.guidance_scale)
        text_default = self.config.sampling.text_guidance_scale
        text_scale = check_guidance(
            call.text_guidance_scale, scale if text_default is None else text_default, "text_guidance_scale"
        )
        options = self.sampling_options(call.sampling)

        with_text = self.check_text(call, batch)
        device = self.device
        text = None
        if with_text:
            assert call.text_encodings is not None and call.text_mask is not None
            embeddings = None if call.text_embeddings is None else torch.from_numpy(call.text_embeddings).to(device)
            text = (embeddings, torch.from_numpy(call.text_encodings).to(device), torch.from_numpy(call.text_mask).to(device))
        both, image_only, uncond = self.conditions(self.model_embedding(image_embeddings).to(device), text)  # type: ignore[arg-type]
        variance = self.diffusion.learned_variance
        if with_text and text_scale != scale:
            # The image embedding first, then the caption on top: a stronger pull toward the
            # caption's words helps where the embedding is ambiguous (colour-shape pairs the
            # decoder never saw). The image-only pass is one the decoder trained on often (45% of
            # rows); a text-only pass (5%) would be the weaker base.
            guidance = guided_two_conditions(both, image_only, uncond, scale, text_scale, learned_variance=variance)
        else:
            guidance = guided(both, uncond, scale, learned_variance=variance)
        size = self.image_size
        run = self.sampling_run(
            (batch, self.out_channels, size, size),
            row_generators(seeds, "decoder"),
            options,
            denoised_fn=self.denoise,
            known=self.inpaint_condition(call.inpaint, batch, size, size),
        )
        return Job(run, guidance, image_finish(call.float_images), cancel, progress)
