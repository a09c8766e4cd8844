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
        return {**super().describe(), "embed_dim": self.embed_dim}

    # What a model family changes (unclip/stages/diffusers_family.py overrides these).

    @property
    def embed_dim(self) -> int:
        return self.config.model.embed_dim

    @property
    def text_width(self) -> int:
        return self.config.model.text_width

    @property
    def context_length(self) -> int:
        return self.config.model.context_length

    def check_text_length(self, length: int) -> None:
        if not 1 <= length <= self.context_length:
            raise InvalidArgument(f"text_encodings: length must be 1..{self.context_length}, got {length}")

    def conditions(self, text_embed: torch.Tensor, encodings: torch.Tensor, mask: torch.Tensor) -> tuple[dict, dict]:
        """(conditional, unconditional) network conditioning of guidance, per row."""
        keep = torch.zeros(text_embed.shape[0], dtype=torch.bool, device=self.device)
        cond = dict(text_embed=embedding_to_model_space(text_embed), text_encodings=encodings, text_mask=mask, drop_text=keep)
        return cond, dict(cond, drop_text=~keep)

    def denoise(self, x0: torch.Tensor) -> torch.Tensor:
        # CLIP image embeddings live on a sphere; keep the clean estimate there.
        return F.normalize(x0, dim=-1) * self.embed_dim**0.5

    def embeddings(self, samples: torch.Tensor) -> torch.Tensor:
        """The image embeddings a stage returns, from final samples: unit-norm here."""
        return F.normalize(samples, dim=-1)

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
        text_embeddings, text_encodings, text_mask = call.text_embeddings, call.text_encodings, call.text_mask
        batch = text_embeddings.shape[0] if text_embeddings.ndim else 0
        seeds = self.check_rows(batch, "text_embeddings", call.seeds)
        embed_dim = self.embed_dim
        check_array(text_embeddings, "text_embeddings", shape=(None, embed_dim), dtypes=[np.float32])
        check_array(text_encodings, "text_encodings", shape=(batch, None, self.text_width), dtypes=[np.float32])
        length = text_encodings.shape[1]
        self.check_text_length(length)
        check_array(text_mask, "text_mask", shape=(batch, length), dtypes=[np.bool_])
        num_candidates = call.num_candidates
        if not 1 <= num_candidates <= MAX_CANDIDATES:
            raise InvalidArgument(f"num_candidates: must be between 1 and {MAX_CANDIDATES}, got {num_candidates}")
        scale = check_guidance(call.guidance_scale, self.config.sampling.guidance_scale)
        options = self.sampling_options(call.sampling)

        # Candidates are extra rows, candidate-major within each prompt, each with its own generator.
        rows = batch * num_candidates

        def per_row(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).repeat_interleave(num_candidates, 0).to(self.device)

        cond, uncond = self.conditions(per_row(text_embeddings), per_row(text_encodings), per_row(text_mask))
        generators = [
            generator
            for seed in seeds
            for generator in (row_generators([seed], f"prior/candidate{k}")[0] for k in range(num_candidates))
        ]
        run = self.sampling_run((rows, embed_dim), generators, options, denoised_fn=self.denoise)

        def best_candidates(samples: torch.Tensor) -> np.ndarray:
            candidates = self.embeddings(samples).cpu().view(batch, num_candidates, embed_dim)
            text = F.normalize(torch.from_numpy(text_embeddings), dim=-1)
            similarity = (F.normalize(candidates, dim=-1) * text[:, None, :]).sum(dim=-1)  # per row, unlike a matmul
            best = similarity.argmax(dim=1)
            return candidates[torch.arange(batch), best].float().numpy()

        return Job(run, guided(cond, uncond, scale), best_candidates, cancel, progress)
