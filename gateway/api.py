"""The gateway's image API, independent of transport: the gRPC ImageService and the
OpenAI-compatible HTTP API both call this.

It runs the pipeline (`unclip.pipeline`) on a stage backend, stores results in the object
store when one is configured, and answers retries that carry an idempotency key from storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import unclip
from gateway import idempotency
from gateway.admission import ConcurrencyLimit, GatewayLimits
from gateway.auth import Access, current_caller
from gateway.quotas import charge_current
from unclip import metrics, observe, tracing
from unclip.cost import check_cost, request_cost
from unclip.errors import InvalidArgument, Unavailable
from unclip.images import edit_inputs, frames_to_gif, upload_to_rgb
from unclip.manipulations import check_frames, interpolate, text_diff, variations
from unclip.parameters import MAX_PROMPT_CHARS, GenerationParameters
from unclip.pipeline import GeneratedImage, Inpaint, PreviewFn, StageBackend, StageCallback, StageEvent, generate

if TYPE_CHECKING:
    from unclip.storage import ResultStore, StoredResult


GIF_NAME = "animation.gif"
# What a caller is told when the object store fails; the details (host, bucket) go to the log.
STORE_DOWN = "the object store is unavailable"
log = logging.getLogger("unclip.gateway")


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
    time.monotonic() value), and the callbacks that report progress (previews: generations and edits)."""

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

    def __init__(
        self,
        backend: StageBackend,
        store: ResultStore | None = None,
        limits: GatewayLimits = GatewayLimits(),
        access: Access | None = None,
    ):
        self.backend = backend
        self.store = store
        self.limits = limits
        # Who may call, and each API key's quotas (`gateway.auth`); the protocol layers authenticate through it.
        self.access = access or Access()
        self.concurrency = ConcurrencyLimit(limits.max_concurrent_requests)
        # Held only while a request with that key runs, so the map does not grow with every key.
        self._key_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def output_size(self, size: int | None) -> int:
        """The side the images will have (the largest available when None); InvalidArgument for
        a side the models do not make (uploads are resized to it)."""
        sizes = (await self.backend.describe()).output_sizes()
        if size is not None and size not in sizes:
            raise InvalidArgument(f"size: must be one of {sizes}, got {size}")
        return sizes[-1] if size is None else size

    @contextlib.asynccontextmanager
    async def _admitted(
        self, params: GenerationParameters, operation: str, *, images: int, prior_samples: int = 0
    ) -> AsyncIterator[None]:
        """A request's checks before any work (its parameters, its size, its cost against the
        cap: `unclip.cost`), then its slot among the concurrent requests (`gateway.admission`)
        for as long as it runs. Uploads are decoded inside: they are work too. Its API key's
        quotas come first (`gateway.quotas`), so a key over them takes no slot from the others."""
        params.validate(operation)
        await self.output_size(params.size)
        info = await self.backend.describe()
        check_cost(request_cost(params, info, images=images, prior_samples=prior_samples), self.limits.max_request_cost)
        with self.access.admitted(images), self.concurrency.admitted():
            yield

    # -- operations ------------------------------------------------------------------------

    async def generate(self, params: GenerationParameters, options: RequestOptions = RequestOptions()) -> Result:
        async def produce(on_stage: StageCallback) -> Produced:
            images = await generate(
                self.backend, params, deadline=options.deadline, on_stage=on_stage, on_preview=options.on_preview
            )
            return images, None

        async with self._admitted(params, "generate", images=params.n, prior_samples=params.n):
            return await self._deliver("generate", params, {}, produce, options)

    async def variations(self, image: bytes, params: GenerationParameters, options: RequestOptions = RequestOptions()) -> Result:
        async with self._admitted(params, "variations", images=params.n):
            # Off the event loop, as every decode and encode of an image here: other requests go on meanwhile.
            pixels = await asyncio.to_thread(upload_to_rgb, image, await self.output_size(params.size))

            async def produce(on_stage: StageCallback) -> Produced:
                return await variations(self.backend, pixels, params, deadline=options.deadline, on_stage=on_stage), None

            return await self._deliver("variation", params, {"image": _digest(image)}, produce, options)

    async def edit(
        self, image: bytes, mask: bytes | None, params: GenerationParameters, options: RequestOptions = RequestOptions()
    ) -> Result:
        async with self._admitted(params, "edit", images=params.n, prior_samples=params.n):
            pixels, regenerate = await asyncio.to_thread(edit_inputs, image, mask, await self.output_size(params.size))
            inpaint = Inpaint(pixels, regenerate)

            async def produce(on_stage: StageCallback) -> Produced:
                images = await generate(
                    self.backend, params, deadline=options.deadline, on_stage=on_stage, on_preview=options.on_preview,
                    inpaint=inpaint,
                )  # fmt: skip
                return images, None

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
        check_frames(frames)
        _check_lengths({"prompts.first": prompts[0], "prompts.second": prompts[1]} if prompts is not None else {})
        # The prior samples the two ends when they are prompts; images are embedded instead.
        async with self._admitted(params, "interpolate", images=frames, prior_samples=0 if prompts is None else 2):
            if images is not None:
                side = await self.output_size(params.size)
                decoded = (
                    await asyncio.to_thread(upload_to_rgb, images[0], side, "images.first"),
                    await asyncio.to_thread(upload_to_rgb, images[1], side, "images.second"),
                )
                inputs: dict[str, Any] = {"images": [_digest(images[0]), _digest(images[1])]}
            else:
                decoded, inputs = None, {"prompts": list(prompts or ())}

            async def produce(on_stage: StageCallback) -> Produced:
                results = await interpolate(
                    self.backend, params, frames, images=decoded, prompts=prompts, deadline=options.deadline, on_stage=on_stage
                )
                return results, await asyncio.to_thread(_gif, results) if animated_gif else None

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
        check_frames(frames)
        _check_lengths({"caption": caption, "target_caption": target_caption})
        async with self._admitted(params, "text_diff", images=frames):
            pixels = await asyncio.to_thread(upload_to_rgb, image, await self.output_size(params.size))

            async def produce(on_stage: StageCallback) -> Produced:
                results = await text_diff(
                    self.backend, pixels, caption, target_caption, params, frames, max_rotation=max_rotation,
                    deadline=options.deadline, on_stage=on_stage,
                )  # fmt: skip
                return results, await asyncio.to_thread(_gif, results) if animated_gif else None

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
            # Previews do not change the images: a streamed request and a plain one are the same request.
            json.dumps(
                {"operation": operation, "parameters": asdict(replace(params, preview_every=0)), "inputs": inputs}, sort_keys=True
            ).encode()
        )
        if idempotency_key is None:
            return await self._produce_and_store(uuid.uuid4().hex, operation, params, fingerprint, produce, options)
        if not 1 <= len(idempotency_key) <= 255:
            raise InvalidArgument("idempotency_key: must be 1 to 255 characters")
        # Scoped to the API key: two keys' callers using the same idempotency key get their own results.
        caller = current_caller()
        scoped = idempotency_key if caller is None else f"{caller.key_id}\n{idempotency_key}"
        request_id = "idem-" + _digest(scoped.encode())[:40]
        # One request per key at a time in this gateway (the others wait here rather than poll the
        # store); across replicas, the result's lease in the store (`gateway.idempotency`).
        lock = self._key_locks.get(request_id)
        if lock is None:
            lock = self._key_locks[request_id] = asyncio.Lock()
        async with lock:

            async def generate(writer: str) -> Result:
                return await self._produce_and_store(request_id, operation, params, fingerprint, produce, options, writer)

            return await idempotency.once(
                self._store(), request_id, options.deadline, lambda stored: self._answer_stored(stored, fingerprint, want_url),
                generate,
            )  # fmt: skip

    def _answer_stored(self, stored: StoredResult, fingerprint: str, want_url: bool) -> Result:
        """A request with an idempotency key answered from storage (it takes nothing from its API
        key's images per minute: those are taken when a request generates)."""
        if stored.record.get("fingerprint") != fingerprint:
            raise InvalidArgument("idempotency_key: already used for a different request")
        return self._stored_result(stored, want_url)

    async def _produce_and_store(
        self, request_id: str, operation: str, params: GenerationParameters, fingerprint: str, produce: Producer,
        options: RequestOptions, writer: str | None = None,
    ) -> Result:  # fmt: skip
        """Generate, and store the result (exclusively, as `writer`, for an idempotency key's)."""
        timings: dict[str, float] = {}

        async def on_stage_timed(event: StageEvent) -> None:
            timings[event.name] = round(event.seconds, 4)
            if options.on_stage is not None:
                result = options.on_stage(event)
                if result is not None:
                    await result

        charge_current()  # the API key's images per minute (gateway.quotas), now that it generates
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
        from unclip.storage import ResultExists  # loaded with the store; minio is no import of this module's

        try:
            keys = await self.store.save(request_id, [i.png for i in images], record, extras, writer=writer)
        except ResultExists:
            # Another replica's writer saved this key's result first; it is the answer.
            log.info("result %s: another writer saved it first; answering with theirs", request_id)
            try:
                stored = await self.store.load(request_id)
            except Unavailable as error:
                log.warning("result %s: %s", request_id, error)
                stored = None
            if stored is None:  # unreadable now (the record exists: it cannot be gone but by hand)
                raise Unavailable(STORE_DOWN + "; retry with the same idempotency key") from None
            return self._answer_stored(stored, fingerprint, options.want_url)
        except Unavailable as error:
            # The save removed what it wrote. Images the caller gets in the answer are not lost
            # with the record; URLs would point at nothing.
            log.warning("result %s not stored: %s", request_id, error)
            if options.want_url:
                raise Unavailable(STORE_DOWN + "; ask for the images in the answer instead of URLs, or retry") from None
            return result
        if options.want_url:
            for image, key in zip(result.images, keys, strict=True):
                image.url = self.store.presigned_url(key)
            if gif is not None:
                result.gif_url = self.store.presigned_url(self.store.key(request_id, GIF_NAME, writer))
        return result

    def _stored_result(self, stored: StoredResult, want_url: bool) -> Result:
        store, record = self._store(), stored.record
        images = []
        for png, key, seed, (width, height) in zip(stored.images, stored.keys, record["seeds"], record["sizes"], strict=True):
            images.append(ResultImage(png, seed, width, height, store.presigned_url(key) if want_url else None))
        result = Result(stored.request_id, record["created"], images)
        if GIF_NAME in stored.extras:
            result.gif = stored.extras[GIF_NAME]
            gif_key = stored.extra_keys.get(GIF_NAME) or store.key(stored.request_id, GIF_NAME)
            result.gif_url = store.presigned_url(gif_key) if want_url else None
        return result

    def _store(self) -> ResultStore:
        if self.store is None:  # _deliver refuses what needs a store before any work
            raise InvalidArgument("this needs the gateway's object store; none is configured (UNCLIP_S3_ENDPOINT)")
        return self.store


def _check_lengths(texts: dict[str, str]) -> None:
    """Texts besides the prompt (interpolation prompts, text-diff captions) have the prompt's limit."""
    for name, text in texts.items():
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"{name}: {len(text)} characters exceed the limit of {MAX_PROMPT_CHARS}")


def _gif(results: list[GeneratedImage]) -> bytes:
    return frames_to_gif([r.pixels for r in results])


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
