"""Variations, interpolations, text diffs and edits through the gateway's ImageAPI, in-process
and (for determinism) through the gRPC services; upload checks."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
from PIL import Image

from gateway.api import ImageAPI, RequestOptions
from unclip.errors import InvalidArgument
from unclip.images import MAX_UPLOAD_PIXELS, edit_inputs, upload_to_rgb
from unclip.manipulations import slerp
from unclip.parameters import GenerationParameters
from unclip.png import read_png_text

FAST = dict(decoder_steps=2, upsampler_steps=1, prior_steps=2)


def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def api(local_stages):
    return ImageAPI(local_stages)


@pytest.fixture(scope="module")
def photo() -> bytes:
    rng = np.random.default_rng(0)
    return png_bytes(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def params(**kwargs) -> GenerationParameters:
    return GenerationParameters(**{"prompt": "", **FAST, **kwargs})


def test_slerp_keeps_unit_norm_and_ends():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(64), rng.standard_normal(64)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    frames = slerp(a, b, np.linspace(0, 1, 5))
    np.testing.assert_allclose(np.linalg.norm(frames, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(frames[0], a / np.linalg.norm(a), atol=1e-6)
    np.testing.assert_allclose(frames[-1], b / np.linalg.norm(b), atol=1e-6)
    # Equal angular steps: consecutive frames are equally far apart.
    steps = np.arccos(np.clip(np.sum(frames[1:] * frames[:-1], axis=1), -1, 1))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-4)


def test_slerp_interpolates_the_norm_of_embeddings_that_are_not_unit():
    """Karlo takes CLIP embeddings unnormalised: the ends keep their norms, the frames go between."""
    rng = np.random.default_rng(2)
    a, b = 3.0 * rng.standard_normal(64), 5.0 * rng.standard_normal(64)
    frames = slerp(a, b, np.linspace(0, 1, 5))
    np.testing.assert_allclose(frames[0], a, rtol=1e-5)
    np.testing.assert_allclose(frames[-1], b, rtol=1e-5)
    norms = np.linalg.norm(frames, axis=1)
    np.testing.assert_allclose(norms, np.linspace(np.linalg.norm(a), np.linalg.norm(b), 5), rtol=1e-5)
    unit = slerp(a / np.linalg.norm(a), b / np.linalg.norm(b), np.linspace(0, 1, 5))
    np.testing.assert_allclose(frames / norms[:, None], unit, atol=1e-6)  # the same directions


def test_variations_follow_the_image_embedding(api, photo):
    result = asyncio.run(api.variations(photo, params(n=2, seed=10, size=32)))
    assert [image.seed for image in result.images] == [10, 11]
    assert read_png_text(result.images[0].png)["operation"] == "variation"
    other = asyncio.run(api.variations(png_bytes(np.zeros((32, 32, 3), np.uint8)), params(n=1, seed=10, size=32)))
    # Same seed, different source image: the embedding changed, so the pixels do.
    assert not np.array_equal(pixels_of(result.images[0].png), pixels_of(other.images[0].png))
    again = asyncio.run(api.variations(photo, params(n=1, seed=11, size=32)))
    assert again.images[0].png == result.images[1].png


def test_interpolation_between_prompts_with_gif(api):
    result = asyncio.run(
        api.interpolate(params(size=32, seed=3), 4, prompts=("a red circle", "a blue square"), animated_gif=True)
    )
    assert len(result.images) == 4 and {image.seed for image in result.images} == {3}
    frames = [pixels_of(image.png) for image in result.images]
    assert not np.array_equal(frames[0], frames[-1])
    gif = Image.open(io.BytesIO(result.gif))
    assert gif.n_frames == 4
    assert json.loads(read_png_text(result.images[0].png)["prompts"]) == ["a red circle", "a blue square"]


def test_interpolation_between_images_starts_at_the_first(api, photo):
    black = png_bytes(np.zeros((32, 32, 3), np.uint8))
    result = asyncio.run(api.interpolate(params(size=32, seed=8), 3, images=(photo, black)))
    first_variation = asyncio.run(api.variations(photo, params(n=1, size=32, seed=8)))
    # Frame 0 is exactly the first image's embedding, decoded with the same seed.
    np.testing.assert_array_equal(pixels_of(result.images[0].png), pixels_of(first_variation.images[0].png))


def test_text_diff_frames_start_at_the_image(api, photo):
    result = asyncio.run(api.text_diff(photo, "a red circle", "a blue circle", params(size=32, seed=2), 3))
    variation = asyncio.run(api.variations(photo, params(n=1, size=32, seed=2)))
    np.testing.assert_array_equal(pixels_of(result.images[0].png), pixels_of(variation.images[0].png))
    assert not np.array_equal(pixels_of(result.images[0].png), pixels_of(result.images[-1].png))
    with pytest.raises(InvalidArgument, match="identical"):
        asyncio.run(api.text_diff(photo, "a red circle", "a red circle", params(size=32), 3))
    with pytest.raises(InvalidArgument, match="max_rotation"):
        asyncio.run(api.text_diff(photo, "a", "b", params(size=32), 3, max_rotation=1.5))


@pytest.mark.parametrize("size", [32, 128])
def test_edit_keeps_unmasked_pixels(api, size):
    rng = np.random.default_rng(size)
    source = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    alpha = np.full((size, size), 255, np.uint8)
    alpha[: size // 2, : size // 2] = 0  # regenerate the top-left quarter
    mask = png_bytes(np.dstack([source, alpha]), "RGBA")
    result = asyncio.run(api.edit(png_bytes(source), mask, params(prompt="a green square", seed=4, size=size)))
    edited = pixels_of(result.images[0].png)
    keep = alpha == 255
    np.testing.assert_array_equal(edited[keep], source[keep])
    assert not np.array_equal(edited[~keep], source[~keep])
    assert read_png_text(result.images[0].png)["operation"] == "edit"


def test_edit_uses_the_image_alpha_when_no_mask(api):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[20:, 20:, 3] = 0
    result = asyncio.run(api.edit(png_bytes(rgba, "RGBA"), None, params(prompt="a red circle", seed=1, size=32)))
    edited, transparent = pixels_of(result.images[0].png), rgba[..., 3] == 0
    assert (edited[~transparent] == 0).all()  # the opaque (black) pixels are kept
    assert (edited[transparent] != 0).any()  # the transparent region is generated anew


def test_uploads_are_checked():
    with pytest.raises(InvalidArgument, match="not a readable image"):
        upload_to_rgb(b"definitely not an image", 32)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(InvalidArgument, match="format GIF"):
        upload_to_rgb(gif.getvalue(), 32)
    # A decompression bomb: a tiny file that declares an enormous canvas.
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 100_000 and MAX_UPLOAD_PIXELS < 8000 * 8000
    with pytest.raises(InvalidArgument, match="exceed the limit"):
        upload_to_rgb(bomb.getvalue(), 32)
    truncated = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:2000]
    with pytest.raises(InvalidArgument, match=r"could not be decoded|not a readable"):
        upload_to_rgb(truncated, 32)
    image = png_bytes(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InvalidArgument, match="must match"):
        edit_inputs(image, png_bytes(np.zeros((16, 16, 4), np.uint8), "RGBA"), 32)
    with pytest.raises(InvalidArgument, match="no alpha channel"):
        edit_inputs(image, None, 32)
    with pytest.raises(InvalidArgument, match="nothing to edit"):
        edit_inputs(image, png_bytes(np.full((32, 32, 4), 255, np.uint8), "RGBA"), 32)


def test_bad_manipulation_arguments(api, photo):
    with pytest.raises(InvalidArgument, match="frames"):
        asyncio.run(api.interpolate(params(size=32), 1, prompts=("a", "b")))
    with pytest.raises(InvalidArgument, match="frames"):
        asyncio.run(api.interpolate(params(size=32), 17, prompts=("a", "b")))
    with pytest.raises(InvalidArgument, match="object store"):
        asyncio.run(api.variations(photo, params(size=32), RequestOptions(want_url=True)))
    with pytest.raises(InvalidArgument, match="object store"):
        asyncio.run(api.variations(photo, params(size=32), RequestOptions(idempotency_key="k")))
