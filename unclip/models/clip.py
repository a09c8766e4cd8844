"""CLIP through open_clip, plus the per-token text encodings unCLIP's prior and decoder attend to.

The tiny model config shipped in open_clip_configs/ is registered with open_clip on import, so
"unclip-tiny" is created like any built-in open_clip model name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")


def create_clip(model_name: str) -> open_clip.CLIP:
    """An open_clip model with random weights (the caller loads its own)."""
    # open_clip warns on the root logger that no pretrained weights were loaded: expected here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(model_name, pretrained=None, load_weights=False)
    finally:
        root.setLevel(level)
    if not hasattr(model, "token_embedding"):
        raise ValueError(f"{model_name}: only open_clip models with the built-in text tower are supported")
    return model


def encode_text_tokens(model: open_clip.CLIP, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled projected text embedding [B, D], final per-token states [B, L, W]) for token ids [B, L].

    Mirrors open_clip's CLIP.encode_text but keeps the per-token states that it pools away.
    """
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    token_states = model.ln_final(x)
    pooled = text_global_pool(token_states, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, torch.nn.Linear):
        pooled = model.text_projection(pooled)
    elif model.text_projection is not None:
        pooled = pooled @ model.text_projection
    return pooled, token_states


def text_mask_and_padding(tokens: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids with the padding set to `pad_token_id`, mask [B, L] true up to and including
    each row's end token). open_clip pads with 0, which is also a real token ("!"), so the mask
    comes from the end token's position (the largest id in CLIP's BPE), not from the ids. An
    imported CLIP is padded as its own tokenizer padded (Karlo: with the end token), so every
    per-token state equals the source model's."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    mask = positions[None, :] <= tokens.argmax(dim=-1, keepdim=True)
    return torch.where(mask, tokens, torch.full_like(tokens, pad_token_id)), mask


def preprocess_images(model: open_clip.CLIP, images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, S, S] at the model's input size.

    Tensor ops rather than PIL transforms so that batches are processed identically and fast.
    """
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std
