"""What the SDK's calls return: images, animations and stream events, built from the responses."""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from unclip.v1 import images_pb2


@dataclass(frozen=True)
class StageProgress:
    """A pipeline stage finished (a `generate_stream` event).

    Attributes:
        stage: "encode", "prior", "decode" or "upsample" (`unclip.stage.Stage.event`).
        index: which upsampler, for "upsample" (0 = the first); 0 otherwise.
        completed: stages finished so far for this request, this one included.
        total: stages in total for this request.
        seconds: how long this stage took.
    """

    stage: str
    index: int
    completed: int
    total: int
    seconds: float


@dataclass(frozen=True, eq=False)
class GeneratedImage:
    """One generated image.

    Attributes:
        image: the decoded picture, already loaded; None when the image came as a URL.
        png: the PNG exactly as the server sent it, with the generation's metadata in text chunks;
            b"" when the image came as a URL.
        seed: the seed this image was generated from (reusing it reproduces the image).
        width, height: size in pixels.
        metadata: the PNG's text chunks; "prompt" (str), "seed" (int), and "parameters" and
            "models" and "compute_batch" (dicts decoded from JSON) when present, other chunks as strings. {} when the
            image came as a URL.
        url: with `response_format="url"`, the presigned URL of the stored PNG; None otherwise.
            The SDK never downloads it: fetch it yourself (any HTTP client) before it expires.
        request_id: names the request's stored result (also for idempotent retries); "" when
            the server sent none.
    """

    image: Image.Image | None
    png: bytes = field(repr=False)
    seed: int
    width: int
    height: int
    metadata: dict[str, Any] = field(repr=False)
    url: str | None = None
    request_id: str = ""

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the PNG to `path` byte for byte, metadata included.

        Raises ValueError for an image that came as a URL (there are no bytes to write).
        """
        if not self.png:
            raise ValueError(f"no PNG bytes to save: the image came as a URL ({self.url}); download it instead")
        with open(path, "wb") as file:
            file.write(self.png)

    @classmethod
    def from_png(
        cls, png: bytes, seed: int, *, url: str | None = None, request_id: str = "", size: tuple[int, int] | None = None
    ) -> GeneratedImage:
        """From the PNG bytes (b"" for an image sent as a URL); `size`: (width, height) as
        reported, by default the PNG's."""
        image = _load_png(png) if png else None
        if size is None:
            size = (0, 0) if image is None else image.size
        width, height = size
        return cls(
            image=image,
            png=png,
            seed=seed,
            width=width,
            height=height,
            metadata={} if image is None else _decode_metadata(dict(image.text)),  # type: ignore[attr-defined]
            url=url,
            request_id=request_id,
        )

    @classmethod
    def from_proto(cls, message: images_pb2.GeneratedImage, request_id: str = "") -> GeneratedImage:
        return cls.from_png(
            message.png, message.seed, url=message.url or None, request_id=request_id, size=(message.width, message.height)
        )


@dataclass(frozen=True)
class Preview:
    """The decoder's current estimate of the clean images (a `generate_stream` event).

    Sent every `preview_every` decoder steps and after the last one.

    Attributes:
        step: decoder steps done so far.
        total_steps: the decoder's steps in total.
        images: one picture per requested image, at the decoder's (base) size.
    """

    step: int
    total_steps: int
    images: list[Image.Image] = field(repr=False)


@dataclass(frozen=True, eq=False)
class Animation:
    """The frames of an interpolation or a text diff.

    Attributes:
        frames: the frames in order, the first input's end first; they all share one seed.
        gif: the frames as a looping animated GIF, when asked for with `animated_gif=True` and
            the response format is "png"; None otherwise.
        gif_url: the GIF's presigned URL, when asked for with `response_format="url"`; None otherwise.
        request_id: names the request's stored result; "" when the server sent none.
    """

    frames: list[GeneratedImage]
    gif: bytes | None = field(repr=False)
    gif_url: str | None
    request_id: str

    def save_gif(self, path: str | os.PathLike[str]) -> None:
        """Write the animated GIF to `path`.

        Raises ValueError when the response has no GIF bytes (not asked for, or sent as `gif_url`).
        """
        if self.gif is None:
            where = f"it came as a URL ({self.gif_url}); download it instead" if self.gif_url else "call with animated_gif=True"
            raise ValueError(f"no GIF bytes to save: {where}")
        with open(path, "wb") as file:
            file.write(self.gif)


StreamEvent = StageProgress | Preview | list[GeneratedImage]


def _decode_metadata(text: dict[str, str]) -> dict[str, Any]:
    metadata: dict[str, Any] = dict(text)
    # Chunks that do not parse are not ours to reject: the image itself is fine, so keep the raw text.
    if "seed" in metadata:
        with contextlib.suppress(ValueError):
            metadata["seed"] = int(metadata["seed"])
    for key in ("parameters", "models", "compute_batch"):
        if key in metadata:
            with contextlib.suppress(ValueError):
                metadata[key] = json.loads(metadata[key])
    return metadata


def _load_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def images_from_response(response: images_pb2.GenerateResponse) -> list[GeneratedImage]:
    return [GeneratedImage.from_proto(image, response.request_id) for image in response.images]


def animation_from_response(response: images_pb2.GenerateResponse) -> Animation:
    return Animation(
        frames=images_from_response(response),
        gif=response.gif or None,
        gif_url=response.gif_url or None,
        request_id=response.request_id,
    )


def event_from_stream(response: images_pb2.GenerateStreamResponse) -> StreamEvent | None:
    """The SDK's form of one GenerateStream message; None for an event this SDK does not know."""
    kind = response.WhichOneof("event")
    if kind == "result":
        return images_from_response(response.result)
    if kind == "progress":
        return progress_from_proto(response.progress)
    if kind == "preview":
        preview = response.preview
        return Preview(preview.step, preview.total_steps, [_load_png(png) for png in preview.png])
    return None


def progress_from_proto(message: images_pb2.StageProgress) -> StageProgress:
    name = images_pb2.Stage.Name(message.stage) if message.stage in images_pb2.Stage.values() else "STAGE_UNKNOWN"
    return StageProgress(
        stage=name.removeprefix("STAGE_").lower(),
        index=message.stage_index,
        completed=message.completed_stages,
        total=message.total_stages,
        seconds=message.stage_seconds,
    )
