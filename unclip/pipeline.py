"""The unCLIP chain: prompt -> CLIP text encoding -> prior -> decoder -> upsampler(s) -> PNGs.

`generate` is written once against the `StageBackend` protocol: it builds each stage's call
(`unclip.calls`) and the backend runs it. In-process the backend runs the engines directly
(`unclip.local.LocalStages`); in the gateway it sends the calls to the stage services
(`gateway.remote.RemoteStages`). Both hand the same arrays to the same engines, so a prompt
and seed give the same pixels either way. This module imports neither torch nor grpc.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

import unclip
from unclip import metrics
from unclip.calls import DecodeCall, EncodeImageCall, EncodeTextCall, ModelInfo, SampleCall, StageCall, TextEncoding, UpsampleCall
from unclip.errors import InvalidArgument
from unclip.parameters import GenerationParameters
from unclip.png import encode_png
from unclip.stage import Stage
from unclip.validation import MAX_SEED

R = TypeVar("R")
# How each operation is named in what it produces (PNG metadata, stored records).
RECORDED_AS = {"variations": "variation", "interpolate": "interpolation"}


@dataclass
class PipelineInfo:
    base_size: int
    upsampler_factors: list[int]
    model_versions: dict[str, str]
    # Rows per network evaluation of each stage, keyed as model_versions: images depend on it.
    compute_batches: dict[str, int] = field(default_factory=dict)
    # Steps each diffusion stage takes when a request gives none, keyed as model_versions.
    default_steps: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_models(cls, encoder: ModelInfo, prior: ModelInfo, decoder: ModelInfo, upsamplers: list[ModelInfo]) -> PipelineInfo:
        models = {
            stage.version_key(): info
            for stage, info in ((Stage.ENCODER, encoder), (Stage.PRIOR, prior), (Stage.DECODER, decoder))
        }
        models |= {Stage.UPSAMPLER.version_key(i): info for i, info in enumerate(upsamplers)}
        return cls(
            decoder.image_size,
            [info.scale_factor for info in upsamplers],
            {key: info.version for key, info in models.items()},
            {key: info.compute_batch for key, info in models.items()},
            {key: info.default_steps for key, info in models.items() if info.default_steps},
        )

    def steps(self, given: int | None, stage: Stage, index: int = 0) -> int:
        """The steps a call of `stage` takes: those `given`, or its model's default (0: not diffusion)."""
        return given if given is not None else self.default_steps.get(stage.version_key(index), 0)

    def output_sizes(self) -> list[int]:
        sizes = [self.base_size]
        for factor in self.upsampler_factors:
            sizes.append(sizes[-1] * factor)
        return sizes


PreviewFn = Callable[[int, int, np.ndarray], None]
"""(steps done, total steps, uint8 [B, S, S, 3] current clean-image estimates); called on the
event loop, so it must not block."""


class StageBackend(Protocol):
    """The stages, wherever they run. `deadline` is a time.monotonic() value or None.

    `run` runs a call on the stage it names (`index`: which upsampler); a decoder call with
    `on_preview` and `preview_every` > 0 also reports the decoder's estimates as it goes.
    """

    async def describe(self) -> PipelineInfo: ...

    async def run(
        self,
        call: StageCall[R],
        *,
        index: int = 0,
        deadline: float | None,
        on_preview: PreviewFn | None = None,
        preview_every: int = 0,
    ) -> R: ...


@dataclass
class StageEvent:
    stage: Stage
    index: int  # which upsampler, for Stage.UPSAMPLER
    completed: int
    total: int
    seconds: float

    @property
    def name(self) -> str:
        """How timings name the stage: its event name, numbered for upsamplers ("upsample0")."""
        return f"{self.stage.event}{self.index}" if self.stage is Stage.UPSAMPLER else self.stage.event


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


def preview_due(done: int, total: int, every: int) -> bool:
    """Whether a preview goes out after `done` of `total` steps: every `every` steps and at the end."""
    return every > 0 and (done % every == 0 or done == total)


@dataclass
class Inpaint:
    """An edit: `image` uint8 [S, S, 3] at the output size; `regenerate` bool [S, S]."""

    image: np.ndarray
    regenerate: np.ndarray

    def at_size(self, side: int, batch: int) -> dict[str, Any]:
        """The inpaint_images and inpaint_mask of a call producing side x side, one copy per row."""
        from PIL import Image

        image = np.asarray(Image.fromarray(self.image).resize((side, side), Image.Resampling.LANCZOS))
        # A low-res pixel is regenerated if any pixel it covers is: the edit never leaks into kept content.
        factor = self.regenerate.shape[0] // side
        if factor >= 1 and self.regenerate.shape[0] == side * factor:
            mask = np.asarray(self.regenerate.reshape(side, factor, side, factor).any(axis=(1, 3)))
        else:
            mask = np.asarray(Image.fromarray(self.regenerate).resize((side, side), Image.Resampling.NEAREST))
        return {"inpaint_images": np.repeat(image[None], batch, axis=0), "inpaint_mask": np.repeat(mask[None], batch, axis=0)}


StageCallback = Callable[[StageEvent], Awaitable[None] | None]


class Run:
    """One request through the stages: plans sizes and seeds, builds each stage's call from the
    parameters, reports stage events, and runs the shared tail (decoder, upsamplers, PNG
    encoding) for every operation."""

    def __init__(
        self,
        backend: StageBackend,
        params: GenerationParameters,
        info: PipelineInfo,
        *,
        operation: str,
        seeds: list[int],
        deadline: float | None,
        on_stage: StageCallback | None,
        stages_before_decode: int,
    ):
        sizes = info.output_sizes()
        self.size = sizes[-1] if params.size is None else params.size
        if self.size not in sizes:
            raise InvalidArgument(f"size: must be one of {sizes}, got {self.size}")
        self.backend, self.params, self.info, self.operation = backend, params, info, operation
        self.seeds, self.deadline, self.on_stage = seeds, deadline, on_stage
        self.batch = len(seeds)
        self.upsamplers = sizes.index(self.size)
        self.sizes = sizes
        self.total = stages_before_decode + 1 + self.upsamplers
        self.completed = 0
        self._started = time.perf_counter()

    @classmethod
    async def start(
        cls,
        backend: StageBackend,
        params: GenerationParameters,
        *,
        operation: str,
        batch: int | None = None,
        same_seed: bool = False,
        deadline: float | None = None,
        on_stage: StageCallback | None = None,
        stages_before_decode: int = 2,
    ) -> Run:
        """`operation`: one of unclip.parameters.OPERATIONS. `same_seed`: every row shares the
        request's seed (frames of an interpolation)."""
        params.validate(operation)
        info = await backend.describe()
        batch = params.n if batch is None else batch
        seed = secrets.randbelow(2**63) if params.seed is None else params.seed
        seeds = [seed] * batch if same_seed else image_seeds(seed, batch)
        return cls(
            backend,
            params,
            info,
            operation=operation,
            seeds=seeds,
            deadline=deadline,
            on_stage=on_stage,
            stages_before_decode=stages_before_decode,
        )

    async def call(self, call: StageCall[R], *, index: int = 0, **preview: Any) -> R:
        started = time.perf_counter()
        result = await self.backend.run(call, index=index, deadline=self.deadline, **preview)
        metrics.STAGE_SECONDS.labels(call.STAGE.value).observe(time.perf_counter() - started)
        return result

    async def finished(self, stage: Stage, index: int = 0) -> None:
        self.completed += 1
        now = time.perf_counter()
        if self.on_stage is not None:
            result = self.on_stage(StageEvent(stage, index, self.completed, self.total, now - self._started))
            if result is not None:
                await result
        self._started = now

    async def encode_prompts(self, prompts: list[str]) -> TextEncoding:
        text = await self.call(EncodeTextCall(prompts))
        await self.finished(Stage.ENCODER)
        return text

    async def encode_images(self, images: np.ndarray) -> np.ndarray:
        """CLIP image embeddings of uint8 [B, H, W, 3] images (reports no event: the caller does)."""
        return await self.call(EncodeImageCall(images))

    async def sample_prior(self, text: TextEncoding, seeds: list[int] | None = None) -> np.ndarray:
        seeds = self.seeds if seeds is None else seeds
        call = SampleCall(text.embeddings, text.encodings, text.mask, seeds=seeds, **self.params.stage_settings(Stage.PRIOR))
        embeddings = await self.call(call)
        await self.finished(Stage.PRIOR)
        return embeddings

    async def decode_and_upsample(
        self,
        embeddings: np.ndarray,
        text: TextEncoding | None,
        *,
        inpaint: Inpaint | None = None,
        on_preview: PreviewFn | None = None,
    ) -> np.ndarray:
        decode = DecodeCall(
            embeddings,
            seeds=self.seeds,
            text_encodings=None if text is None else text.encodings,
            text_mask=None if text is None else text.mask,
            text_embeddings=None if text is None else text.embeddings,
            **self.params.stage_settings(Stage.DECODER),
            **({} if inpaint is None else inpaint.at_size(self.sizes[0], self.batch)),
            float_images=self.upsamplers > 0,
        )
        images = await self.call(decode, on_preview=on_preview, preview_every=self.params.preview_every)
        await self.finished(Stage.DECODER)
        for index in range(self.upsamplers):
            upsample = UpsampleCall(
                images,
                seeds=self.seeds,
                **self.params.stage_settings(Stage.UPSAMPLER),
                **({} if inpaint is None else inpaint.at_size(self.sizes[index + 1], self.batch)),
                float_images=index + 1 < self.upsamplers,
            )
            images = await self.call(upsample, index=index)
            await self.finished(Stage.UPSAMPLER, index)
        return images

    async def results(self, images: np.ndarray, description: dict[str, Any]) -> list[GeneratedImage]:
        """PNGs carrying what produced them: the operation, its inputs, seed, settings, models.
        Encoded on a worker thread: a batch of large PNGs would hold up every other request
        on the event loop."""
        return await asyncio.to_thread(self._results, images, description)

    def _results(self, images: np.ndarray, description: dict[str, Any]) -> list[GeneratedImage]:
        # preview_every says how the image was watched, not what made it: a streamed image equals a plain one.
        shown = ("prompt", "seed", "n", "preview_every")
        settings = {key: value for key, value in asdict(self.params).items() if key not in shown}
        settings["size"] = self.size
        results = []
        for index, (image_seed, pixels) in enumerate(zip(self.seeds, images, strict=True)):
            chunks = {
                "operation": RECORDED_AS.get(self.operation, self.operation),
                **description,
                "seed": str(image_seed),
                "parameters": settings,
                "models": self.info.model_versions,
                "compute_batch": self.info.compute_batches,
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
    on_stage: StageCallback | None = None,
    on_preview: PreviewFn | None = None,
    inpaint: Inpaint | None = None,
) -> list[GeneratedImage]:
    """Prompt -> images. With `inpaint`, only its regenerate mask changes (an edit)."""
    run = await Run.start(
        backend, params, operation="generate" if inpaint is None else "edit", deadline=deadline, on_stage=on_stage
    )
    text = (await run.encode_prompts([params.prompt])).repeat(params.n)
    embeddings = await run.sample_prior(text)
    images = await run.decode_and_upsample(embeddings, text, inpaint=inpaint, on_preview=on_preview)
    return await run.results(images, {"prompt": params.prompt})
