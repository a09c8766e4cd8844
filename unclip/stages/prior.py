"""Stage 2 engine: the diffusion prior, CLIP text embedding -> CLIP image embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unclip.config import PriorStageConfig
from unclip.errors import InvalidArgument
from unclip.models.prior import DiffusionPrior
from unclip.options import SamplingOptions
from unclip.stages.base import (
    MAX_BATCH,
    MAX_CANDIDATES,
    CancelToken,
    StageStats,
    build_diffusion,
    embedding_to_model_space,
    guided,
    load_module,
    resolve_guidance,
    row_generators,
    sample_rows,
)
from unclip.validation import check_array, check_batch, check_seeds


class PriorSampler:
    def __init__(self, config: PriorStageConfig, model: DiffusionPrior, version: str = "unversioned"):
        self.config = config
        self.version = version
        self.device = next(model.parameters()).device
        self.model = model
        self.diffusion = build_diffusion(config.diffusion)
        self.stats = StageStats()

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> PriorSampler:
        return cls(*load_module(directory, "prior", lambda c: DiffusionPrior(c.model)))

    @torch.no_grad()
    def sample(
        self,
        text_embeddings: np.ndarray,
        text_encodings: np.ndarray,
        text_mask: np.ndarray,
        seeds: list[int],
        *,
        num_candidates: int = 1,
        guidance_scale: float | None = None,
        sampling: SamplingOptions = SamplingOptions(),
        cancel: CancelToken | None = None,
    ) -> np.ndarray:
        """Unit-norm image embeddings [B, D]; of `num_candidates` samples per row, the one
        most similar to the row's text embedding is kept."""
        cfg = self.config.model
        batch = text_embeddings.shape[0] if text_embeddings.ndim else 0
        check_batch(batch, "text_embeddings", MAX_BATCH)
        check_array(text_embeddings, "text_embeddings", shape=(None, cfg.embed_dim), dtypes=[np.float32])
        check_array(text_encodings, "text_encodings", shape=(batch, None, cfg.text_width), dtypes=[np.float32])
        length = text_encodings.shape[1]
        if not 1 <= length <= cfg.context_length:
            raise InvalidArgument(f"text_encodings: length must be 1..{cfg.context_length}, got {length}")
        check_array(text_mask, "text_mask", shape=(batch, length), dtypes=[np.bool_])
        seeds = check_seeds(seeds, batch)
        if not 1 <= num_candidates <= MAX_CANDIDATES:
            raise InvalidArgument(f"num_candidates: must be between 1 and {MAX_CANDIDATES}, got {num_candidates}")
        scale = resolve_guidance(guidance_scale, self.config.sampling.guidance_scale)
        options = sampling.resolve(self.config.sampling, self.config.diffusion.timesteps)

        # Candidates are extra rows, candidate-major within each prompt, each with its own generator.
        rows = batch * num_candidates
        device = self.device
        text_embed = embedding_to_model_space(torch.from_numpy(text_embeddings)).repeat_interleave(num_candidates, 0).to(device)
        encodings = torch.from_numpy(text_encodings).repeat_interleave(num_candidates, 0).to(device)
        mask = torch.from_numpy(text_mask).repeat_interleave(num_candidates, 0).to(device)
        generators = [
            generator
            for seed in seeds
            for generator in (row_generators([seed], f"prior/candidate{k}")[0] for k in range(num_candidates))
        ]
        keep = torch.zeros(rows, dtype=torch.bool, device=device)
        cond = dict(text_embed=text_embed, text_encodings=encodings, text_mask=mask, drop_text=keep)
        uncond = dict(cond, drop_text=~keep)
        model_fn = guided(self.model, cond, uncond, scale)
        scale_norm = cfg.embed_dim**0.5
        samples = sample_rows(
            self.diffusion,
            model_fn,
            (rows, cfg.embed_dim),
            generators,
            options,
            self.stats,
            cancel=cancel,
            # CLIP image embeddings live on a sphere; keep the clean estimate there.
            denoised_fn=lambda x0: F.normalize(x0, dim=-1) * scale_norm,
        )
        candidates = F.normalize(samples.cpu(), dim=-1).view(batch, num_candidates, cfg.embed_dim)
        text = F.normalize(torch.from_numpy(text_embeddings), dim=-1)
        similarity = (candidates * text[:, None, :]).sum(dim=-1)  # per row, unlike a batched matmul
        best = similarity.argmax(dim=1)
        return candidates[torch.arange(batch), best].numpy()
