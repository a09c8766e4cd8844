"""The engines of imported diffusers-format unCLIP weights (Karlo): the prior, decoder and
upsampler run diffusers' networks (unclip/models/diffusers_unclip.py) through the same
sampling, guidance and batching as unclip's own.

What differs from unclip's own models is how they are conditioned:
- embeddings stay as CLIP gives them (not unit-normalised), as Karlo was trained on them;
- the unconditional pass of guidance conditions on the encoding of the empty prompt (stored in
  the checkpoint) and, for the decoder, a learned null image embedding, instead of dropping;
- the decoder predicts its variance (learned_range), guided on the mean only;
- the upsampler is two networks, one for the last step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from unclip.config import DiffusersDecoderStageConfig, DiffusersPriorStageConfig, DiffusersUpsamplerStageConfig
from unclip.errors import InvalidArgument
from unclip.stages.decoder import ImageDecoder
from unclip.stages.prior import PriorSampler
from unclip.stages.upsampler import ImageUpsampler
from unclip.validation import check_array


def _null_rows(network: Any, rows: int, device: torch.device) -> dict[str, Tensor]:
    """The empty prompt's conditioning, one copy per row."""
    return {
        "text_embed": network.null_text_embed.expand(rows, -1).to(device),
        "text_encodings": network.null_text_encodings.expand(rows, -1, -1).to(device),
        "text_mask": network.null_text_mask.expand(rows, -1).to(device),
    }


class _Clipped:
    """Clamps predicted x_0 to the checkpoint's clip_sample_range, as UnCLIPScheduler does."""

    config: Any

    def denoise(self, x0: Tensor) -> Tensor:
        limit = self.config.clip_sample_range
        return x0 if limit is None else x0.clamp(-limit, limit)


class _TextConditioned(_Clipped):
    """Karlo's prior and decoder: CLIP embeddings and per-token states of one width."""

    @property
    def embed_dim(self) -> int:
        return int(self.config.embed_dim)

    @property
    def text_width(self) -> int:
        return int(self.config.embed_dim)


class DiffusersPrior(_TextConditioned, PriorSampler):
    config: DiffusersPriorStageConfig  # type: ignore[assignment]

    @classmethod
    def build(cls, config: DiffusersPriorStageConfig) -> torch.nn.Module:  # type: ignore[override]
        from unclip.models.diffusers_unclip import PriorNetwork

        return PriorNetwork(config.prior, config.context_length)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def check_text_length(self, length: int) -> None:
        if length != self.context_length:
            raise InvalidArgument(f"text_encodings: this prior takes exactly {self.context_length} tokens per text, got {length}")

    def conditions(self, text_embed: Tensor, encodings: Tensor, mask: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        cond = dict(text_embed=text_embed, text_encodings=encodings, text_mask=mask)
        return cond, _null_rows(self.model, text_embed.shape[0], self.device)

    def embeddings(self, samples: Tensor) -> Tensor:
        return self.model.denormalise(samples)  # type: ignore[operator]


class DiffusersDecoder(_TextConditioned, ImageDecoder):
    config: DiffusersDecoderStageConfig  # type: ignore[assignment]

    @classmethod
    def build(cls, config: DiffusersDecoderStageConfig) -> torch.nn.Module:  # type: ignore[override]
        from unclip.models.diffusers_unclip import DecoderNetwork

        return DecoderNetwork(config.decoder, config.text_proj, config.context_length)

    @property
    def out_channels(self) -> int:
        return self.config.channels

    def check_text(self, call: Any, batch: int) -> bool:
        """Karlo's decoder conditions on the caption's pooled embedding too; without a caption
        it conditions on the empty prompt, as Karlo's image variations do."""
        if call.text_encodings is None:
            if call.text_embeddings is not None:
                raise InvalidArgument("text_embeddings need text_encodings and text_mask")
            return False
        if call.text_embeddings is None:
            raise InvalidArgument("text_embeddings: this decoder needs the caption's CLIP text embedding with its encodings")
        length = self.config.context_length
        check_array(call.text_embeddings, "text_embeddings", shape=(batch, self.embed_dim), dtypes=[np.float32])
        check_array(call.text_encodings, "text_encodings", shape=(batch, length, self.text_width), dtypes=[np.float32])
        check_array(call.text_mask, "text_mask", shape=(batch, length), dtypes=[np.bool_])
        return True

    def conditions(
        self, image_embed: Tensor, text: tuple[Tensor, Tensor, Tensor] | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        rows = image_embed.shape[0]
        keep = torch.zeros(rows, dtype=torch.bool, device=self.device)
        null = _null_rows(self.model, rows, self.device)
        caption = null if text is None else dict(zip(("text_embed", "text_encodings", "text_mask"), text, strict=True))
        project: Any = self.model.project
        both = project(image_embed=image_embed, drop_image=keep, **caption)
        image_only = project(image_embed=image_embed, drop_image=keep, **null)
        uncond = project(image_embed=image_embed, drop_image=~keep, **null)
        return both, image_only, uncond

    def model_embedding(self, embeddings: np.ndarray) -> Tensor:
        return torch.from_numpy(embeddings)


class DiffusersUpsampler(_Clipped, ImageUpsampler):
    config: DiffusersUpsamplerStageConfig  # type: ignore[assignment]

    @classmethod
    def build(cls, config: DiffusersUpsamplerStageConfig) -> torch.nn.Module:  # type: ignore[override]
        from unclip.models.diffusers_unclip import SuperResNetwork

        return SuperResNetwork(config.super_res_first, config.super_res_last)

    @property
    def out_channels(self) -> int:
        return self.config.channels

    takes_float_images = True  # Karlo hands its decoder's images on unrounded

    def low_res(self, images: Tensor, height: int, width: int) -> Tensor:
        from unclip.models.diffusers_unclip import upscale

        return upscale(images, (height, width)).to(self.device)
