"""The diffusion prior: a causal transformer that denoises CLIP image embeddings given the text.

Following DALL-E 2, the network predicts the clean image embedding x_0 directly (not the noise),
from a token sequence

    [text encodings (L tokens), text embedding, timestep, noised image embedding x_t, final query]

and reads the prediction off the last token.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from unclip.models.layers import TimestepMLP, multi_head_attention

# text embedding, timestep, x_t, final query
NUM_SPECIAL_TOKENS = 4


@dataclass
class PriorConfig:
    embed_dim: int = 64  # CLIP embedding size (text and image)
    text_width: int = 64  # width of the per-token text encodings from CLIP's text transformer
    context_length: int = 32  # max number of text tokens
    width: int = 192
    layers: int = 4
    heads: int = 4
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        dropout_p = self.dropout if self.training else 0.0
        y = multi_head_attention(q, k, v, self.heads, mask, dropout_p)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.fc = nn.Linear(config.width, 4 * config.width)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * config.width, config.width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class DiffusionPrior(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")
        self.config = config
        self.text_encoding_proj = nn.Linear(config.text_width, config.width)
        self.text_embed_proj = nn.Linear(config.embed_dim, config.width)
        self.time_mlp = TimestepMLP(config.width, config.width)
        self.image_embed_proj = nn.Linear(config.embed_dim, config.width)
        self.final_query = nn.Parameter(torch.zeros(config.width))
        # Stands in for the text embedding of rows trained / sampled without text (classifier-free guidance).
        self.null_text_embed = nn.Parameter(torch.zeros(config.embed_dim))
        # Text tokens use positions [0, context_length), the special tokens the 4 positions after that,
        # so the special tokens keep their positions whatever the number of text tokens L.
        self.pos_embed = nn.Parameter(torch.zeros(config.context_length + NUM_SPECIAL_TOKENS, config.width))
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.layers)])
        self.ln_f = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, config.embed_dim)

        self.apply(self._init_weights)
        # GPT-2 style: shrink residual-branch outputs so the residual stream's variance does not grow with depth.
        for name, parameter in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.layers))
        nn.init.normal_(self.final_query, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        # CLIP embeddings are unit-norm; start the null embedding at about that scale.
        nn.init.normal_(self.null_text_embed, std=config.embed_dim**-0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text_embed: Tensor,
        text_encodings: Tensor,
        text_mask: Tensor,
        drop_text: Tensor | None = None,
    ) -> Tensor:
        """Predict the clean image embedding [B, embed_dim].

        x_t [B, D] noised image embedding, t [B] timesteps, text_embed [B, D], text_encodings [B, L, text_width],
        text_mask [B, L] bool (True = real token), drop_text [B] bool: rows conditioned on no text at all.
        """
        batch, num_text_tokens = text_mask.shape
        if num_text_tokens > self.config.context_length:
            raise ValueError(f"{num_text_tokens} text tokens exceed context_length {self.config.context_length}")
        if text_encodings.shape[:2] != text_mask.shape:
            raise ValueError(f"text_encodings {tuple(text_encodings.shape)} do not match text_mask {tuple(text_mask.shape)}")

        text_mask = text_mask.bool()
        if drop_text is not None:
            text_mask = text_mask & ~drop_text[:, None]
            text_embed = torch.where(drop_text[:, None], self.null_text_embed.to(text_embed.dtype), text_embed)
        # Masked keys get zero attention weight, but 0 * inf/NaN is still NaN: clear padding before it enters the net.
        text_encodings = text_encodings.masked_fill(~text_mask[..., None], 0.0)

        tokens = torch.cat(
            [
                self.text_encoding_proj(text_encodings),
                self.text_embed_proj(text_embed)[:, None],
                self.time_mlp(t)[:, None],
                self.image_embed_proj(x_t)[:, None],
                self.final_query.expand(batch, 1, -1),
            ],
            dim=1,
        )
        positions = torch.cat([self.pos_embed[:num_text_tokens], self.pos_embed[self.config.context_length :]])
        h = self.embed_dropout(tokens + positions)

        seq_len = num_text_tokens + NUM_SPECIAL_TOKENS
        key_is_visible = torch.cat([text_mask, text_mask.new_ones(batch, NUM_SPECIAL_TOKENS)], dim=1)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=h.device).tril()
        # A query can always see itself, so no row is ever fully masked (a padded text token sees only itself).
        itself = torch.eye(seq_len, dtype=torch.bool, device=h.device)
        mask = (causal & key_is_visible[:, None, :]) | itself  # [B, S, S]
        mask = mask[:, None]  # broadcast over heads

        for block in self.blocks:
            h = block(h, mask)
        return self.out(self.ln_f(h[:, -1]))
