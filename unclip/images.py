"""Uploaded images: decoded defensively, then turned into the arrays the pipeline takes.

Uploads are untrusted. The format is checked, the pixel count is read from the header and
bounded before anything is decoded (decompression bombs), and every problem is an
InvalidArgument that says what was wrong.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from unclip.errors import InvalidArgument

# Per uploaded image, in gRPC and HTTP alike (OpenAI's limit); the gateway's gRPC message limit follows from it.
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")


def open_upload(data: bytes, name: str = "image") -> Image.Image:
    """Decode an uploaded image, keeping its alpha channel if it has one."""
    if not data:
        raise InvalidArgument(f"{name}: empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidArgument(f"{name}: {len(data)} bytes exceed the limit of {MAX_UPLOAD_BYTES}")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for garbage input
        raise InvalidArgument(f"{name}: not a readable image ({error})") from None
    if image.format not in UPLOAD_FORMATS:
        raise InvalidArgument(f"{name}: format {image.format} is not one of {', '.join(UPLOAD_FORMATS)}")
    width, height = image.size
    if width * height > MAX_UPLOAD_PIXELS:
        raise InvalidArgument(f"{name}: {width}x{height} pixels exceed the limit of {MAX_UPLOAD_PIXELS}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Exception as error:  # noqa: BLE001
        raise InvalidArgument(f"{name}: could not be decoded ({error})") from None
    if image.mode not in ("RGB", "RGBA"):
        return image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    return image


def _square(image: Image.Image) -> Image.Image:
    """Centre crop to a square: the models make square images."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def upload_to_rgb(data: bytes, side: int, name: str = "image") -> np.ndarray:
    """uint8 [side, side, 3]: centre-cropped, resized; any alpha is composited onto black."""
    image = _square(open_upload(data, name)).resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(image.convert("RGB"))


def edit_inputs(image_data: bytes, mask_data: bytes | None, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [side, side, 3], regenerate bool [side, side]) for an edit.

    As in OpenAI's Images API, fully transparent pixels (alpha 0) of the mask, or of the image
    itself when no mask is given, are the ones to regenerate.
    """
    image = open_upload(image_data, "image")
    if mask_data:
        mask_image = open_upload(mask_data, "mask")
        if mask_image.size != image.size:
            raise InvalidArgument(
                f"mask: size {mask_image.size[0]}x{mask_image.size[1]} must match the image's {image.size[0]}x{image.size[1]}"
            )
        if mask_image.mode != "RGBA":
            raise InvalidArgument("mask: needs an alpha channel; its fully transparent pixels mark the region to edit")
    elif image.mode == "RGBA":
        mask_image = image
    else:
        raise InvalidArgument("mask: not given, and the image has no alpha channel to mark the region to edit")
    alpha = _square(mask_image).getchannel("A").resize((side, side), Image.Resampling.NEAREST)
    regenerate = np.asarray(alpha) == 0
    if not regenerate.any():
        raise InvalidArgument("mask: no fully transparent pixels, so there is nothing to edit")
    rgb = _square(image).convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(rgb), regenerate


def frames_to_gif(frames: list[np.ndarray], seconds_per_frame: float = 0.25) -> bytes:
    """An animated GIF that loops forever."""
    buffer = io.BytesIO()
    pictures = [Image.fromarray(frame) for frame in frames]
    pictures[0].save(
        buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=int(seconds_per_frame * 1000), loop=0
    )
    return buffer.getvalue()
