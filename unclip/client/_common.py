"""What the sync and async clients share: result types, the SDK error, request building, retry timing.

Nothing here talks to the network (the only I/O is reading the image files a caller names), so
both clients wrap the same logic around their own way of calling and sleeping. Only grpcio,
protobuf and pillow are imported: the SDK must stay free of torch and of the server-side modules.
"""

from __future__ import annotations

import enum
import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from PIL import Image

from unclip.options import sampler_to_proto
from unclip.v1 import images_pb2


class _Default(enum.Enum):
    """Type of the `DEFAULT` sentinel (an enum so type checkers can narrow it)."""

    TOKEN = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default.TOKEN
"""Passed as a method's `timeout` (the default): use the timeout the client was created with."""

Timeout = float | None | _Default


class UnclipError(Exception):
    """A call to an unclip server failed.

    Attributes:
        code: the gRPC status (`grpc.StatusCode`) of the last attempt.
        details: the server's (or gRPC's) description of the failure.
        target: the address the client called.
        attempts: how many times the call was tried.
    """

    def __init__(self, message: str, *, code: grpc.StatusCode, details: str, target: str, attempts: int = 1):
        super().__init__(message)
        self.code = code
        self.details = details
        self.target = target
        self.attempts = attempts


@dataclass(frozen=True)
class StageProgress:
    """A pipeline stage finished (a `generate_stream` event).

    Attributes:
        stage: "encode", "prior", "decode" or "upsample".
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
            "models" (dicts decoded from JSON) when present, other chunks as strings. {} when the
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
    def from_proto(cls, message: images_pb2.GeneratedImage, request_id: str = "") -> GeneratedImage:
        image = _load_png(message.png) if message.png else None  # no PNG: the image came as a URL
        return cls(
            image=image,
            png=message.png,
            seed=message.seed,
            width=message.width,
            height=message.height,
            metadata={} if image is None else _decode_metadata(dict(image.text)),
            url=message.url or None,
            request_id=request_id,
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


def _decode_metadata(text: dict[str, str]) -> dict[str, Any]:
    metadata: dict[str, Any] = dict(text)
    if "seed" in metadata:
        try:
            metadata["seed"] = int(metadata["seed"])
        except ValueError:
            pass  # not ours to reject: the image itself is fine, so keep the raw text
    for key in ("parameters", "models"):
        if key in metadata:
            try:
                metadata[key] = json.loads(metadata[key])
            except ValueError:
                pass
    return metadata


def images_from_response(response: images_pb2.GenerateResponse) -> list[GeneratedImage]:
    return [GeneratedImage.from_proto(image, response.request_id) for image in response.images]


def animation_from_response(response: images_pb2.GenerateResponse) -> Animation:
    return Animation(
        frames=images_from_response(response),
        gif=response.gif or None,
        gif_url=response.gif_url or None,
        request_id=response.request_id,
    )


def _load_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


StreamEvent = StageProgress | Preview | list[GeneratedImage]


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


def build_parameters(
    prompt: str = "",
    *,
    n: int = 1,
    size: int | None = None,
    seed: int | None = None,
    prior_guidance_scale: float | None = None,
    decoder_guidance_scale: float | None = None,
    decoder_text_guidance_scale: float | None = None,
    prior_steps: int | None = None,
    decoder_steps: int | None = None,
    upsampler_steps: int | None = None,
    sampler: str | None = None,
    prior_candidates: int | None = None,
    preview_every: int = 0,
) -> images_pb2.GenerationParameters:
    """The request's parameters; those left as None are not set, so the server's defaults apply.

    Raises ValueError or TypeError for values that cannot be sent at all (wrong type, negative,
    unknown sampler); ranges the models accept are for the server to check.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: must be a str, got {type(prompt).__name__}")
    if n < 1:
        raise ValueError(f"n: must be at least 1, got {n}")
    if preview_every < 0:
        raise ValueError(f"preview_every: must be >= 0 (0 sends no previews), got {preview_every}")
    parameters = images_pb2.GenerationParameters(
        prompt=prompt, sampler=sampler_to_proto(sampler), preview_every=preview_every
    )
    given = {
        "n": n,
        "size": size,
        "seed": seed,
        "prior_guidance_scale": prior_guidance_scale,
        "decoder_guidance_scale": decoder_guidance_scale,
        "decoder_text_guidance_scale": decoder_text_guidance_scale,
        "prior_steps": prior_steps,
        "decoder_steps": decoder_steps,
        "upsampler_steps": upsampler_steps,
        "prior_candidates": prior_candidates,
    }
    for name, value in given.items():
        if value is None:
            continue
        try:
            setattr(parameters, name, value)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}: cannot send {value!r}: {error}") from None
    return parameters


RESPONSE_FORMATS = {"png": images_pb2.RESPONSE_FORMAT_PNG_BYTES, "url": images_pb2.RESPONSE_FORMAT_URL}


def build_delivery(response_format: str, idempotency_key: str | None) -> images_pb2.Delivery:
    """How the images come back, and the key that makes a retried request return the stored result."""
    if response_format not in RESPONSE_FORMATS:
        raise ValueError(f"response_format: must be one of {', '.join(map(repr, RESPONSE_FORMATS))}, got {response_format!r}")
    delivery = images_pb2.Delivery(response_format=RESPONSE_FORMATS[response_format])
    if idempotency_key is not None:
        if not isinstance(idempotency_key, str):
            raise TypeError(f"idempotency_key: must be a str, got {type(idempotency_key).__name__}")
        if not idempotency_key:
            raise ValueError("idempotency_key: must not be empty (pass None for no key)")
        delivery.idempotency_key = idempotency_key
    return delivery


ImageInput = bytes | str | os.PathLike[str] | Image.Image
"""An image to upload: encoded bytes (PNG, JPEG or WebP), a path to such a file, or a PIL image."""


def image_bytes(image: ImageInput, name: str) -> bytes:
    """The bytes to upload for `image`: as given, read from the path, or a PIL image as PNG.

    A PIL image keeps its alpha channel (or palette transparency), which edits use as the mask.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            data = file.read()
    elif isinstance(image, Image.Image):
        if image.mode not in ("RGB", "RGBA"):
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise TypeError(f"{name}: must be bytes, a path or a PIL image, got {type(image).__name__}")
    if not data:
        raise ValueError(f"{name}: empty")
    return data


def check_frames(frames: int) -> int:
    if not isinstance(frames, int):
        raise TypeError(f"frames: must be an int, got {type(frames).__name__}")
    if frames < 2:
        raise ValueError(f"frames: must be at least 2 (both ends included), got {frames}")
    return frames


def check_text(value: str, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: must be a str, got {type(value).__name__}")
    return value


def interpolate_endpoints(
    images: tuple[ImageInput, ImageInput] | None, prompts: tuple[str, str] | None
) -> dict[str, images_pb2.ImagePair | images_pb2.PromptPair]:
    """The request's `endpoints`: {"images": ImagePair} or {"prompts": PromptPair}."""
    if (images is None) == (prompts is None):
        raise ValueError("images, prompts: give exactly one of them (a pair of images or a pair of prompts)")
    if images is not None:
        first, second = _pair(images, "images")
        return {"images": images_pb2.ImagePair(first=image_bytes(first, "images[0]"), second=image_bytes(second, "images[1]"))}
    first, second = _pair(prompts, "prompts")
    return {"prompts": images_pb2.PromptPair(first=check_text(first, "prompts[0]"), second=check_text(second, "prompts[1]"))}


def _pair(value: tuple, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or len(value) != 2:
        raise ValueError(f"{name}: must be a pair (first, second)")
    return value[0], value[1]


def check_max_rotation(max_rotation: float | None) -> float | None:
    if max_rotation is not None and not 0.0 < max_rotation <= 1.0:
        raise ValueError(f"max_rotation: must be in (0, 1], got {max_rotation}")
    return max_rotation


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries calls that fail with UNAVAILABLE."""

    retries: int
    backoff: float
    max_backoff: float

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"backoff and max_backoff: must be >= 0, got {self.backoff} and {self.max_backoff}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 = the first): "full jitter" backoff."""
        return random.uniform(0.0, min(self.max_backoff, self.backoff * 2**retry))


def check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout: must be > 0 seconds or None, got {timeout}")
    return timeout


class Attempts:
    """The attempts of one call: each one's time budget, whether and when to retry, the final error.

    Every attempt gets the time left until the call's deadline, so retries never stretch a call
    beyond the timeout its caller asked for.
    """

    def __init__(self, method: str, target: str, policy: RetryPolicy, timeout: float | None):
        self.method = method
        self.target = target
        self.policy = policy
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.count = 0
        self._gave_up_at_deadline = False

    def start(self) -> float | None:
        """Count a new attempt and return its timeout: the time left, or None for no deadline."""
        self.count += 1
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    def retry_delay(self, error: grpc.RpcError) -> float | None:
        """Seconds to sleep before retrying after the attempt failed with `error`, or None to give up."""
        code, _ = _status_of(error)
        if code != grpc.StatusCode.UNAVAILABLE or self.count > self.policy.retries:
            return None
        delay = self.policy.delay(self.count - 1)
        # Sleeping past the deadline would only end in a timeout that hides the real failure.
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            self._gave_up_at_deadline = True
            return None
        return delay

    def error(self, rpc_error: grpc.RpcError) -> UnclipError:
        """The SDK error for the attempt that failed with `rpc_error` and was not retried."""
        code, details = _status_of(rpc_error)
        return self._error(code, details)

    def protocol_error(self, problem: str) -> UnclipError:
        """The SDK error for a server that answered, but not as the API says it must."""
        return self._error(grpc.StatusCode.INTERNAL, problem)

    def _error(self, code: grpc.StatusCode, details: str) -> UnclipError:
        message = f"{self.method} on {self.target} failed with {code.name}: {details or 'no details'}"
        if self._gave_up_at_deadline:
            message += f" (gave up after {self.count} attempts: the {self.timeout:g} s timeout would pass before the next attempt)"
        elif self.count > 1:
            message += f" (after {self.count} attempts)"
        return UnclipError(message, code=code, details=details, target=self.target, attempts=self.count)


def _status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    # grpc.RpcError itself promises nothing; the errors gRPC raises are also grpc.Call objects.
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return code or grpc.StatusCode.UNKNOWN, details or ""
