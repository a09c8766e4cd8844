"""A stage backend for gateway tests that need no models: it answers every stage call with arrays
of the right shapes at once, or holds its calls until released, and records what it was asked."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from unclip.calls import DecodeCall, EncodeImageCall, EncodeTextCall, SampleCall, TextEncoding, UpsampleCall
from unclip.errors import DeadlineExceeded
from unclip.pipeline import PipelineInfo

EMBED_DIM = 8
BASE_SIZE = 32
FACTOR = 4  # one upsampler: sizes 32 and 128
DEFAULT_STEPS = {"prior": 32, "decoder": 25, "upsampler0": 10}  # as the shipped models'


class FakeStages:
    """StageBackend. `hold()` makes calls wait (honouring their deadlines) until `release()`;
    `previews` decoder previews go out for a decode with preview_every > 0."""

    def __init__(self, previews: int = 0) -> None:
        self.previews = previews
        self.calls: list[Any] = []
        self.deadlines: list[float | None] = []
        self._held: asyncio.Event | None = None
        self.decoded = asyncio.Event()

    def hold(self) -> None:
        self._held = asyncio.Event()

    def release(self) -> None:
        if self._held is not None:
            self._held.set()

    async def describe(self) -> PipelineInfo:
        versions = {"clip": "fake", "prior": "fake", "decoder": "fake", "upsampler0": "fake"}
        return PipelineInfo(BASE_SIZE, [FACTOR], versions, default_steps=dict(DEFAULT_STEPS))

    async def run(
        self, call: Any, *, index: int = 0, deadline: float | None, on_preview: Any = None, preview_every: int = 0
    ) -> Any:
        self.calls.append(call)
        self.deadlines.append(deadline)
        if self._held is not None:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._held.wait(), timeout)
            except TimeoutError:
                raise DeadlineExceeded(f"fake {call.STAGE.value}: the deadline passed") from None
        if isinstance(call, EncodeTextCall):
            rows = len(call.texts)
            embeddings = np.ones((rows, EMBED_DIM), np.float32) / np.sqrt(EMBED_DIM)
            return TextEncoding(embeddings, np.zeros((rows, 4, EMBED_DIM), np.float32), np.ones((rows, 4), bool))
        if isinstance(call, EncodeImageCall):
            return np.ones((len(call.images), EMBED_DIM), np.float32) / np.sqrt(EMBED_DIM)
        if isinstance(call, SampleCall):
            return np.ones((len(call.seeds), EMBED_DIM), np.float32) / np.sqrt(EMBED_DIM)
        if isinstance(call, DecodeCall):
            rows = len(call.seeds)
            if on_preview is not None and preview_every > 0:
                for step in range(1, self.previews + 1):
                    on_preview(step, self.previews, np.full((rows, BASE_SIZE, BASE_SIZE, 3), step % 256, np.uint8))
                    await asyncio.sleep(0)  # one preview per turn of the loop, as a real stream's
            self.decoded.set()
            return _images(rows, BASE_SIZE, call.float_images)
        if isinstance(call, UpsampleCall):
            return _images(len(call.seeds), call.images.shape[1] * FACTOR, call.float_images)
        raise AssertionError(f"unexpected call {call!r}")


def _images(rows: int, side: int, as_float: bool) -> np.ndarray:
    gradient = np.linspace(0, 255, side * side * 3, dtype=np.float32).reshape(1, side, side, 3)
    images = np.repeat(gradient, rows, axis=0)
    return (images / 127.5 - 1.0).astype(np.float32) if as_float else images.astype(np.uint8)
