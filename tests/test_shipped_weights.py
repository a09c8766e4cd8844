"""The shipped weights are trained: images show the colour, shape and position or relation their
prompts ask for, for seen colour-shape pairs and for the held-out ones no training image showed.

A small, fixed sample of canonical prompts judged by the project's judge (the full measurement
is `unclip eval`, recorded in BENCHMARKS.md). Generation is deterministic, so this is a
regression test of the weights and of everything between them and the pixels: a broken
checkpoint, loader, sampler or chain fails it, and so do untrained weights, which draw no
objects. Two-object prompts are held to lower bars than one-object ones, as the weights get
fewer of them right (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from unclip.data.shapes import canonical_prompts, parse_caption
from unclip.eval.judge import judge
from unclip.parameters import GenerationParameters
from unclip.pipeline import generate

# Full-quality sampling with the shipped weights: minutes.
pytestmark = pytest.mark.slow

# (split, objects in the prompt): how many canonical prompts to judge and how many must come out
# right (colour, shape, position or relation, and no extra object). Bars sit a little under what
# these prompts and seeds give with the shipped weights (the figures in the comments), so an image
# that flips with floating-point order does not fail the test, and the two-object bars above what
# the set shipped before gets, which could not draw most held-out colour-shapes beside another.
# "Plain decoder guidance": the same weights with one guidance scale, 3, for the image embedding
# and the caption alike, as shipped before the caption got its own scale.
CASES = {
    ("train", 1): (10, 9),  # 10 right; with plain decoder guidance 9, the set before 9
    ("train", 2): (16, 13),  # 15 right; with plain decoder guidance 14, the set before 9
    ("heldout", 1): (10, 9),  # 10 right; with plain decoder guidance 10, the set before 9
    ("heldout", 2): (16, 9),  # 11 right; with plain decoder guidance 10, the set before 6
}
# The canonical prompt lists the bars were measured on.
DRAWN = {"train": 40, "heldout": 60}


def generate_one(stages, prompt: str, seed: int):
    return asyncio.run(generate(stages, GenerationParameters(prompt=prompt, seed=seed)))[0].pixels


@pytest.mark.parametrize(("split", "objects"), list(CASES), ids=[f"{s}-{n}-object" for s, n in CASES])
def test_images_show_what_their_prompt_says(local_stages, split, objects):
    count, minimum = CASES[split, objects]
    drawn = canonical_prompts(DRAWN[split], seed=11, split=split)
    prompts = [p for p in drawn if len(parse_caption(p).objects) == objects][:count]
    assert len(prompts) == count
    verdicts = [judge(prompt, generate_one(local_stages, prompt, seed)) for seed, prompt in enumerate(prompts)]
    assert sum(v.correct for v in verdicts) >= minimum, [
        (p, v.details) for p, v in zip(prompts, verdicts, strict=True) if not v.correct
    ]


def test_the_object_goes_where_the_prompt_says(local_stages):
    # Same seed, same object, opposite corners: each image is right for its own prompt only.
    top_left = "a red circle in the top left corner"
    bottom_right = "a red circle in the bottom right corner"
    images = {prompt: generate_one(local_stages, prompt, seed=0) for prompt in (top_left, bottom_right)}
    for prompt, other in ((top_left, bottom_right), (bottom_right, top_left)):
        assert judge(prompt, images[prompt]).correct, (prompt, judge(prompt, images[prompt]).details)
        assert not judge(other, images[prompt]).details["position_ok"], prompt


def test_the_picture_follows_the_prompt(local_stages):
    # Same seed, different prompts: each image has its own prompt's object and not the other's.
    red_circle = generate_one(local_stages, "a red circle in the center", seed=0)
    blue_square = generate_one(local_stages, "a blue square in the center", seed=0)
    for prompt, image, other in (
        ("a red circle", red_circle, blue_square),
        ("a blue square", blue_square, red_circle),
    ):
        verdict = judge(f"{prompt} in the center", image).details
        assert verdict["colour_ok"] and verdict["shape_ok"], (prompt, verdict)
        assert not judge(f"{prompt} in the center", other).details["colour_ok"]


@pytest.mark.parametrize("value", [0, 128, 255])
def test_upsampler_keeps_a_flat_background_flat_across_the_whole_image(local_stages, value: int):
    # Trained on crops a quarter of the image side only, the upsampler turned flat 32x32 inputs into
    # grain (standard deviation 12-14), lifted black to about 49, dimmed white to about 206 and drew a
    # stripe along the top edge of gray; fine-tuned on whole images it keeps them flat.
    out = local_stages.upsamplers[0].upsample(np.full((1, 32, 32, 3), value, np.uint8), [4])[0].astype(float)
    assert out.shape == (128, 128, 3)
    assert out.std() < 4, out.std()
    assert abs(out.mean() - value) < 8, out.mean()
    edges = (out[0], out[-1], out[:, 0], out[:, -1])
    assert max(abs(edge.mean(0) - value).max() for edge in edges) < 12
