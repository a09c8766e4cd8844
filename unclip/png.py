"""PNG encoding with the generation's prompt, seed and parameters in tEXt chunks."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def encode_png(pixels: np.ndarray, text: dict[str, Any]) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes; non-string values are stored as JSON."""
    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_text(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return dict(getattr(image, "text", {}))  # PNG images have text chunks; other formats none
