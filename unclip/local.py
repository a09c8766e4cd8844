"""The in-process stage backend: the four engines in this process, no network.

Engines run in a worker thread so that an asyncio caller (the CLI's progress bar, a test)
stays responsive, and they stop between diffusion steps once the deadline passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unclip.cancel import CancelToken, run_cancellable
from unclip.pipeline import PipelineInfo, PreviewFn, TextEncoding, preview_due
from unclip.stages import load_engine
from unclip.stages.base import ProgressFn, unit_to_images


class LocalStages:
    def __init__(self, encoder, prior, decoder, upsamplers: Sequence, *, progress: ProgressFn | None = None):
        self.encoder = encoder
        self.prior = prior
        self.decoder = decoder
        self.upsamplers = list(upsamplers)
        self.progress = progress  # per diffusion step, for a progress bar

    @classmethod
    def load(
        cls,
        clip: str | Path | None = None,
        prior: str | Path | None = None,
        decoder: str | Path | None = None,
        upsamplers: Sequence[str | Path] | None = None,
    ) -> LocalStages:
        """Engines from checkpoint directories; None takes the weights shipped in the package."""
        ups = [load_engine("upsampler", path) for path in upsamplers] if upsamplers is not None else [load_engine("upsampler")]
        return cls(load_engine("clip", clip), load_engine("prior", prior), load_engine("decoder", decoder), ups)

    async def describe(self) -> PipelineInfo:
        versions = {"clip": self.encoder.version, "prior": self.prior.version, "decoder": self.decoder.version}
        versions |= {f"upsampler{i}": up.version for i, up in enumerate(self.upsamplers)}
        return PipelineInfo(self.decoder.image_size, [up.scale_factor for up in self.upsamplers], versions)

    async def encode_text(self, texts: list[str], *, deadline: float | None) -> TextEncoding:
        return await asyncio.to_thread(self.encoder.encode_text, texts)

    async def sample_prior(self, text, seeds, *, num_candidates, guidance_scale, sampling, deadline) -> np.ndarray:
        return await self._run(
            self.prior.sample, text.embeddings, text.encodings, text.mask, seeds, num_candidates=num_candidates,
            guidance_scale=guidance_scale, sampling=sampling, deadline=deadline,
        )

    async def encode_image(self, images: np.ndarray, *, deadline: float | None) -> np.ndarray:
        return await asyncio.to_thread(self.encoder.encode_image, images)

    async def decode(
        self, image_embeddings, text, seeds, *, guidance_scale, text_guidance_scale=None, sampling, deadline,
        inpaint=None, preview_every=0, on_preview: PreviewFn | None = None,
    ) -> np.ndarray:
        return await self._run(
            self.decoder.decode, image_embeddings, seeds,
            text_encodings=None if text is None else text.encodings, text_mask=None if text is None else text.mask,
            guidance_scale=guidance_scale, text_guidance_scale=text_guidance_scale, sampling=sampling, inpaint=inpaint,
            deadline=deadline, progress=self._progress(preview_every, on_preview),
        )

    async def upsample(self, index, images, seeds, *, sampling, deadline, inpaint=None) -> np.ndarray:
        return await self._run(
            self.upsamplers[index].upsample, images, seeds, sampling=sampling, inpaint=inpaint,
            progress=self._progress(0, None), deadline=deadline,
        )

    def _progress(self, preview_every: int, on_preview: PreviewFn | None) -> ProgressFn | None:
        """The engine's per-step callback (it runs on the worker thread): the progress bar, and
        previews handed to the event loop every `preview_every` steps and after the last."""
        if on_preview is None:
            return self.progress
        loop = asyncio.get_running_loop()

        def on_step(step: int, total: int, x0) -> None:
            if self.progress is not None:
                self.progress(step, total, x0)
            done = step + 1
            if preview_due(done, total, preview_every):
                loop.call_soon_threadsafe(on_preview, done, total, unit_to_images(x0))

        return on_step

    @staticmethod
    async def _run(method, *args, deadline: float | None, **kwargs):
        return await run_cancellable(lambda cancel: method(*args, cancel=cancel, **kwargs), CancelToken(deadline=deadline))
