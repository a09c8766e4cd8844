"""Conversions between the engines' numpy interface and the networks' tensors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def images_to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def unit_to_images(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounding to nearest."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def unit_to_floats(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] -> float32 [B, H, W, 3] as it is: the unrounded handoff to an upsampler."""
    return x.float().permute(0, 2, 3, 1).contiguous().cpu().numpy()


def floats_to_unit(images: np.ndarray) -> torch.Tensor:
    """float32 [B, H, W, 3] (`unit_to_floats`) -> float [B, 3, H, W]."""
    return torch.from_numpy(np.array(images, dtype=np.float32)).permute(0, 3, 1, 2)


def image_finish(float_images: bool) -> Callable[[torch.Tensor], np.ndarray]:
    """How a job's final tensor becomes its images: float32 unrounded, or uint8."""
    return unit_to_floats if float_images else unit_to_images


def embedding_to_model_space(embeddings: torch.Tensor) -> torch.Tensor:
    """Unit-norm CLIP embeddings scaled by sqrt(D), so each component has about unit variance
    like the Gaussian noise the diffusion models mix them with."""
    return F.normalize(embeddings, dim=-1) * embeddings.shape[-1] ** 0.5
