"""A fixed set of generated PNGs against hashes recorded before a refactor (tests/data/golden_pngs.json).

Every operation and every sampling setting goes through the in-process image API; a refactor
that changes a pixel, or the metadata a PNG carries, fails here. Kernels round differently on a
CPU with other vector instructions, so the hashes hold where they were recorded: on another CPU
capability the test says so and skips instead of failing for a reason that is not the code's.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gateway.api import ImageAPI
from unclip.parameters import GenerationParameters

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_pngs.json").read_text())


def picture() -> bytes:
    """The uploaded image of the variation, text-diff and edit cases: a red square on white."""
    pixels = np.full((128, 128, 3), 255, np.uint8)
    pixels[20:60, 20:60] = (220, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def mask() -> bytes:
    """The edit's mask: the right half transparent, so regenerated."""
    rgba = np.full((128, 128, 4), 255, np.uint8)
    rgba[:, 64:, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


async def produce(api: ImageAPI, operation: str, parameters: dict, inputs: dict):
    parameters = dict(parameters)
    params = GenerationParameters(prompt=parameters.pop("prompt", ""), **parameters)
    if operation == "generate":
        return await api.generate(params)
    if operation == "variations":
        return await api.variations(picture(), params)
    if operation == "edit":
        return await api.edit(picture(), mask(), params)
    if operation == "interpolate":
        return await api.interpolate(params, inputs["frames"], prompts=tuple(inputs["prompts"]))
    assert operation == "text_diff", operation
    return await api.text_diff(
        picture(), inputs["caption"], inputs["target_caption"], params, inputs["frames"], max_rotation=inputs["max_rotation"]
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def api(local_stages) -> ImageAPI:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != GOLDEN["cpu_capability"]:
        pytest.skip(f"the hashes were recorded on a {GOLDEN['cpu_capability']} CPU; this one is {capability}")
    return ImageAPI(local_stages)


@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_generated_pngs_match_the_recorded_hashes(api, name):
    case = GOLDEN["cases"][name]
    result = asyncio.run(produce(api, case["operation"], case["parameters"], case["inputs"]))
    pngs = [image.png for image in result.images]
    pixels = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).tobytes() for png in pngs]
    assert [sha256(p) for p in pixels] == case["pixels_sha256"], "the pixels changed"
    assert [sha256(png) for png in pngs] == case["png_sha256"], "same pixels, but the PNG's metadata changed"


def test_every_case_is_an_image_of_its_own():
    """The cases differ: a setting that did nothing would have been recorded as a copy of another case."""
    hashes = [h for case in GOLDEN["cases"].values() for h in case["pixels_sha256"]]
    assert len(hashes) == len(set(hashes))
