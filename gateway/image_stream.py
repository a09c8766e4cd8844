"""OpenAI's image streaming over HTTP: a running generation or edit as server-sent events.

With `stream: true` OpenAI's Images API answers `text/event-stream`, each event a JSON object
whose `type` is also the SSE event name (for edits, `image_edit.*` instead of
`image_generation.*`):

    image_generation.partial_image   b64_json, partial_image_index (0, 1, ...), size, created_at, ...
    image_generation.completed       b64_json, size, created_at, usage, ...
    error                            {"type": "error", "error": {message, type, param, code}}

In unclip a partial image is one of the decoder's clean-image estimates (at the decoder's side,
before the upsamplers), `partial_images` of them spread evenly over its steps; the last comes
after the decoder's final step. A request of n images sends each round of partial images and
then each completed image as one event per image, telling them apart by the `image_index`
extension field; completed events also carry the image's `seed`. `usage` is OpenAI's shape with
zero tokens: unclip counts none. With the `stage_events` extension field, each finished stage
is also sent as an `unclip.stage` event (OpenAI's clients pass such events through).

Bounded as GenerateStream is (`gateway.streaming`): the generation never waits for the reader,
and a partial image not yet sent is replaced by a newer one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from gateway.api import RequestOptions, Result
from gateway.streaming import PendingPreview, StreamEvents, preview_pngs
from unclip.errors import UnclipError
from unclip.pipeline import StageEvent
from unclip.serving import events_until_done

MAX_PARTIAL_IMAGES = 3  # as OpenAI's images API
# What each streamed operation's events are called (OpenAI's names).
EVENT_PREFIXES = {"generate": "image_generation", "edit": "image_edit"}
STAGE_EVENT = "unclip.stage"
_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0, "total_tokens": 0}
# Fields OpenAI's events carry that are the same for every unclip image.
_FORMAT = {"background": "opaque", "output_format": "png", "quality": "auto"}

log = logging.getLogger("unclip.gateway.http")

Run = Callable[[RequestOptions], Awaitable[Result]]
ErrorBody = Callable[[BaseException], dict[str, Any]]


def preview_every(partial_images: int, decoder_steps: int) -> int:
    """The decoder preview interval that gives at most `partial_images` previews (the last after
    the final step) over `decoder_steps` steps; 0 (none) for no partial images."""
    if partial_images <= 0:
        return 0
    return max(1, math.ceil(decoder_steps / partial_images))


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: its name, and its data as one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class ImageStream:
    """One streamed request: started with `start`, which returns once the request is admitted
    (its first event) or has failed, so that an invalid request is answered with a plain error
    before any event; then `events` gives the rest as SSE bytes."""

    def __init__(self, operation: str, *, stage_events: bool, error_body: ErrorBody) -> None:
        self.prefix = EVENT_PREFIXES[operation]
        self.stage_events = stage_events
        self.error_body = error_body
        self._queue = StreamEvents()
        self._partial_index = 0
        self._task: asyncio.Future[Result] | None = None
        self._admitted = asyncio.Event()

    def _on_preview(self, step: int, total: int, images: Any) -> None:
        self._admitted.set()
        self._queue.put_preview(PendingPreview(step, total, images))

    def _on_stage(self, event: StageEvent) -> None:
        self._admitted.set()  # every request reports its first stage once admitted; until then it may be refused
        if self.stage_events:
            self._queue.put(event)

    async def start(self, run: Run, options: RequestOptions, *, previews: bool) -> None:
        """Run the request; raise its error if it fails before its first event."""
        options = replace(options, want_url=False, on_stage=self._on_stage, on_preview=self._on_preview if previews else None)
        self._task = asyncio.ensure_future(run(options))
        admitted = asyncio.ensure_future(self._admitted.wait())
        try:
            await asyncio.wait([admitted, self._task], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._task.cancel()
            raise
        finally:
            admitted.cancel()
        if self._task.done() and not self._admitted.is_set():
            self._task.result()  # its error, answered as any request's

    async def events(self) -> AsyncIterator[bytes]:
        """The request's events as SSE bytes, ending with its completed images or an error event."""
        assert self._task is not None
        try:
            async for event in events_until_done(self._queue, self._task):
                if isinstance(event, PendingPreview):
                    for chunk in await self._partials(event):
                        yield chunk
                else:
                    yield sse(STAGE_EVENT, {"type": STAGE_EVENT, "stage": event.name, "seconds": round(event.seconds, 4)})
            try:
                result = await self._task
            except UnclipError as error:  # after the first event, only an error event can tell the client
                yield sse("error", {"type": "error", **self.error_body(error)})
                return
            except Exception as error:
                log.exception("streamed request failed")
                yield sse("error", {"type": "error", **self.error_body(error)})
                return
            for chunk in await asyncio.to_thread(self._completed, result):
                yield chunk
        finally:
            self._task.cancel()  # the client went away: stop the chain (and the stages' calls)

    def _event(self, kind: str, png: bytes, side: int, created: int, index: int, **fields: Any) -> bytes:
        """One image's event of `kind` ("partial_image" or "completed"), in OpenAI's shape."""
        name = f"{self.prefix}.{kind}"
        b64 = base64.b64encode(png).decode("ascii")
        data = {"type": name, "b64_json": b64, "created_at": created, "size": f"{side}x{side}", "image_index": index}
        return sse(name, data | fields | _FORMAT)

    async def _partials(self, preview: PendingPreview) -> list[bytes]:
        pngs, created = await asyncio.to_thread(preview_pngs, preview), int(time.time())
        side, number = preview.images.shape[1], self._partial_index
        self._partial_index += 1
        return [self._event("partial_image", png, side, created, i, partial_image_index=number) for i, png in enumerate(pngs)]

    def _completed(self, result: Result) -> list[bytes]:
        return [
            self._event("completed", image.png, image.width, result.created, i, seed=image.seed, usage=_USAGE)
            for i, image in enumerate(result.images)
        ]
