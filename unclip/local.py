"""The in-process stage backend: the engines in this process, no network.

Engines run in a worker thread so that an asyncio caller (the CLI's progress bar, a test)
stays responsive, and they stop between diffusion steps once the deadline passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from unclip.calls import StageCall, info_call
from unclip.cancel import CancelToken
from unclip.pipeline import PipelineInfo, PreviewFn, preview_due
from unclip.stage import Stage
from unclip.stages import load_engine
from unclip.stages.batcher import Batcher, BatchSettings
from unclip.stages.tensors import unit_to_images

R = TypeVar("R")
ProgressFn = Any  # unclip.stages.base.ProgressFn; kept a name here so this module needs no torch at import


class LocalStages:
    """The stages' engines in this process, each behind its own batcher (`unclip.stages.batcher`),
    so concurrent callers share network evaluations as a stage service's do."""

    def __init__(
        self, encoder: Any, prior: Any, decoder: Any, upsamplers: Sequence[Any], *, progress: ProgressFn | None = None,
        settings: Mapping[Stage, BatchSettings] | None = None,
    ):  # fmt: skip
        self.engines: dict[Stage, list[Any]] = {
            Stage.ENCODER: [encoder],
            Stage.PRIOR: [prior],
            Stage.DECODER: [decoder],
            Stage.UPSAMPLER: list(upsamplers),
        }
        settings = settings or {}
        self.batchers = {
            stage: [Batcher(engine, settings.get(stage, BatchSettings(compute_batch=engine.compute_batch))) for engine in engines]
            for stage, engines in self.engines.items()
        }
        self.progress = progress  # per diffusion step, for a progress bar

    @classmethod
    def load(
        cls, weights: str | Path | None = None, *, upsamplers: Sequence[str | Path] | None = None,
        settings: Mapping[Stage, BatchSettings] | None = None,
    ) -> LocalStages:  # fmt: skip
        """Engines from a weights directory holding one checkpoint per stage kind (clip/, prior/,
        decoder/, upsampler/); None takes the weights shipped in the package. `upsamplers`
        replaces the upsampler chain with these checkpoint directories. `settings`: each stage's
        compute batch and batching (default: row by row)."""
        settings = settings or {}

        def load(stage: Stage, path: str | Path | None) -> Any:
            return load_engine(stage, path, compute_batch=settings.get(stage, BatchSettings()).compute_batch)

        def directory(stage: Stage) -> Path | None:
            return None if weights is None else Path(weights) / stage.kind

        chain = [directory(Stage.UPSAMPLER)] if upsamplers is None else list(upsamplers)
        return cls(
            load(Stage.ENCODER, directory(Stage.ENCODER)),
            load(Stage.PRIOR, directory(Stage.PRIOR)),
            load(Stage.DECODER, directory(Stage.DECODER)),
            [load(Stage.UPSAMPLER, path) for path in chain],
            settings=settings,
        )

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every stage's model thread, letting running calls finish (up to `timeout` each).
        Not `close`: a gateway closes its backend's connections when it stops, and the stages
        may serve several front-ends; whoever loaded them shuts them down."""
        everyone = [batcher for batchers in self.batchers.values() for batcher in batchers]
        for batcher in everyone:
            batcher.close()
        for batcher in everyone:
            batcher.close(timeout)

    @property
    def encoder(self) -> Any:
        return self.engines[Stage.ENCODER][0]

    @property
    def prior(self) -> Any:
        return self.engines[Stage.PRIOR][0]

    @property
    def decoder(self) -> Any:
        return self.engines[Stage.DECODER][0]

    @property
    def upsamplers(self) -> list[Any]:
        return self.engines[Stage.UPSAMPLER]

    async def describe(self) -> PipelineInfo:
        def info(engine: Any, stage: Stage) -> Any:
            return info_call(stage)().run(engine)

        return PipelineInfo.from_models(
            info(self.encoder, Stage.ENCODER),
            info(self.prior, Stage.PRIOR),
            info(self.decoder, Stage.DECODER),
            [info(up, Stage.UPSAMPLER) for up in self.upsamplers],
        )

    async def run(
        self,
        call: StageCall[R],
        *,
        index: int = 0,
        deadline: float | None,
        on_preview: PreviewFn | None = None,
        preview_every: int = 0,
    ) -> R:
        if not call.QUEUED:
            return call.run(self.engines[call.STAGE][index])
        progress = self._progress(preview_every, on_preview)
        return await self.batchers[call.STAGE][index].submit(call, CancelToken(deadline=deadline), progress)

    def _progress(self, preview_every: int, on_preview: PreviewFn | None) -> ProgressFn | None:
        """The engine's per-step callback (it runs on the worker thread): the progress bar, and
        previews handed to the event loop every `preview_every` steps and after the last."""
        if on_preview is None or preview_every <= 0:
            return self.progress
        loop = asyncio.get_running_loop()

        def on_step(step: int, total: int, x0: Any) -> None:
            if self.progress is not None:
                self.progress(step, total, x0)
            done = step + 1
            if preview_due(done, total, preview_every):
                loop.call_soon_threadsafe(on_preview, done, total, unit_to_images(x0))

        return on_step
