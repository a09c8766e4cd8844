"""The training objective of each stage, fed exactly what its inference engine feeds the model.

An objective is a module holding the network being trained (`.model`, what the checkpoint
saves) plus anything frozen it needs (CLIP), and maps a batch of uint8 images and captions to a
scalar loss. All randomness (timesteps, noise, condition dropout, crops, blur) is drawn from the
generator passed in, so a run is reproducible and resumable from the generator's state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor

from unclip.config import ClipStageConfig, DecoderStageConfig, PriorStageConfig, StageConfig, UpsamplerStageConfig
from unclip.diffusion import GaussianDiffusion
from unclip.models.clip import create_clip, encode_text_tokens, preprocess_images
from unclip.models.prior import DiffusionPrior
from unclip.models.unet import UNet
from unclip.stages import default_checkpoint
from unclip.stages.engine import build_diffusion
from unclip.stages.tensors import embedding_to_model_space, images_to_unit
from unclip.train.data import Batch
from unclip.validation import check_fraction

# Classifier-free guidance: the fraction of rows trained without each condition (DALL-E 2's values).
DECODER_DROP_IMAGE = 0.1
DEFAULT_DROP_TEXT = {"prior": 0.1, "decoder": 0.5}  # the caption; --drop-text sets another share
# Upsampler conditioning augmentation: the low-res image is blurred with sigma ~ U(0, this), in low-res pixels.
MAX_BLUR_SIGMA = 1.0
DEFAULT_LR = {"clip": 5e-4, "prior": 3e-4, "decoder": 2e-4, "upsampler": 2e-4}


def to_unit(images: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], as `images_to_unit` does."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def downscale(x: Tensor, size: int) -> Tensor:
    """Antialiased bicubic resize of [B, C, H, W] to size x size."""
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def gaussian_blur(x: Tensor, sigmas: Tensor) -> Tensor:
    """Blur each row of [B, C, H, W] with its own sigma (0 = unchanged), reflecting at the borders."""
    batch, channels, height, width = x.shape
    radius = max(1, int(np.ceil(3 * float(sigmas.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigmas.clamp(min=1e-6)[:, None]) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [B*C, K]
    h = F.pad(x.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
    h = F.conv2d(h, kernels[:, None, None, :], groups=batch * channels)  # along the width
    h = F.conv2d(h, kernels[:, None, :, None], groups=batch * channels)  # along the height
    return h.reshape(batch, channels, height, width)


def random_timesteps(batch: int, timesteps: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, timesteps, (batch,), generator=generator)


def bernoulli(batch: int, p: float, generator: torch.Generator) -> Tensor:
    return torch.rand(batch, generator=generator) < p


class FrozenClip(nn.Module):
    """A trained CLIP, loaded as the encoder service loads it, computing what the encoder serves."""

    def __init__(self, directory: str | Path):
        super().__init__()
        from unclip.stages.clip import ClipEncoder

        encoder = ClipEncoder.from_checkpoint(directory)
        self.model = encoder.model
        self.tokenizer = encoder.tokenizer

    def train(self, mode: bool = True) -> FrozenClip:
        return super().train(False)  # always in eval mode, even inside a training objective

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(unit-norm text embeddings [B, D], per-token states [B, L, W], token mask [B, L]) as `ClipEncoder.encode_text`."""
        tokens = self.tokenizer(captions).to(device)
        pooled, states = encode_text_tokens(self.model, tokens)
        return F.normalize(pooled.float(), dim=-1), states.float(), tokens != 0

    @torch.no_grad()
    def encode_image(self, images: Tensor, device: torch.device) -> Tensor:
        """Unit-norm image embeddings [B, D] of uint8 [B, H, W, 3] images, as `ClipEncoder.encode_image`."""
        pixels = preprocess_images(self.model, images).to(device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)


class Objective(nn.Module):
    kind: str
    use_ema: bool = True  # the diffusion models serve EMA weights
    config: Any
    model: nn.Module
    diffusion: GaussianDiffusion  # the diffusion stages'

    def __init__(self, config: StageConfig, model: nn.Module):
        super().__init__()
        self.config = config
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, batch: Batch, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def diffusion_loss(self, output: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The batch's mean loss for a diffusion stage, weighted as its config says."""
        return self.diffusion.training_losses(output.float(), x0, noise, t, self.config.diffusion.min_snr_gamma).mean()


class ClipObjective(Objective):
    """Contrastive image-text loss of open_clip."""

    kind = "clip"
    use_ema = False
    config: ClipStageConfig
    model: Any  # an open_clip CLIP

    def __init__(self, config: ClipStageConfig):
        super().__init__(config, create_clip(config.model_name))
        self.tokenizer = open_clip.get_tokenizer(config.model_name)
        self.contrastive_loss = ClipLoss()

    def forward(self, batch: Batch, generator: torch.Generator) -> Tensor:
        device = self.device
        pixels = preprocess_images(self.model, batch["images"]).to(device)
        tokens = self.tokenizer(batch["captions"]).to(device)
        image_features = self.model.encode_image(pixels, normalize=True)
        text_features = self.model.encode_text(tokens, normalize=True)
        # CLIP caps the temperature at 100 so that the logits cannot blow up.
        logit_scale = self.model.logit_scale.exp().clamp(max=100.0)
        return self.contrastive_loss(image_features.float(), text_features.float(), logit_scale.float())


class PriorObjective(Objective):
    """Text embedding + token states -> clean CLIP image embedding (x0 parameterisation per config)."""

    kind = "prior"
    config: PriorStageConfig

    def __init__(self, config: PriorStageConfig, clip: FrozenClip, drop_text: float):
        super().__init__(config, DiffusionPrior(config.model))
        self.drop_text = check_fraction(drop_text, "drop_text")
        cfg = config.model
        if (cfg.embed_dim, cfg.text_width) != (clip.embed_dim, clip.text_width) or cfg.context_length < clip.context_length:
            raise ValueError(
                f"prior (embed_dim {cfg.embed_dim}, text_width {cfg.text_width}, context_length {cfg.context_length}) "
                f"does not fit the CLIP (embed_dim {clip.embed_dim}, width {clip.text_width}, context {clip.context_length})"
            )
        self.clip = clip
        self.diffusion = build_diffusion(config.diffusion)

    def forward(self, batch: Batch, generator: torch.Generator) -> Tensor:
        device = self.device
        text_emb, text_states, text_mask = self.clip.encode_text(batch["captions"], device)
        x0 = embedding_to_model_space(self.clip.encode_image(batch["images"], device))
        rows = x0.shape[0]
        t = random_timesteps(rows, self.diffusion.num_timesteps, generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        drop_text = bernoulli(rows, self.drop_text, generator).to(device)
        x_t = self.diffusion.q_sample(x0, t, noise)
        output = self.model(
            x_t,
            t,
            text_embed=embedding_to_model_space(text_emb),
            text_encodings=text_states,
            text_mask=text_mask,
            drop_text=drop_text,
        )
        return self.diffusion_loss(output, x0, noise, t)


class DecoderObjective(Objective):
    """CLIP image embedding (+ text tokens) -> image at config.image_size."""

    kind = "decoder"
    config: DecoderStageConfig

    def __init__(self, config: DecoderStageConfig, clip: FrozenClip, drop_text: float):
        super().__init__(config, UNet(config.model))
        self.drop_text = check_fraction(drop_text, "drop_text")
        cfg = config.model
        if cfg.image_embed_dim != clip.embed_dim or cfg.text_width not in (0, clip.text_width):
            raise ValueError(
                f"decoder (image_embed_dim {cfg.image_embed_dim}, text_width {cfg.text_width}) does not fit "
                f"the CLIP (embed_dim {clip.embed_dim}, width {clip.text_width})"
            )
        self.clip = clip
        self.diffusion = build_diffusion(config.diffusion)

    def forward(self, batch: Batch, generator: torch.Generator) -> Tensor:
        device = self.device
        images = batch["images"]
        x0 = downscale(to_unit(images), self.config.image_size).clamp(-1, 1).to(device)
        rows = x0.shape[0]
        conditioning = {
            "image_embed": embedding_to_model_space(self.clip.encode_image(images, device)),
            "drop_image": bernoulli(rows, DECODER_DROP_IMAGE, generator).to(device),
        }
        if self.config.model.text_width > 0:
            _, text_states, text_mask = self.clip.encode_text(batch["captions"], device)
            drop_text = bernoulli(rows, self.drop_text, generator).to(device)
            conditioning |= {"text_encodings": text_states, "text_mask": text_mask, "drop_text": drop_text}
        t = random_timesteps(rows, self.diffusion.num_timesteps, generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        output = self.model(self.diffusion.q_sample(x0, t, noise), t, **conditioning)
        return self.diffusion_loss(output, x0, noise, t)


class UpsamplerObjective(Objective):
    """Blurred, quantised low-res crop -> the high-res crop.

    The network is convolutional, so it trains on crops (by default a quarter of the target side:
    32x32 out of 128x128 for the x4 model, config.train_crop_size) and upsamples whole images at
    inference.
    """

    kind = "upsampler"
    config: UpsamplerStageConfig

    def __init__(self, config: UpsamplerStageConfig):
        super().__init__(config, UNet(config.model))
        self.diffusion = build_diffusion(config.diffusion)
        output_side = config.input_size * config.scale_factor
        self.crop_size = config.train_crop_size or output_side // 4
        size_multiple = 2 ** (len(config.model.channel_mult) - 1)
        if not 0 < self.crop_size <= output_side or self.crop_size % (config.scale_factor * size_multiple):
            raise ValueError(
                f"upsampler crops of {self.crop_size} px must lie in (0, {output_side}] and be multiples of "
                f"scale_factor x {size_multiple} (input_size {config.input_size}, scale_factor {config.scale_factor})"
            )

    def forward(self, batch: Batch, generator: torch.Generator) -> Tensor:
        device = self.device
        images = batch["images"]
        rows, height, width, _ = images.shape
        crop = self.crop_size
        if height < crop or width < crop:
            raise ValueError(f"upsampler: images of {height}x{width} are smaller than its {crop}x{crop} crops")
        tops = torch.randint(0, height - crop + 1, (rows,), generator=generator).tolist()
        lefts = torch.randint(0, width - crop + 1, (rows,), generator=generator).tolist()
        crops = torch.stack([image[y : y + crop, x : x + crop] for image, y, x in zip(images, tops, lefts, strict=True)])

        # The low-res input as inference sees it: a smaller (blurred) image, stored as uint8.
        low = downscale(crops.permute(0, 3, 1, 2).float(), crop // self.config.scale_factor)
        low = gaussian_blur(low, torch.rand(rows, generator=generator) * MAX_BLUR_SIGMA)
        low_uint8 = low.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        low_res = images_to_unit(low_uint8).to(device)

        x0 = to_unit(crops).to(device)
        t = random_timesteps(rows, self.diffusion.num_timesteps, generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        output = self.model(self.diffusion.q_sample(x0, t, noise), t, low_res=low_res)
        return self.diffusion_loss(output, x0, noise, t)


def make_objective(config: StageConfig, clip: str | Path | None = None, drop_text: float | None = None) -> Objective:
    """The objective for `config`'s stage; prior and decoder use the frozen CLIP checkpoint `clip`
    (default: the shipped one) and train `drop_text` of their rows without the caption (default:
    DEFAULT_DROP_TEXT). Seed torch first: the network is freshly initialised."""
    if drop_text is not None and config.kind not in DEFAULT_DROP_TEXT:
        raise ValueError(f"drop_text applies to the prior and decoder; the {config.kind} stage has no caption dropout")
    if isinstance(config, ClipStageConfig):
        return ClipObjective(config)
    if isinstance(config, UpsamplerStageConfig):
        return UpsamplerObjective(config)
    frozen = FrozenClip(clip if clip is not None else default_checkpoint("clip"))
    drop_text = DEFAULT_DROP_TEXT[config.kind] if drop_text is None else drop_text
    if isinstance(config, PriorStageConfig):
        return PriorObjective(config, frozen, drop_text)
    if isinstance(config, DecoderStageConfig):
        return DecoderObjective(config, frozen, drop_text)
    raise TypeError(f"no training objective for {type(config).__name__}")
