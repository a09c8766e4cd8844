"""The gateway's image API, independent of transport: the gRPC ImageService and the
OpenAI-compatible HTTP API both call this.

It runs the pipeline (`unclip.pipeline`) on a stage backend, stores results in the object
store when one is configured, and answers retries that carry an idempotency key from storage.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import unclip
from unclip import metrics, observe, tracing
from unclip.errors import InvalidArgument
from unclip.images import edit_inputs, frames_to_gif, upload_to_rgb
from unclip.manipulations import interpolate, text_diff, variations
from unclip.parameters import GenerationParameters
from unclip.pipeline import GeneratedImage, Inpaint, PreviewFn, StageBackend, StageCallback, StageEvent, generate

if TYPE_CHECKING:
    from unclip.storage import ResultStore, StoredResult


GIF_NAME = "animation.gif"


@dataclass
class ResultImage:
    png: bytes
    seed: int
    width: int
    height: int
    url: str | None = None  # presigned GET, when the caller asked for URLs


@dataclass
class Result:
    request_id: str
    created: int  # unix seconds
    images: list[ResultImage]
    gif: bytes | None = None  # interpolations and text diffs, when asked for
    gif_url: str | None = None


@dataclass(frozen=True)
class RequestOptions:
    """How one request is served, whatever its operation: images as bytes or as URLs of the
    stored PNGs, the key that makes a retry return the stored result, the deadline (a
    time.monotonic() value), and the callbacks that report progress (previews: generations only)."""

    want_url: bool = False
    idempotency_key: str | None = None
    deadline: float | None = None
    on_stage: StageCallback | None = None
    on_preview: PreviewFn | None = None


# What an operation's work returns: the images, and the animated GIF of its frames if asked for.
Produced = tuple[list[GeneratedImage], bytes | None]
Producer = Callable[[StageCallback], Awaitable[Produced]]


class ImageAPI:
    """Every image operation the gateway offers, on a stage backend, with optional storage."""

    def __init__(self, backend: StageBackend, store: ResultStore | None = None):
        self.backend = backend
        self.store = store
        # Held only while a request with that key runs, so the map does not grow with every key.
        self._key_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def output_size(self, size: int | None) -> int:
        """The side the images will have (the largest available when None)."""
        sizes = (await self.backend.describe()).output_sizes()
        return sizes[-1] if size is None else size

    # -- operations ------------------------------------------------------------------------

    async def generate(self, params: GenerationParameters, options: RequestOptions = RequestOptions()) -> Result:
        async def produce(on_stage: StageCallback) -> Produced:
            images = await generate(
                self.backend, params, deadline=options.deadline, on_stage=on_stage, on_preview=options.on_preview
            )
            return images, None

        return await self._deliver("generate", params, {}, produce, options)

    async def variations(self, image: bytes, params: GenerationParameters, options: RequestOptions = RequestOptions()) -> Result:
        pixels = upload_to_rgb(image, await self.output_size(params.size))

        async def produce(on_stage: StageCallback) -> Produced:
            return await variations(self.backend, pixels, params, deadline=options.deadline, on_stage=on_stage), None

        return await self._deliver("variation", params, {"image": _digest(image)}, produce, options)

    async def edit(
        self, image: bytes, mask: bytes | None, params: GenerationParameters, options: RequestOptions = RequestOptions()
    ) -> Result:
        pixels, regenerate = edit_inputs(image, mask, await self.output_size(params.size))
        inpaint = Inpaint(pixels, regenerate)

        async def produce(on_stage: StageCallback) -> Produced:
            return await generate(self.backend, params, deadline=options.deadline, on_stage=on_stage, inpaint=inpaint), None

        inputs = {"image": _digest(image), "mask": _digest(mask or b"")}
        return await self._deliver("edit", params, inputs, produce, options)

    async def interpolate(
        self,
        params: GenerationParameters,
        frames: int,
        *,
        images: tuple[bytes, bytes] | None = None,
        prompts: tuple[str, str] | None = None,
        animated_gif: bool = False,
        options: RequestOptions = RequestOptions(),
    ) -> Result:
        if images is not None:
            side = await self.output_size(params.size)
            decoded = (upload_to_rgb(images[0], side, "images.first"), upload_to_rgb(images[1], side, "images.second"))
            inputs: dict[str, Any] = {"images": [_digest(images[0]), _digest(images[1])]}
        else:
            decoded, inputs = None, {"prompts": list(prompts or ())}

        async def produce(on_stage: StageCallback) -> Produced:
            results = await interpolate(
                self.backend, params, frames, images=decoded, prompts=prompts, deadline=options.deadline, on_stage=on_stage
            )
            return results, _gif(results) if animated_gif else None

        inputs |= {"frames": frames, "animated_gif": animated_gif}
        return await self._deliver("interpolation", params, inputs, produce, options)

    async def text_diff(
        self,
        image: bytes,
        caption: str,
        target_caption: str,
        params: GenerationParameters,
        frames: int,
        *,
        max_rotation: float = 0.5,
        animated_gif: bool = False,
        options: RequestOptions = RequestOptions(),
    ) -> Result:
        pixels = upload_to_rgb(image, await self.output_size(params.size))

        async def produce(on_stage: StageCallback) -> Produced:
            results = await text_diff(
                self.backend, pixels, caption, target_caption, params, frames, max_rotation=max_rotation,
                deadline=options.deadline, on_stage=on_stage,
            )  # fmt: skip
            return results, _gif(results) if animated_gif else None

        inputs = {
            "image": _digest(image),
            "caption": caption,
            "target_caption": target_caption,
            "frames": frames,
            "max_rotation": max_rotation,
            "animated_gif": animated_gif,
        }
        return await self._deliver("text_diff", params, inputs, produce, options)

    # -- storage and idempotency -----------------------------------------------------------

    async def _deliver(
        self, operation: str, params: GenerationParameters, inputs: dict[str, Any], produce: Producer, options: RequestOptions
    ) -> Result:
        want_url, idempotency_key = options.want_url, options.idempotency_key
        if (want_url or idempotency_key) and self.store is None:
            needs = "response format URL" if want_url else "an idempotency key"
            raise InvalidArgument(f"{needs} needs the gateway's object store; none is configured (UNCLIP_S3_ENDPOINT)")
        fingerprint = _digest(
            json.dumps({"operation": operation, "parameters": asdict(params), "inputs": inputs}, sort_keys=True).encode()
        )
        if idempotency_key is None:
            return await self._produce_and_store(uuid.uuid4().hex, operation, params, fingerprint, produce, options)
        if not 1 <= len(idempotency_key) <= 255:
            raise InvalidArgument("idempotency_key: must be 1 to 255 characters")
        request_id = "idem-" + _digest(idempotency_key.encode())[:40]
        # One generation per key in this gateway; a retry waits for it and then reads the stored result.
        lock = self._key_locks.get(request_id)
        if lock is None:
            lock = self._key_locks[request_id] = asyncio.Lock()
        async with lock:
            stored = await self._store().load(request_id)
            if stored is not None:
                if stored.record.get("fingerprint") != fingerprint:
                    raise InvalidArgument("idempotency_key: already used for a different request")
                return self._stored_result(stored, want_url)
            return await self._produce_and_store(request_id, operation, params, fingerprint, produce, options)

    async def _produce_and_store(
        self, request_id: str, operation: str, params: GenerationParameters, fingerprint: str, produce: Producer,
        options: RequestOptions,
    ) -> Result:  # fmt: skip
        timings: dict[str, float] = {}

        async def on_stage_timed(event: StageEvent) -> None:
            timings[event.name] = round(event.seconds, 4)
            if options.on_stage is not None:
                result = options.on_stage(event)
                if result is not None:
                    await result

        started = time.perf_counter()
        images, gif = await produce(on_stage_timed)
        timings["total"] = round(time.perf_counter() - started, 4)
        metrics.IMAGES.labels(operation).inc(len(images))
        created = int(time.time())
        result = Result(request_id, created, [ResultImage(i.png, i.seed, i.width, i.height) for i in images], gif=gif)
        if self.store is None:
            return result
        info = await self.backend.describe()
        record = {
            "request_id": request_id,
            "operation": operation,
            "created": created,
            "fingerprint": fingerprint,
            "parameters": asdict(params),
            "seeds": [i.seed for i in images],
            "sizes": [[i.width, i.height] for i in images],
            "models": info.model_versions,
            "compute_batch": info.compute_batches,
            "timings": timings,
            "software": f"unclip {unclip.__version__}",
            # The request that made it, to find its log lines and trace.
            "x_request_id": observe.current_request_id(),
            "trace_id": tracing.trace_id(),
        }
        extras = {GIF_NAME: (gif, "image/gif")} if gif is not None else None
        keys = await self.store.save(request_id, [i.png for i in images], record, extras)
        if options.want_url:
            for image, key in zip(result.images, keys, strict=True):
                image.url = self.store.presigned_url(key)
            if gif is not None:
                result.gif_url = self.store.presigned_url(self.store.key(request_id, GIF_NAME))
        return result

    def _stored_result(self, stored: StoredResult, want_url: bool) -> Result:
        store, record = self._store(), stored.record
        images = []
        for png, key, seed, (width, height) in zip(stored.images, stored.keys, record["seeds"], record["sizes"], strict=True):
            images.append(ResultImage(png, seed, width, height, store.presigned_url(key) if want_url else None))
        result = Result(stored.request_id, record["created"], images)
        if GIF_NAME in stored.extras:
            result.gif = stored.extras[GIF_NAME]
            result.gif_url = store.presigned_url(store.key(stored.request_id, GIF_NAME)) if want_url else None
        return result

    def _store(self) -> ResultStore:
        if self.store is None:  # _deliver refuses what needs a store before any work
            raise InvalidArgument("this needs the gateway's object store; none is configured (UNCLIP_S3_ENDPOINT)")
        return self.store


def _gif(results: list[GeneratedImage]) -> bytes:
    return frames_to_gif([r.pixels for r in results])


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
