"""The unCLIP chain: prompt -> CLIP text encoding -> prior -> decoder -> upsampler(s) -> PNGs.

`generate` is written once against the `StageBackend` protocol. In-process the backend calls
the engines directly (`unclip.local.LocalStages`); in the gateway it calls the stage services
over gRPC (`gateway.remote.RemoteStages`). Both hand the same numpy arrays to the same engines,
so a prompt and seed give the same pixels either way. This module imports neither torch nor grpc.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

import unclip
from unclip.errors import InvalidArgument
from unclip.options import SamplingOptions
from unclip.png import encode_png
from unclip.validation import MAX_SEED

MAX_IMAGES_PER_REQUEST = 8
MAX_PROMPT_CHARS = 1000
STAGE_NAMES = ("encode", "prior", "decode", "upsample")
# As DALL-E 2: two prior samples per image, the one closer to the text kept (BENCHMARKS.md measures it).
DEFAULT_PRIOR_CANDIDATES = 2


@dataclass
class TextEncoding:
    embeddings: np.ndarray  # [B, D] float32, unit norm
    encodings: np.ndarray  # [B, L, W] float32
    mask: np.ndarray  # [B, L] bool

    def repeat(self, n: int) -> TextEncoding:
        return TextEncoding(*(np.repeat(a, n, axis=0) for a in (self.embeddings, self.encodings, self.mask)))


@dataclass
class PipelineInfo:
    base_size: int
    upsampler_factors: list[int]
    model_versions: dict[str, str]

    def output_sizes(self) -> list[int]:
        sizes = [self.base_size]
        for factor in self.upsampler_factors:
            sizes.append(sizes[-1] * factor)
        return sizes


class StageBackend(Protocol):
    """The four stages, wherever they run. `deadline` is a time.monotonic() value or None."""

    async def describe(self) -> PipelineInfo: ...

    async def encode_text(self, texts: list[str], *, deadline: float | None) -> TextEncoding: ...

    async def sample_prior(
        self, text: TextEncoding, seeds: list[int], *, num_candidates: int, guidance_scale: float | None,
        sampling: SamplingOptions, deadline: float | None,
    ) -> np.ndarray: ...

    async def encode_image(self, images: np.ndarray, *, deadline: float | None) -> np.ndarray: ...

    async def decode(
        self, image_embeddings: np.ndarray, text: TextEncoding | None, seeds: list[int], *,
        guidance_scale: float | None, text_guidance_scale: float | None = None, sampling: SamplingOptions,
        deadline: float | None, inpaint: tuple[np.ndarray, np.ndarray] | None = None, preview_every: int = 0,
        on_preview: PreviewFn | None = None,
    ) -> np.ndarray: ...

    async def upsample(
        self, index: int, images: np.ndarray, seeds: list[int], *, sampling: SamplingOptions, deadline: float | None,
        inpaint: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray: ...


@dataclass
class GenerationParameters:
    prompt: str
    n: int = 1
    size: int | None = None  # None: the largest the pipeline serves
    seed: int | None = None  # None: random
    prior_guidance_scale: float | None = None
    decoder_guidance_scale: float | None = None  # the image embedding's
    decoder_text_guidance_scale: float | None = None  # the caption's, on top (None: the model's default)
    prior_steps: int | None = None
    decoder_steps: int | None = None
    upsampler_steps: int | None = None
    sampler: str | None = None
    prior_candidates: int = DEFAULT_PRIOR_CANDIDATES
    preview_every: int = 0  # streaming only: a decoder preview every this many steps

    def validate(self, require_prompt: bool = True) -> None:
        if require_prompt and not self.prompt.strip():
            raise InvalidArgument("prompt: must not be empty")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"prompt: {len(self.prompt)} characters exceed the limit of {MAX_PROMPT_CHARS}")
        if not 1 <= self.n <= MAX_IMAGES_PER_REQUEST:
            raise InvalidArgument(f"n: must be between 1 and {MAX_IMAGES_PER_REQUEST}, got {self.n}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidArgument(f"seed: {self.seed} is outside 0..2**64-1")


@dataclass
class StageEvent:
    stage: str  # one of STAGE_NAMES
    index: int  # which upsampler, for "upsample"
    completed: int
    total: int
    seconds: float


@dataclass
class GeneratedImage:
    png: bytes
    seed: int
    width: int
    height: int
    pixels: np.ndarray = field(repr=False)


def image_seeds(seed: int, n: int) -> list[int]:
    """Image i uses seed + i, so any image of a batch can be regenerated alone."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(n)]


PreviewFn = Callable[[int, int, np.ndarray], None]
"""(steps done, total steps, uint8 [B, S, S, 3] current clean-image estimates); called on the
event loop, so it must not block."""


def preview_due(done: int, total: int, every: int) -> bool:
    """Whether a preview goes out after `done` of `total` steps: every `every` steps and at the end."""
    return every > 0 and (done % every == 0 or done == total)


@dataclass
class Inpaint:
    """An edit: `image` uint8 [S, S, 3] at the output size; `regenerate` bool [S, S]."""

    image: np.ndarray
    regenerate: np.ndarray

    def at_size(self, side: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(images, mask) resized for a stage producing side x side, one copy per batch row."""
        from PIL import Image

        image = np.asarray(Image.fromarray(self.image).resize((side, side), Image.Resampling.LANCZOS))
        # A low-res pixel is regenerated if any pixel it covers is: the edit never leaks into kept content.
        factor = self.regenerate.shape[0] // side
        if factor >= 1 and self.regenerate.shape[0] == side * factor:
            mask = self.regenerate.reshape(side, factor, side, factor).any(axis=(1, 3))
        else:
            mask = np.asarray(Image.fromarray(self.regenerate).resize((side, side), Image.Resampling.NEAREST))
        return np.repeat(image[None], batch, axis=0), np.repeat(mask[None], batch, axis=0)


async def _maybe_await(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result


class Run:
    """One request through the stages: plans sizes and seeds, reports stage events, and runs
    the shared tail (decoder, upsamplers, PNG encoding) for every operation."""

    def __init__(
        self,
        backend: StageBackend,
        params: GenerationParameters,
        info: PipelineInfo,
        *,
        operation: str,
        batch: int,
        seeds: list[int],
        deadline: float | None,
        on_stage: Callable[[StageEvent], Awaitable[None] | None] | None,
        stages_before_decode: int,
    ):
        sizes = info.output_sizes()
        self.size = sizes[-1] if params.size is None else params.size
        if self.size not in sizes:
            raise InvalidArgument(f"size: must be one of {sizes}, got {self.size}")
        self.backend, self.params, self.info, self.operation = backend, params, info, operation
        self.batch, self.seeds, self.deadline, self.on_stage = batch, seeds, deadline, on_stage
        self.upsamplers = sizes.index(self.size)
        self.sizes = sizes
        self.total = stages_before_decode + 1 + self.upsamplers
        self.completed = 0
        self._started = time.perf_counter()

    @classmethod
    async def start(
        cls, backend: StageBackend, params: GenerationParameters, *, operation: str, batch: int | None = None,
        same_seed: bool = False, deadline: float | None = None, on_stage=None, stages_before_decode: int = 2,
    ) -> Run:
        """`same_seed`: every row shares the request's seed (frames of an interpolation)."""
        params.validate(require_prompt=operation in ("generate", "edit"))
        info = await backend.describe()
        batch = params.n if batch is None else batch
        seed = secrets.randbelow(2**63) if params.seed is None else params.seed
        seeds = [seed] * batch if same_seed else image_seeds(seed, batch)
        return cls(
            backend, params, info, operation=operation, batch=batch, seeds=seeds, deadline=deadline,
            on_stage=on_stage, stages_before_decode=stages_before_decode,
        )

    async def finished(self, stage: str, index: int = 0) -> None:
        self.completed += 1
        now = time.perf_counter()
        if self.on_stage is not None:
            await _maybe_await(self.on_stage(StageEvent(stage, index, self.completed, self.total, now - self._started)))
        self._started = now

    async def encode_prompts(self, prompts: list[str]) -> TextEncoding:
        text = await self.backend.encode_text(prompts, deadline=self.deadline)
        await self.finished("encode")
        return text

    async def sample_prior(self, text: TextEncoding, seeds: list[int] | None = None) -> np.ndarray:
        p = self.params
        embeddings = await self.backend.sample_prior(
            text, self.seeds if seeds is None else seeds, num_candidates=p.prior_candidates,
            guidance_scale=p.prior_guidance_scale, sampling=SamplingOptions(p.prior_steps, p.sampler),
            deadline=self.deadline,
        )
        await self.finished("prior")
        return embeddings

    async def decode_and_upsample(
        self,
        embeddings: np.ndarray,
        text: TextEncoding | None,
        *,
        inpaint: Inpaint | None = None,
        preview_every: int = 0,
        on_preview: PreviewFn | None = None,
    ) -> np.ndarray:
        p = self.params
        images = await self.backend.decode(
            embeddings, text, self.seeds, guidance_scale=p.decoder_guidance_scale,
            text_guidance_scale=p.decoder_text_guidance_scale,
            sampling=SamplingOptions(p.decoder_steps, p.sampler), deadline=self.deadline,
            inpaint=None if inpaint is None else inpaint.at_size(self.sizes[0], self.batch),
            preview_every=preview_every, on_preview=on_preview,
        )
        await self.finished("decode")
        for index in range(self.upsamplers):
            images = await self.backend.upsample(
                index, images, self.seeds, sampling=SamplingOptions(p.upsampler_steps, p.sampler),
                deadline=self.deadline,
                inpaint=None if inpaint is None else inpaint.at_size(self.sizes[index + 1], self.batch),
            )
            await self.finished("upsample", index)
        return images

    def results(self, images: np.ndarray, description: dict[str, Any]) -> list[GeneratedImage]:
        """PNGs carrying what produced them: the operation, its inputs, seed, settings, models."""
        settings = {key: value for key, value in asdict(self.params).items() if key not in ("prompt", "seed", "n")}
        settings["size"] = self.size
        results = []
        for index, (image_seed, pixels) in enumerate(zip(self.seeds, images)):
            chunks = {
                "operation": self.operation,
                **description,
                "seed": str(image_seed),
                "parameters": settings,
                "models": self.info.model_versions,
                "Software": f"unclip {unclip.__version__}",
            }
            if self.batch > 1 and len(set(self.seeds)) == 1:
                chunks["frame"] = str(index)
            results.append(GeneratedImage(encode_png(pixels, chunks), image_seed, pixels.shape[1], pixels.shape[0], pixels))
        return results


async def generate(
    backend: StageBackend,
    params: GenerationParameters,
    *,
    deadline: float | None = None,
    on_stage: Callable[[StageEvent], Awaitable[None] | None] | None = None,
    on_preview: PreviewFn | None = None,
    inpaint: Inpaint | None = None,
) -> list[GeneratedImage]:
    """Prompt -> images. With `inpaint`, only its regenerate mask changes (an edit)."""
    run = await Run.start(
        backend, params, operation="generate" if inpaint is None else "edit", deadline=deadline, on_stage=on_stage
    )
    text = (await run.encode_prompts([params.prompt])).repeat(params.n)
    embeddings = await run.sample_prior(text)
    images = await run.decode_and_upsample(
        embeddings, text, inpaint=inpaint, preview_every=params.preview_every, on_preview=on_preview
    )
    return run.results(images, {"prompt": params.prompt})
