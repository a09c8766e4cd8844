"""GenerateStream's events between the running generation and a client that may read slowly.

The generation never waits for the client: it puts events here and goes on. Stage progress
(a few per request) and the result are always delivered; previews are not worth keeping once a
newer one exists, so at most one waits at a time and a new one replaces it. A slow reader thus
holds at most one preview in memory and misses intermediate ones, and a preview's PNGs are
encoded only when it is sent, on a worker thread (`preview_message`).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any

import numpy as np

from unclip.png import encode_png
from unclip.v1 import images_pb2


@dataclass
class PendingPreview:
    """A decoder preview not yet encoded: uint8 [B, S, S, 3] estimates after `step` of `total`."""

    step: int
    total: int
    images: np.ndarray


class StreamEvents:
    """A queue of stream events (messages, or PendingPreview) with at most one preview waiting.
    Has what `unclip.serving.events_until_done` reads: get, get_nowait, empty."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._ready = asyncio.Event()
        self.dropped_previews = 0

    def put(self, event: Any) -> None:
        """An event that is always delivered (stage progress)."""
        self._items.append(event)
        self._ready.set()

    def put_preview(self, preview: PendingPreview) -> None:
        """A preview, replacing one still waiting (it is superseded)."""
        for index, item in enumerate(self._items):
            if isinstance(item, PendingPreview):
                del self._items[index]
                self.dropped_previews += 1
                break
        self.put(preview)

    def __len__(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


def preview_pngs(preview: PendingPreview) -> list[bytes]:
    """The preview's images as PNGs (run it off the event loop)."""
    return [encode_png(pixels, {}) for pixels in preview.images]


async def preview_message(preview: PendingPreview) -> images_pb2.GenerateStreamResponse:
    """The preview's message, its PNGs encoded off the event loop."""
    pngs = await asyncio.to_thread(preview_pngs, preview)
    return images_pb2.GenerateStreamResponse(preview=images_pb2.Preview(step=preview.step, total_steps=preview.total, png=pngs))
