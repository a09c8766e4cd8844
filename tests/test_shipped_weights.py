"""The shipped weights are trained: one-object images show the colour, shape and position their
prompts ask for.

A small, fixed sample of canonical prompts judged by the project's judge (the full measurement
is `unclip eval`, recorded in BENCHMARKS.md). Generation is deterministic, so this is a
regression test of the weights and of everything between them and the pixels: a broken
checkpoint, loader, sampler or chain fails it, and so do untrained weights, which draw no
objects. Two-object prompts are held to a lower bar than one-object ones, as the weights get
fewer of them right (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio

import pytest

from unclip.data.shapes import canonical_prompts, parse_caption
from unclip.eval.judge import judge
from unclip.pipeline import GenerationParameters, generate

PROMPTS = 10
MIN_ALL_RIGHT = 8  # colour, shape, position and no extra object; `unclip eval` measures 95 % on seen prompts
# Both colours and shapes, the relation and no third object. `unclip eval` measures 70-72.5 % on
# seen pairs; these 16 prompts and seeds give 7 right, and the bar leaves room for images that
# flip with floating-point order. Weights that cannot draw two bound objects get none right.
TWO_OBJECT_PROMPTS = 16
MIN_TWO_OBJECTS_RIGHT = 5


def generate_one(stages, prompt: str, seed: int):
    return asyncio.run(generate(stages, GenerationParameters(prompt=prompt, seed=seed)))[0].pixels


@pytest.fixture(scope="module")
def one_object_prompts() -> list[str]:
    prompts = [p for p in canonical_prompts(40, seed=11, split="train") if len(parse_caption(p).objects) == 1]
    return prompts[:PROMPTS]


def test_one_object_images_show_what_their_prompt_says(local_stages, one_object_prompts):
    verdicts = [judge(prompt, generate_one(local_stages, prompt, seed)) for seed, prompt in enumerate(one_object_prompts)]
    assert sum(v.correct for v in verdicts) >= MIN_ALL_RIGHT, [(p, v.details) for p, v in zip(one_object_prompts, verdicts)]


def test_two_object_images_show_both_objects_in_their_relation(local_stages):
    prompts = [p for p in canonical_prompts(40, seed=11, split="train") if len(parse_caption(p).objects) == 2]
    prompts = prompts[:TWO_OBJECT_PROMPTS]
    verdicts = [judge(prompt, generate_one(local_stages, prompt, seed)) for seed, prompt in enumerate(prompts)]
    assert sum(v.correct for v in verdicts) >= MIN_TWO_OBJECTS_RIGHT, [(p, v.details) for p, v in zip(prompts, verdicts)]


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
