"""GLIDE-style UNet used for the unCLIP decoder (64px-like base model) and the upsamplers.

Conditioning, as in DALL-E 2's decoder:
  * the timestep embedding, plus a projection of the CLIP image embedding, drives every ResBlock
    through a scale-shift of its second GroupNorm;
  * "context tokens" (the image embedding projected to `num_image_tokens` tokens, followed by the
    projected per-token text encodings) are extra keys/values in every attention block.
The upsampler variant concatenates the bilinearly resized low-resolution image to its input.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from unclip.models.layers import TimestepMLP, group_norm, multi_head_attention, zero_module


@dataclass
class UNetConfig:
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_downsample_rates: tuple[int, ...] = (
        2,
        4,
    )  # attention at these downsample factors (1 = full res); empty = fully convolutional
    num_head_channels: int = 32
    dropout: float = 0.0
    image_embed_dim: int = 0  # >0: condition on a CLIP image embedding (the decoder)
    num_image_tokens: int = 4  # the image embedding is projected into this many extra attention tokens
    text_width: int = 0  # >0: per-token text encodings are extra attention tokens as well
    low_res_channels: int = 0  # >0: the upsampler; a low-res image is resized to x's size and concatenated to the input
    # >0: the side the network runs at; each attention block then adds a learned embedding of every
    # spatial position to its input. Convolutions see position only through border effects, so
    # without it a context token ("in the top left corner") has no place to attend to.
    position_embedding_size: int = 0
    # Add a (zero-initialised) convolution of the pixel's own (x, y) to the input features, as
    # CoordConv does: a scale and shift from a global embedding can then switch features on at one
    # place only, which is how an embedding that says "top left" gets its object drawn there.
    coordinate_channels: bool = False
    # text_width > 0: also add a projection of the text tokens' masked mean to the timestep
    # embedding, as GLIDE adds its text encoder's summary token, so that every residual block (not
    # only attention) hears the words. A frozen CLIP's pooled token ignores words its contrastive
    # loss never needed (positions, say); the mean of all token states keeps them.
    text_in_embedding: bool = False


def decoder_config_tiny() -> UNetConfig:
    """32x32 base decoder conditioned on a 64-d CLIP image embedding and 64-wide text encodings.

    Sized to train on a CPU in hours: one residual block per level, and attention (where the
    image and text tokens come in) at 8x8 only, which is fine enough for a 3x3 grid of places.
    """
    return UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_downsample_rates=(4,),
        image_embed_dim=64,
        text_width=64,
        position_embedding_size=32,
        coordinate_channels=True,
    )


def upsampler_config_tiny() -> UNetConfig:
    """Fully convolutional x4 upsampler (trained 32 -> 128); runs at any size divisible by 4."""
    return UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_downsample_rates=(),
        low_res_channels=3,
    )


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.embed_proj = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, embed: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = self.embed_proj(embed)[..., None, None].chunk(2, dim=1)
        # (1 + scale) so a zero projection leaves the normalised features untouched.
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions whose keys/values also include the context tokens."""

    def __init__(self, channels: int, num_head_channels: int, context_dim: int, side: int = 0):
        super().__init__()
        self.heads = channels // num_head_channels
        self.side = side
        # Zero-initialised: a network gains it without changing what it computes.
        self.position = nn.Parameter(torch.zeros(side * side, channels)) if side > 0 else None
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim > 0 else None
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.position is not None:
            if (height, width) != (self.side, self.side):
                raise ValueError(
                    f"this network has position embeddings for {self.side}x{self.side} features, got {height}x{width}"
                )
            tokens = tokens + self.position
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        mask = None
        if context is not None:
            if self.context_kv is None or context_mask is None:
                raise ValueError("context tokens need a context_mask and a block built with context_dim > 0")
            context_k, context_v = self.context_kv(context).chunk(2, dim=-1)
            k = torch.cat([context_k, k], dim=1)
            v = torch.cat([context_v, v], dim=1)
            # Spatial keys are always visible, so a query row is never fully masked.
            spatial_visible = context_mask.new_ones(batch, height * width)
            mask = torch.cat([context_mask, spatial_visible], dim=1)[:, None, None, :]
        out = multi_head_attention(q, k, v, self.heads, mask)
        return x + self.proj_out(out).transpose(1, 2).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ConditionedSequential(nn.ModuleList):
    """Runs its modules in order, handing each the conditioning it takes."""

    def forward(self, x: Tensor, embed: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        for module in self:
            if isinstance(module, ResBlock):
                x = module(x, embed)
            elif isinstance(module, AttentionBlock):
                x = module(x, context, context_mask)
            else:
                x = module(x)
        return x


def coordinate_grid(batch: int, height: int, width: int, like: Tensor) -> Tensor:
    """[B, 2, H, W]: each pixel centre's x and y, from -1 (left, top) to 1 (right, bottom)."""
    ys = torch.linspace(-1, 1, height, dtype=like.dtype, device=like.device)
    xs = torch.linspace(-1, 1, width, dtype=like.dtype, device=like.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])[None].expand(batch, -1, -1, -1)


def validate_config(config: UNetConfig) -> None:
    for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "num_head_channels"):
        if getattr(config, name) < 1:
            raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(config, name)}")
    for name in ("image_embed_dim", "text_width", "low_res_channels", "position_embedding_size"):
        if getattr(config, name) < 0:
            raise ValueError(f"UNetConfig.{name} must be >= 0, got {getattr(config, name)}")
    if not config.channel_mult or min(config.channel_mult) < 1:
        raise ValueError(f"UNetConfig.channel_mult must be a non-empty tuple of positive ints, got {config.channel_mult}")
    reachable_rates = [2**level for level in range(len(config.channel_mult))]
    for rate in config.attention_downsample_rates:
        if rate not in reachable_rates:
            raise ValueError(
                f"attention_downsample_rates contains {rate}, but a UNet with {len(config.channel_mult)} levels "
                f"only has downsample factors {reachable_rates}"
            )
        channels = config.model_channels * config.channel_mult[reachable_rates.index(rate)]
        if channels % config.num_head_channels:
            raise ValueError(
                f"attention at downsample factor {rate} has {channels} channels, "
                f"not divisible by num_head_channels {config.num_head_channels}"
            )
    deepest = 2 ** (len(config.channel_mult) - 1)
    if config.position_embedding_size % deepest:
        raise ValueError(f"position_embedding_size {config.position_embedding_size} must be a multiple of {deepest}")
    if config.image_embed_dim > 0 and config.num_image_tokens < 1:
        raise ValueError("image_embed_dim > 0 needs num_image_tokens >= 1")
    if config.text_in_embedding and config.text_width == 0:
        raise ValueError("text_in_embedding needs text_width > 0")
    if (config.image_embed_dim > 0 or config.text_width > 0) and not config.attention_downsample_rates:
        # Context tokens are only read by attention blocks; without any they would be silently ignored.
        raise ValueError("image_embed_dim / text_width > 0 need at least one attention_downsample_rate")


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        validate_config(config)
        self.config = config
        self.num_downsamples = len(config.channel_mult) - 1
        embed_dim = 4 * config.model_channels
        self.time_mlp = TimestepMLP(config.model_channels, embed_dim)

        # Context tokens share one width; every attention block projects them to its own channel count.
        context_dim = embed_dim if (config.image_embed_dim > 0 or config.text_width > 0) else 0
        if config.image_embed_dim > 0:
            self.image_to_embed = nn.Linear(config.image_embed_dim, embed_dim)
            self.image_to_tokens = nn.Linear(config.image_embed_dim, config.num_image_tokens * context_dim)
            # Stands in for the image embedding of rows trained / sampled unconditionally (classifier-free guidance).
            self.null_image_embed = nn.Parameter(torch.randn(config.image_embed_dim) * config.image_embed_dim**-0.5)
        if config.text_width > 0:
            self.text_to_tokens = nn.Linear(config.text_width, context_dim)
            # Zero-initialised: a trained network gains it without changing what it computes.
            self.text_to_embed = zero_module(nn.Linear(config.text_width, embed_dim)) if config.text_in_embedding else None
        if context_dim > 0:
            self.context_norm = nn.LayerNorm(context_dim)

        def attention_block(channels: int) -> AttentionBlock:
            side = config.position_embedding_size // downsample_rate if config.position_embedding_size else 0
            return AttentionBlock(channels, config.num_head_channels, context_dim, side)

        channels = config.model_channels
        input_conv = nn.Conv2d(config.in_channels + config.low_res_channels, channels, 3, padding=1)
        self.down_blocks = nn.ModuleList([ConditionedSequential([input_conv])])
        self.coordinate_conv = zero_module(nn.Conv2d(2, channels, 3, padding=1)) if config.coordinate_channels else None
        skip_channels = [channels]
        downsample_rate = 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(channels, config.model_channels * mult, embed_dim, config.dropout)]
                channels = config.model_channels * mult
                if downsample_rate in config.attention_downsample_rates:
                    layers.append(attention_block(channels))
                self.down_blocks.append(ConditionedSequential(layers))
                skip_channels.append(channels)
            if level < self.num_downsamples:
                self.down_blocks.append(ConditionedSequential([Downsample(channels)]))
                skip_channels.append(channels)
                downsample_rate *= 2

        middle: list[nn.Module] = [ResBlock(channels, channels, embed_dim, config.dropout)]
        if downsample_rate in config.attention_downsample_rates:
            middle.append(attention_block(channels))
        middle.append(ResBlock(channels, channels, embed_dim, config.dropout))
        self.middle_block = ConditionedSequential(middle)

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            # One more block per level than on the way down: it consumes the skip from the Downsample.
            for block_index in range(config.num_res_blocks + 1):
                in_channels = channels + skip_channels.pop()
                channels = config.model_channels * mult
                layers = [ResBlock(in_channels, channels, embed_dim, config.dropout)]
                if downsample_rate in config.attention_downsample_rates:
                    layers.append(attention_block(channels))
                if level > 0 and block_index == config.num_res_blocks:
                    layers.append(Upsample(channels))
                    downsample_rate //= 2
                self.up_blocks.append(ConditionedSequential(layers))

        self.out = nn.Sequential(
            group_norm(channels), nn.SiLU(), zero_module(nn.Conv2d(channels, config.out_channels, 3, padding=1))
        )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        image_embed: Tensor | None = None,
        text_encodings: Tensor | None = None,
        text_mask: Tensor | None = None,
        low_res: Tensor | None = None,
        drop_image: Tensor | None = None,
        drop_text: Tensor | None = None,
    ) -> Tensor:
        """Denoise x [B, in_channels, H, W] at timesteps t [B]; returns [B, out_channels, H, W].

        image_embed [B, image_embed_dim]; text_encodings [B, L, text_width] with text_mask [B, L] bool
        (True = real token, default all True); low_res [B, low_res_channels, h, w]; drop_image / drop_text
        [B] bool select rows that get the learned null image embedding / no text tokens.
        """
        self._check_inputs(x, image_embed, text_encodings, text_mask, low_res, drop_image, drop_text)
        config = self.config
        batch, _, height, width = x.shape

        embed = self.time_mlp(t)
        context_tokens: list[Tensor] = []
        context_masks: list[Tensor] = []
        if image_embed is not None:
            if drop_image is not None:
                null_image_embed = self.null_image_embed.to(image_embed.dtype)
                image_embed = torch.where(drop_image[:, None], null_image_embed, image_embed)
            embed = embed + self.image_to_embed(image_embed)
            context_tokens.append(self.image_to_tokens(image_embed).view(batch, config.num_image_tokens, -1))
            context_masks.append(torch.ones(batch, config.num_image_tokens, dtype=torch.bool, device=x.device))
        if text_encodings is not None:
            if text_mask is None:
                text_mask = torch.ones(text_encodings.shape[:2], dtype=torch.bool, device=x.device)
            text_mask = text_mask.bool()
            if drop_text is not None:
                text_mask = text_mask & ~drop_text[:, None]
            # Masked keys get zero attention weight, but 0 * inf/NaN is still NaN: clear padding first.
            text_encodings = text_encodings.masked_fill(~text_mask[..., None], 0.0)
            context_tokens.append(self.text_to_tokens(text_encodings))
            if self.text_to_embed is not None:
                # Rows without text get a zero mean, so only the learned bias: the "no text" offset.
                counts = text_mask.sum(dim=1, keepdim=True).clamp(min=1).to(text_encodings.dtype)
                embed = embed + self.text_to_embed(text_encodings.sum(dim=1) / counts)
            context_masks.append(text_mask)
        context = self.context_norm(torch.cat(context_tokens, dim=1)) if context_tokens else None
        context_mask = torch.cat(context_masks, dim=1) if context_masks else None

        if low_res is not None:
            low_res = F.interpolate(low_res, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)

        h = self.down_blocks[0](x, embed, context, context_mask)
        if self.coordinate_conv is not None:
            h = h + self.coordinate_conv(coordinate_grid(batch, height, width, h))
        skips = [h]
        for block in self.down_blocks[1:]:
            h = block(h, embed, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, embed, context, context_mask)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), embed, context, context_mask)
        return self.out(h)

    def _check_inputs(
        self,
        x: Tensor,
        image_embed: Tensor | None,
        text_encodings: Tensor | None,
        text_mask: Tensor | None,
        low_res: Tensor | None,
        drop_image: Tensor | None,
        drop_text: Tensor | None,
    ) -> None:
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(f"x must be [B, {config.in_channels}, H, W], got {tuple(x.shape)}")
        factor = 2**self.num_downsamples
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not divisible by the total downsampling {factor}")

        if config.image_embed_dim > 0 and image_embed is None:
            raise ValueError("this UNet is conditioned on an image embedding (image_embed_dim > 0): pass image_embed")
        if config.image_embed_dim == 0 and (image_embed is not None or drop_image is not None):
            raise ValueError("image_embed / drop_image given to a UNet without image conditioning (image_embed_dim == 0)")
        if image_embed is not None and image_embed.shape != (x.shape[0], config.image_embed_dim):
            raise ValueError(f"image_embed must be [B, {config.image_embed_dim}], got {tuple(image_embed.shape)}")

        if config.text_width == 0 and (text_encodings is not None or drop_text is not None):
            raise ValueError("text_encodings / drop_text given to a UNet without text conditioning (text_width == 0)")
        if text_mask is not None and text_encodings is None:
            raise ValueError("text_mask given without text_encodings")
        if text_encodings is not None:
            if text_encodings.ndim != 3 or text_encodings.shape[2] != config.text_width:
                raise ValueError(f"text_encodings must be [B, L, {config.text_width}], got {tuple(text_encodings.shape)}")
            if text_mask is not None and text_mask.shape != text_encodings.shape[:2]:
                raise ValueError(
                    f"text_mask {tuple(text_mask.shape)} does not match text_encodings {tuple(text_encodings.shape)}"
                )

        if config.low_res_channels > 0:
            if low_res is None:
                raise ValueError("this UNet is an upsampler (low_res_channels > 0): pass low_res")
            if low_res.ndim != 4 or low_res.shape[1] != config.low_res_channels:
                raise ValueError(f"low_res must be [B, {config.low_res_channels}, h, w], got {tuple(low_res.shape)}")
        elif low_res is not None:
            raise ValueError("low_res given to a UNet that is not an upsampler (low_res_channels == 0)")
