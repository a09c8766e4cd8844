"""Stage 2 engine: the diffusion prior, CLIP text embedding -> CLIP image embedding."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unclip.calls import SampleCall
from unclip.cancel import CancelToken
from unclip.config import PriorStageConfig
from unclip.errors import InvalidArgument
from unclip.models.prior import DiffusionPrior
from unclip.options import SamplingOptions
from unclip.stage import Stage
from unclip.stages.engine import DiffusionEngine, Job, ProgressFn, row_generators
from unclip.stages.guidance import guided
from unclip.stages.tensors import embedding_to_model_space
from unclip.validation import MAX_CANDIDATES, check_array, check_guidance


class PriorSampler(DiffusionEngine):
    STAGE = Stage.PRIOR
    config: PriorStageConfig

    @classmethod
    def build(cls, config: PriorStageConfig) -> torch.nn.Module:
        return DiffusionPrior(config.model)

    def describe(self) -> dict[str, int]:
        return {**super().describe(), "embed_dim": self.config.model.embed_dim}

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
        call = SampleCall(
            text_embeddings, text_encodings, text_mask, seeds=seeds, num_candidates=num_candidates,
            guidance_scale=guidance_scale, sampling=sampling,
        )  # fmt: skip
        return self.run_one(self.job(call, cancel))

    @torch.no_grad()
    def job(self, call: SampleCall, cancel: CancelToken | None = None, progress: ProgressFn | None = None) -> Job:
        cfg = self.config.model
        text_embeddings, text_encodings, text_mask = call.text_embeddings, call.text_encodings, call.text_mask
        batch = text_embeddings.shape[0] if text_embeddings.ndim else 0
        seeds = self.check_rows(batch, "text_embeddings", call.seeds)
        check_array(text_embeddings, "text_embeddings", shape=(None, cfg.embed_dim), dtypes=[np.float32])
        check_array(text_encodings, "text_encodings", shape=(batch, None, cfg.text_width), dtypes=[np.float32])
        length = text_encodings.shape[1]
        if not 1 <= length <= cfg.context_length:
            raise InvalidArgument(f"text_encodings: length must be 1..{cfg.context_length}, got {length}")
        check_array(text_mask, "text_mask", shape=(batch, length), dtypes=[np.bool_])
        num_candidates = call.num_candidates
        if not 1 <= num_candidates <= MAX_CANDIDATES:
            raise InvalidArgument(f"num_candidates: must be between 1 and {MAX_CANDIDATES}, got {num_candidates}")
        scale = check_guidance(call.guidance_scale, self.config.sampling.guidance_scale)
        options = self.sampling_options(call.sampling)

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
        scale_norm = cfg.embed_dim**0.5
        run = self.sampling_run(
            (rows, cfg.embed_dim),
            generators,
            options,
            # CLIP image embeddings live on a sphere; keep the clean estimate there.
            denoised_fn=lambda x0: F.normalize(x0, dim=-1) * scale_norm,
        )

        def best_candidates(samples: torch.Tensor) -> np.ndarray:
            candidates = F.normalize(samples.cpu(), dim=-1).view(batch, num_candidates, cfg.embed_dim)
            text = F.normalize(torch.from_numpy(text_embeddings), dim=-1)
            similarity = (candidates * text[:, None, :]).sum(dim=-1)  # per row, unlike a batched matmul
            best = similarity.argmax(dim=1)
            return candidates[torch.arange(batch), best].numpy()

        return Job(run, guided(cond, uncond, scale), best_candidates, cancel, progress)
