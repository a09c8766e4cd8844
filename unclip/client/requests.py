"""Building each operation's request from a method's arguments, for both clients.

Generation parameters are the keyword arguments `unclip.parameters` defines for the operation;
those not given are not sent, so the server's defaults apply. Nothing here talks to the network
(the only I/O is reading the image files a caller names).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from PIL import Image

from unclip import codec
from unclip.client.types import Animation, GeneratedImage, animation_from_response, images_from_response
from unclip.parameters import GenerationParameters, check_names, describe
from unclip.v1 import images_pb2

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

ImageInput = bytes | str | os.PathLike[str] | Image.Image
"""An image to upload: encoded bytes (PNG, JPEG or WebP), a path to such a file, or a PIL image."""

RESPONSE_FORMATS = {"png": images_pb2.RESPONSE_FORMAT_PNG_BYTES, "url": images_pb2.RESPONSE_FORMAT_URL}


@dataclass(frozen=True)
class Rpc(Generic[T]):
    """A unary call ready to go: the ImageService method, its request, and how to read its response."""

    method: str
    request: Message
    parse: Callable[[Any], T]


def parameters(operation: str, given: dict[str, Any], prompt: str | None = None) -> images_pb2.GenerationParameters:
    """The request's GenerationParameters: the `given` keyword arguments (and the prompt) only.

    Raises TypeError for a name `operation` does not take or a value of the wrong type, and
    ValueError for one that cannot be sent (negative where the wire is unsigned, an unknown
    sampler, ...); ranges the models accept are for the server to check.
    """
    check_names(operation, given)
    if prompt is not None:
        given = {"prompt": prompt, **given}
    return codec.to_message(GenerationParameters(**given), images_pb2.GenerationParameters(), names=given)


def delivery(response_format: str, idempotency_key: str | None) -> images_pb2.Delivery:
    """How the images come back, and the key that makes a retried request return the stored result."""
    if response_format not in RESPONSE_FORMATS:
        raise ValueError(f"response_format: must be one of {', '.join(map(repr, RESPONSE_FORMATS))}, got {response_format!r}")
    message = images_pb2.Delivery(response_format=RESPONSE_FORMATS[response_format])
    if idempotency_key is not None:
        if not isinstance(idempotency_key, str):
            raise TypeError(f"idempotency_key: must be a str, got {type(idempotency_key).__name__}")
        if not idempotency_key:
            raise ValueError("idempotency_key: must not be empty (pass None for no key)")
        message.idempotency_key = idempotency_key
    return message


def image_bytes(image: ImageInput, name: str) -> bytes:
    """The bytes to upload for `image`: as given, read from the path, or a PIL image as PNG.

    A PIL image keeps its alpha channel (or palette transparency), which edits use as the mask.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif isinstance(image, str | os.PathLike):
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


def _frames(frames: int) -> int:
    if not isinstance(frames, int):
        raise TypeError(f"frames: must be an int, got {type(frames).__name__}")
    if frames < 2:
        raise ValueError(f"frames: must be at least 2 (both ends included), got {frames}")
    return frames


def _text(value: str, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: must be a str, got {type(value).__name__}")
    return value


def _pair(value: Any, name: str) -> tuple[Any, Any]:
    if isinstance(value, str | bytes) or len(value) != 2:
        raise ValueError(f"{name}: must be a pair (first, second)")
    return value[0], value[1]


# -- one builder per operation --------------------------------------------------------------


def generate(prompt: str, given: dict[str, Any], response_format: str, key: str | None) -> Rpc[list[GeneratedImage]]:
    request = images_pb2.GenerateRequest(
        parameters=parameters("generate", given, _text(prompt, "prompt")), delivery=delivery(response_format, key)
    )
    return Rpc("Generate", request, images_from_response)


def generate_stream(
    prompt: str, given: dict[str, Any], response_format: str, key: str | None
) -> images_pb2.GenerateStreamRequest:
    return images_pb2.GenerateStreamRequest(
        parameters=parameters("generate_stream", given, _text(prompt, "prompt")), delivery=delivery(response_format, key)
    )


def variations(image: ImageInput, given: dict[str, Any], response_format: str, key: str | None) -> Rpc[list[GeneratedImage]]:
    request = images_pb2.CreateVariationsRequest(
        parameters=parameters("variations", given), delivery=delivery(response_format, key), image=image_bytes(image, "image")
    )
    return Rpc("CreateVariations", request, lambda response: images_from_response(response.result))


def edit(
    image: ImageInput, prompt: str, mask: ImageInput | None, given: dict[str, Any], response_format: str, key: str | None
) -> Rpc[list[GeneratedImage]]:
    request = images_pb2.EditRequest(
        parameters=parameters("edit", given, _text(prompt, "prompt")),
        delivery=delivery(response_format, key),
        image=image_bytes(image, "image"),
        mask=b"" if mask is None else image_bytes(mask, "mask"),
    )
    return Rpc("Edit", request, lambda response: images_from_response(response.result))


def interpolate(
    images: tuple[ImageInput, ImageInput] | None,
    prompts: tuple[str, str] | None,
    frames: int,
    animated_gif: bool,
    given: dict[str, Any],
    response_format: str,
    key: str | None,
) -> Rpc[Animation]:
    if (images is None) == (prompts is None):
        raise ValueError("images, prompts: give exactly one of them (a pair of images or a pair of prompts)")
    request = images_pb2.InterpolateRequest(
        frames=_frames(frames),
        animated_gif=animated_gif,
        parameters=parameters("interpolate", given),
        delivery=delivery(response_format, key),
    )
    if images is not None:
        first, second = _pair(images, "images")
        request.images.CopyFrom(
            images_pb2.ImagePair(first=image_bytes(first, "images[0]"), second=image_bytes(second, "images[1]"))
        )
    else:
        first, second = _pair(prompts, "prompts")
        request.prompts.CopyFrom(images_pb2.PromptPair(first=_text(first, "prompts[0]"), second=_text(second, "prompts[1]")))
    return Rpc("Interpolate", request, lambda response: animation_from_response(response.result))


def text_diff(
    image: ImageInput,
    caption: str,
    target_caption: str,
    frames: int,
    max_rotation: float | None,
    animated_gif: bool,
    given: dict[str, Any],
    response_format: str,
    key: str | None,
) -> Rpc[Animation]:
    if max_rotation is not None and not 0.0 < max_rotation <= 1.0:
        raise ValueError(f"max_rotation: must be in (0, 1], got {max_rotation}")
    request = images_pb2.TextDiffRequest(
        caption=_text(caption, "caption"),
        target_caption=_text(target_caption, "target_caption"),
        frames=_frames(frames),
        max_rotation=max_rotation,
        animated_gif=animated_gif,
        parameters=parameters("text_diff", given),
        delivery=delivery(response_format, key),
        image=image_bytes(image, "image"),
    )
    return Rpc("TextDiff", request, lambda response: animation_from_response(response.result))


def takes_parameters(operation: str) -> Callable[[F], F]:
    """Document a client method's `**parameters`: the generation parameters `operation` takes."""

    def decorate(method: F) -> F:
        listing = describe(operation).replace("\n", "\n            ")
        method.__doc__ = (method.__doc__ or "").rstrip() + (
            "\n\n        Generation parameters (keyword arguments; those not given take the server's defaults):\n"
            f"            {listing}\n"
        )
        return method

    return decorate
