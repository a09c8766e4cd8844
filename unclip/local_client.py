"""The client SDK's interface, run in this process: `LocalClient` has `Client`'s methods, keyword
arguments and result types, and runs the image API on the in-process stages.

What `unclip generate` and the other image commands call when no --server is given, so every
command is written once for both. Its errors are the SDK's (`unclip.errors`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from gateway.api import ImageAPI, RequestOptions, Result
from unclip.client.requests import ImageInput, image_bytes
from unclip.client.types import Animation, GeneratedImage, Preview, StageProgress, StreamEvent
from unclip.local import LocalStages
from unclip.parameters import GenerationParameters, check_names
from unclip.pipeline import StageEvent

_DONE = object()


class LocalClient:
    """`Client`'s methods on the in-process stages. `weights`: a directory with one checkpoint
    per stage kind (None: the shipped weights); `stages`: already loaded ones instead.
    `timeout`: seconds per call. `progress(step, total)` is called after every diffusion step."""

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        stages: LocalStages | None = None,
        timeout: float | None = 600.0,
        progress: Any = None,
    ):
        self.stages = stages if stages is not None else LocalStages.load(weights)
        if progress is not None:
            self.stages.progress = lambda step, total, x0: progress(step, total)
        self.api = ImageAPI(self.stages)
        self.timeout = timeout

    def generate(self, prompt: str, **parameters: Any) -> list[GeneratedImage]:
        params = self._parameters("generate", parameters, prompt)
        return _images(self._run(lambda deadline: self.api.generate(params, RequestOptions(deadline=deadline))))

    def generate_stream(self, prompt: str, **parameters: Any) -> Iterator[StreamEvent]:
        """Stage progress and decoder previews as the work goes on, then the images. The
        generation runs on a thread of its own; leaving the iteration early cancels it."""
        params = self._parameters("generate_stream", parameters, prompt)
        events: queue.Queue[Any] = queue.Queue()
        loop = asyncio.new_event_loop()

        def on_stage(event: StageEvent) -> None:
            events.put(StageProgress(event.stage.event, event.index, event.completed, event.total, event.seconds))

        def on_preview(step: int, total: int, images: Any) -> None:
            events.put(Preview(step, total, [Image.fromarray(pixels) for pixels in images]))

        options = RequestOptions(deadline=self._deadline(), on_stage=on_stage, on_preview=on_preview)
        task = loop.create_task(self.api.generate(params, options))

        def work() -> None:
            try:
                events.put((_DONE, loop.run_until_complete(task)))
            except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
                events.put((_DONE, error))
            finally:
                loop.close()

        thread = threading.Thread(target=work, name="unclip-local-stream", daemon=True)
        thread.start()
        try:
            while True:
                item = events.get()
                if isinstance(item, tuple) and item[0] is _DONE:
                    if isinstance(item[1], BaseException):
                        raise item[1]
                    yield _images(item[1])
                    return
                yield item
        finally:
            if thread.is_alive():
                loop.call_soon_threadsafe(task.cancel)
            thread.join()

    def variations(self, image: ImageInput, **parameters: Any) -> list[GeneratedImage]:
        params = self._parameters("variations", parameters)
        data = image_bytes(image, "image")
        return _images(self._run(lambda deadline: self.api.variations(data, params, RequestOptions(deadline=deadline))))

    def edit(self, image: ImageInput, prompt: str, *, mask: ImageInput | None = None, **parameters: Any) -> list[GeneratedImage]:
        params = self._parameters("edit", parameters, prompt)
        data, mask_data = image_bytes(image, "image"), None if mask is None else image_bytes(mask, "mask")
        return _images(self._run(lambda deadline: self.api.edit(data, mask_data, params, RequestOptions(deadline=deadline))))

    def interpolate(
        self,
        *,
        images: tuple[ImageInput, ImageInput] | None = None,
        prompts: tuple[str, str] | None = None,
        frames: int = 5,
        animated_gif: bool = False,
        **parameters: Any,
    ) -> Animation:
        params = self._parameters("interpolate", parameters)
        ends: dict[str, Any] = {"prompts": prompts}
        if images is not None:
            ends = {"images": (image_bytes(images[0], "images[0]"), image_bytes(images[1], "images[1]"))}
        return _animation(
            self._run(
                lambda deadline: self.api.interpolate(
                    params, frames, animated_gif=animated_gif, options=RequestOptions(deadline=deadline), **ends
                )
            )
        )

    def text_diff(
        self,
        image: ImageInput,
        caption: str,
        target_caption: str,
        *,
        frames: int = 5,
        max_rotation: float | None = None,
        animated_gif: bool = False,
        **parameters: Any,
    ) -> Animation:
        params = self._parameters("text_diff", parameters)
        data = image_bytes(image, "image")
        rotation: dict[str, Any] = {} if max_rotation is None else {"max_rotation": max_rotation}
        return _animation(
            self._run(
                lambda deadline: self.api.text_diff(
                    data,
                    caption,
                    target_caption,
                    params,
                    frames,
                    animated_gif=animated_gif,
                    options=RequestOptions(deadline=deadline),
                    **rotation,
                )
            )
        )

    def close(self) -> None:
        """Nothing to release: the engines go with the object. For symmetry with `Client`."""

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _parameters(operation: str, given: dict[str, Any], prompt: str | None = None) -> GenerationParameters:
        check_names(operation, given)
        return GenerationParameters(**given) if prompt is None else GenerationParameters(prompt=prompt, **given)

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _run(self, operation: Any) -> Result:
        return asyncio.run(operation(self._deadline()))


def _images(result: Result) -> list[GeneratedImage]:
    return [GeneratedImage.from_png(image.png, image.seed, request_id=result.request_id) for image in result.images]


def _animation(result: Result) -> Animation:
    return Animation(frames=_images(result), gif=result.gif, gif_url=None, request_id=result.request_id)
