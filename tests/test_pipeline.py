"""The in-process pipeline: determinism, per-image seeds, sizes, metadata, validation."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from conftest import FAST_STEPS

from unclip.errors import DeadlineExceeded, InvalidArgument
from unclip.options import SamplingOptions
from unclip.parameters import DEFAULT_PRIOR_CANDIDATES, MAX_IMAGES_PER_REQUEST, GenerationParameters
from unclip.pipeline import generate
from unclip.png import read_png_text

PROMPT = "a red circle in the top left corner"


def run(stages, **kwargs):
    params = GenerationParameters(**{"prompt": PROMPT, **FAST_STEPS, **kwargs})
    return asyncio.run(generate(stages, params))


def test_same_seed_same_image(local_stages):
    first = run(local_stages, seed=11)
    second = run(local_stages, seed=11)
    assert first[0].png == second[0].png
    other = run(local_stages, seed=12)
    assert not np.array_equal(first[0].pixels, other[0].pixels)


def test_each_image_of_a_batch_is_reproducible_from_its_own_seed(local_stages):
    batch = run(local_stages, n=3, seed=40)
    assert [image.seed for image in batch] == [40, 41, 42]
    for image in batch:
        alone = run(local_stages, n=1, seed=image.seed)[0]
        np.testing.assert_array_equal(alone.pixels, image.pixels)
    assert not np.array_equal(batch[0].pixels, batch[1].pixels)


def test_random_seed_is_reported_and_reproduces(local_stages):
    image = run(local_stages)[0]
    again = run(local_stages, seed=image.seed)[0]
    np.testing.assert_array_equal(image.pixels, again.pixels)


def test_sizes_and_png_metadata(local_stages):
    small = run(local_stages, size=32, seed=5)[0]
    assert (small.width, small.height) == (32, 32)
    large = run(local_stages, size=128, seed=5)[0]
    assert (large.width, large.height) == (128, 128)
    text = read_png_text(large.png)
    assert text["prompt"] == PROMPT and text["seed"] == "5"
    parameters = json.loads(text["parameters"])
    assert parameters["size"] == 128 and parameters["decoder_steps"] == FAST_STEPS["decoder_steps"]
    assert set(json.loads(text["models"])) == {"clip", "prior", "decoder", "upsampler0"}
    with pytest.raises(InvalidArgument, match=r"size: must be one of \[32, 128\]"):
        run(local_stages, size=64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="circle " * 40), "context length"),
        (dict(n=0), "n: must be between"),
        (dict(n=MAX_IMAGES_PER_REQUEST + 1), "n: must be between"),
        (dict(seed=-1), "seed"),
        (dict(decoder_steps=0), "steps"),
        (dict(sampler="euler"), "sampler"),
        (dict(prior_candidates=0), "prior_candidates: must be between 1 and 16"),
        (dict(decoder_text_guidance_scale=-1.0), "text_guidance_scale"),
    ],
)
def test_bad_parameters(local_stages, kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        run(local_stages, **kwargs)


def test_deadline_stops_generation(local_stages):
    params = GenerationParameters(prompt=PROMPT, prior_steps=1000, decoder_steps=1000)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        asyncio.run(generate(local_stages, params, deadline=time.monotonic() + 0.5))
    assert time.monotonic() - started < 10


def test_guidance_and_sampler_change_the_image(local_stages):
    base = run(local_stages, seed=3, size=32)[0].pixels
    assert not np.array_equal(base, run(local_stages, seed=3, size=32, decoder_guidance_scale=1.0)[0].pixels)
    assert not np.array_equal(base, run(local_stages, seed=3, size=32, sampler="ddpm")[0].pixels)


def test_decoder_text_guidance_scale_changes_the_image(local_stages):
    # The shipped decoder guides by the image embedding at 2 and by the caption at 5 on top.
    base = run(local_stages, seed=3, size=32)[0].pixels
    # The caption at the image's scale: plain guidance at 2, not the default.
    assert not np.array_equal(base, run(local_stages, seed=3, size=32, decoder_text_guidance_scale=2.0)[0].pixels)
    # The defaults spelled out give the default image exactly.
    explicit = run(local_stages, seed=3, size=32, decoder_guidance_scale=2.0, decoder_text_guidance_scale=5.0)[0]
    np.testing.assert_array_equal(base, explicit.pixels)
    assert json.loads(read_png_text(explicit.png)["parameters"])["decoder_text_guidance_scale"] == 5.0


def test_generation_keeps_the_closer_of_two_prior_samples_by_default(local_stages):
    # As DALL-E 2. Seeds for which candidate 1 wins show that the default is not one candidate.
    assert DEFAULT_PRIOR_CANDIDATES == 2
    choices = {"default": {}, 1: dict(prior_candidates=1), 2: dict(prior_candidates=2)}
    images = {k: [run(local_stages, seed=s, size=32, **extra)[0].pixels for s in range(4)] for k, extra in choices.items()}
    for default, two in zip(images["default"], images[2], strict=True):
        np.testing.assert_array_equal(default, two)
    assert any(not np.array_equal(default, one) for default, one in zip(images["default"], images[1], strict=True))


def test_prior_keeps_the_candidate_closest_to_the_text(local_stages):
    # Six rows: in each, candidate 0 is the closest one time in six, so some row must gain.
    text = local_stages.encoder.encode_text([PROMPT, "a blue square", "a green triangle above a red circle"] * 2)
    options, seeds = SamplingOptions(steps=3), [7, 8, 9, 10, 11, 12]
    single = local_stages.prior.sample(text.embeddings, text.encodings, text.mask, seeds, sampling=options)
    best = local_stages.prior.sample(text.embeddings, text.encodings, text.mask, seeds, num_candidates=6, sampling=options)
    # Candidate 0 of a multi-candidate run is the single-candidate sample, so the kept one is at least as close.
    single_sim = np.sum(single * text.embeddings, axis=1)
    best_sim = np.sum(best * text.embeddings, axis=1)
    assert np.all(best_sim >= single_sim - 1e-6)
    assert np.any(best_sim > single_sim)
