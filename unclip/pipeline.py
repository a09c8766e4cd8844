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
from typing import Protocol

import numpy as np

import unclip
from unclip.errors import InvalidArgument
from unclip.options import SamplingOptions
from unclip.png import encode_png
from unclip.validation import MAX_SEED

MAX_IMAGES_PER_REQUEST = 8
MAX_PROMPT_CHARS = 1000
STAGE_NAMES = ("encode", "prior", "decode", "upsample")


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

    async def decode(
        self, image_embeddings: np.ndarray, text: TextEncoding | None, seeds: list[int], *,
        guidance_scale: float | None, sampling: SamplingOptions, deadline: float | None,
    ) -> np.ndarray: ...

    async def upsample(
        self, index: int, images: np.ndarray, seeds: list[int], *, sampling: SamplingOptions, deadline: float | None,
    ) -> np.ndarray: ...


@dataclass
class GenerationParameters:
    prompt: str
    n: int = 1
    size: int | None = None  # None: the largest the pipeline serves
    seed: int | None = None  # None: random
    prior_guidance_scale: float | None = None
    decoder_guidance_scale: float | None = None
    prior_steps: int | None = None
    decoder_steps: int | None = None
    upsampler_steps: int | None = None
    sampler: str | None = None
    prior_candidates: int = 1

    def validate(self) -> None:
        if not self.prompt.strip():
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


async def generate(
    backend: StageBackend,
    params: GenerationParameters,
    *,
    deadline: float | None = None,
    on_stage: Callable[[StageEvent], Awaitable[None] | None] | None = None,
) -> list[GeneratedImage]:
    params.validate()
    info = await backend.describe()
    sizes = info.output_sizes()
    size = sizes[-1] if params.size is None else params.size
    if size not in sizes:
        raise InvalidArgument(f"size: must be one of {sizes}, got {size}")
    upsamplers = sizes.index(size)
    total = 3 + upsamplers
    seed = secrets.randbelow(2**63) if params.seed is None else params.seed
    seeds = image_seeds(seed, params.n)
    completed = 0

    async def finished(stage: str, started: float, index: int = 0) -> None:
        nonlocal completed
        completed += 1
        if on_stage is not None:
            result = on_stage(StageEvent(stage, index, completed, total, time.perf_counter() - started))
            if result is not None:
                await result

    started = time.perf_counter()
    text = (await backend.encode_text([params.prompt], deadline=deadline)).repeat(params.n)
    await finished("encode", started)

    started = time.perf_counter()
    embeddings = await backend.sample_prior(
        text, seeds, num_candidates=params.prior_candidates, guidance_scale=params.prior_guidance_scale,
        sampling=SamplingOptions(params.prior_steps, params.sampler), deadline=deadline,
    )
    await finished("prior", started)

    started = time.perf_counter()
    images = await backend.decode(
        embeddings, text, seeds, guidance_scale=params.decoder_guidance_scale,
        sampling=SamplingOptions(params.decoder_steps, params.sampler), deadline=deadline,
    )
    await finished("decode", started)

    for index in range(upsamplers):
        started = time.perf_counter()
        images = await backend.upsample(
            index, images, seeds, sampling=SamplingOptions(params.upsampler_steps, params.sampler), deadline=deadline
        )
        await finished("upsample", started, index)

    record = {key: value for key, value in asdict(params).items() if key not in ("prompt", "seed", "n")}
    record["size"] = size
    results = []
    for image_seed, pixels in zip(seeds, images):
        text_chunks = {
            "prompt": params.prompt,
            "seed": str(image_seed),
            "parameters": record,
            "models": info.model_versions,
            "Software": f"unclip {unclip.__version__}",
        }
        results.append(GeneratedImage(encode_png(pixels, text_chunks), image_seed, pixels.shape[1], pixels.shape[0], pixels))
    return results
