"""One request per generation parameter, each with that parameter at a value other than its
default: the tests that show every parameter reaches the models, in-process and through every
transport, take their cases from here.

`NON_DEFAULT` must name every parameter of unclip.parameters (test_parameters checks it), so a
new parameter is covered by every one of those tests as soon as it is given a value here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from unclip.parameters import GenerationParameters, parameters
from unclip.pipeline import generate

# The compute batches the batched servers and in-process stages of the tests run at: room for
# a few requests' rows per evaluation, so that concurrent calls share them.
BATCHED = "encoder=4,prior=16,decoder=16,upsampler=4"

# Few steps: the point is that each setting arrives, not image quality.
BASE = dict(prompt="a green triangle at the bottom", seed=1, prior_steps=2, decoder_steps=2, upsampler_steps=1)

NON_DEFAULT: dict[str, Any] = {
    "prompt": "a blue square",
    "n": 2,
    "size": 32,
    "seed": 5,
    "prior_guidance_scale": 6.0,
    "decoder_guidance_scale": 5.0,
    "decoder_text_guidance_scale": 9.0,
    "prior_steps": 3,
    "decoder_steps": 3,
    "upsampler_steps": 2,
    "sampler": "ddpm",
    "prior_candidates": 3,  # the best of 3 is not the best of the default 2 here (1 would be)
    "preview_every": 1,
}
# Parameters whose effect is not on the first image's pixels, and what they change instead.
COUNTS_IMAGES = "n"
SENDS_PREVIEWS = "preview_every"
PARAMETER_NAMES = [item.name for item in parameters()]


def varied(name: str) -> dict[str, Any]:
    """The base request with parameter `name` changed."""
    return {**BASE, name: NON_DEFAULT[name]}


def as_keyword_arguments(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(prompt, the other parameters) as the client SDK takes them."""
    request = dict(request)
    return request.pop("prompt"), request


def generate_in_process(stages, request: dict[str, Any]) -> tuple[list, int]:
    """(images, previews received) for a request run on the in-process stages."""
    previews = []
    images = asyncio.run(
        generate(stages, GenerationParameters(**request), on_preview=lambda step, total, pixels: previews.append(step))
    )
    return images, len(previews)


def pixels(image) -> np.ndarray:
    """An image's pixels, whichever side produced it (pipeline or SDK result)."""
    return image.pixels if hasattr(image, "pixels") else np.asarray(image.image)
