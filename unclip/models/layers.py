"""Building blocks shared by the diffusion prior and the UNets."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) diffusion timesteps: [B] -> [B, dim].

    Frequencies are geometrically spaced from 1 down to 1/max_period, so both neighbouring
    steps and the coarse position within the whole schedule are distinguishable.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepMLP(nn.Module):
    """Timesteps [B] -> sinusoidal features [B, frequency_dim] -> two-layer MLP -> [B, out_dim]."""

    def __init__(self, frequency_dim: int, out_dim: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`."""
    groups = next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of `module` and return it.

    Used on the last layer of residual branches: each block then starts as the identity, which
    keeps activations well scaled in deep nets and lets training grow the branches gradually.
    """
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def multi_head_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Scaled dot-product attention over token sequences.

    q [B, Sq, C], k and v [B, Sk, C]; `mask` is boolean (True = may attend) and broadcastable to
    [B, heads, Sq, Sk]. The caller must guarantee every query row has at least one attendable key,
    otherwise softmax over an all -inf row yields NaN. Returns [B, Sq, C].
    """
    batch, query_len, channels = q.shape
    if channels % heads:
        raise ValueError(f"{channels} channels cannot be split into {heads} heads")

    def split_heads(x: Tensor) -> Tensor:
        return x.view(batch, x.shape[1], heads, channels // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split_heads(q), split_heads(k), split_heads(v), attn_mask=mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(batch, query_len, channels)
