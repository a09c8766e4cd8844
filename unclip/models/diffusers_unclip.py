"""diffusers' unCLIP networks (the ones Karlo ships) behind unclip's network interface.

Each wrapper takes tensors and returns tensors, as unclip's own networks do: `(x_t, original
timesteps [B], **conditioning) -> model output`. Sampling, guidance and batching stay with the
engines and `unclip.diffusion`; the diffusers modules only compute the network.

The wrappers are built from the component configs an imported checkpoint stores (the contents
of each diffusers component's config.json) and hold the components under the names the
checkpoint's safetensors keys start with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# diffusers is an optional extra (`unclip[diffusers]`); only imported checkpoints need it.
try:
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "this checkpoint was imported from diffusers and needs the diffusers extra: pip install 'unclip[diffusers]'"
    ) from error


def _build(cls: Any, config: dict[str, Any]) -> Any:
    # from_config ignores the "_class_name"/"_diffusers_version" bookkeeping keys.
    return cls.from_config(config)


class NullText(nn.Module):
    """Holds the text encoder's encoding of the empty prompt (saved with the checkpoint): the
    condition of guidance's unconditional pass for Karlo's prior and decoder."""

    def __init__(self, context_length: int, width: int):
        super().__init__()
        self.register_buffer("null_text_embed", torch.zeros(width))
        self.register_buffer("null_text_encodings", torch.zeros(context_length, width))
        self.register_buffer("null_text_mask", torch.zeros(context_length, dtype=torch.bool))


class PriorNetwork(NullText):
    """PriorTransformer: noisy normalised image embedding + text -> predicted clean embedding
    (in the normalised space: `denormalise` maps a sample back to CLIP's)."""

    def __init__(self, prior: dict[str, Any], context_length: int):
        built = _build(PriorTransformer, prior)
        super().__init__(context_length, built.config.embedding_dim)
        self.prior = built

    def forward(self, x: Tensor, t: Tensor, text_embed: Tensor, text_encodings: Tensor, text_mask: Tensor) -> Tensor:
        out = self.prior(x, timestep=t, proj_embedding=text_embed, encoder_hidden_states=text_encodings, attention_mask=text_mask)
        return out.predicted_image_embedding

    def denormalise(self, x: Tensor) -> Tensor:
        return self.prior.post_process_latents(x)


class DecoderNetwork(NullText):
    """UnCLIPTextProjModel + UNet2DConditionModel: noisy image + image embedding + caption ->
    predicted noise and variance (2 x channels). `project` turns a row's image embedding and
    caption into the UNet's conditioning once per call (it does not change between steps, and
    UnCLIPPipeline projects once too); `forward` runs the UNet on it."""

    def __init__(self, decoder: dict[str, Any], text_proj: dict[str, Any], context_length: int):
        projection = _build(UnCLIPTextProjModel, text_proj)
        super().__init__(context_length, projection.config.clip_embeddings_dim)
        self.decoder = _build(UNet2DConditionModel, decoder)
        self.text_proj = projection

    def project(
        self, image_embed: Tensor, drop_image: Tensor, text_embed: Tensor, text_encodings: Tensor, text_mask: Tensor
    ) -> dict[str, Tensor]:
        """The UNet's conditioning of each row. A row without its image embedding (the
        unconditional pass of guidance) passes `drop_image`: the learned null embedding replaces it.
        Each row is projected alone, so a row's conditioning never depends on its neighbours."""
        null = self.text_proj.learned_classifier_free_guidance_embeddings.to(image_embed.dtype)
        image_embed = torch.where(drop_image[:, None], null.expand_as(image_embed), image_embed)
        rows = [
            self.text_proj(
                image_embeddings=image_embed[i : i + 1],
                prompt_embeds=text_embed[i : i + 1],
                text_encoder_hidden_states=text_encodings[i : i + 1],
                do_classifier_free_guidance=False,
            )
            for i in range(image_embed.shape[0])
        ]
        extra = self.text_proj.clip_extra_context_tokens
        mask = torch.cat([text_mask.new_ones((text_mask.shape[0], int(extra))), text_mask], dim=1)
        return {
            "hidden": torch.cat([hidden for hidden, _ in rows]),
            "additive": torch.cat([additive for _, additive in rows]),
            "mask": mask,
        }

    def forward(self, x: Tensor, t: Tensor, hidden: Tensor, additive: Tensor, mask: Tensor) -> Tensor:
        return self.decoder(x, t, encoder_hidden_states=hidden, class_labels=additive, attention_mask=mask).sample


class SuperResNetwork(nn.Module):
    """Karlo's two super-resolution UNet2DModels: `first` for every step but the last, `last`
    for the last one (original timestep 0). The low-resolution image, upscaled to the output
    size, is concatenated to the noisy image."""

    def __init__(self, super_res_first: dict[str, Any], super_res_last: dict[str, Any]):
        super().__init__()
        self.super_res_first = _build(UNet2DModel, super_res_first)
        self.super_res_last = _build(UNet2DModel, super_res_last)

    def forward(self, x: Tensor, t: Tensor, low_res: Tensor) -> Tensor:
        inputs = torch.cat([x, low_res], dim=1)
        last = (t == 0)[:, None, None, None]
        # Each UNet sees the whole evaluation batch, so a row's output never depends on which
        # of the two its neighbours needed; a batch that needs only one runs only that one.
        if bool(last.all()):
            return self.super_res_last(inputs, t).sample
        first = self.super_res_first(inputs, t).sample
        if not bool(last.any()):
            return first
        return torch.where(last, self.super_res_last(inputs, t).sample, first)


def upscale(images: Tensor, size: tuple[int, int]) -> Tensor:
    """The low-resolution conditioning as Karlo builds it: antialiased bicubic to the output size."""
    return nn.functional.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
