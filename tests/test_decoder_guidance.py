"""The decoder's guidance with a scale per condition: the image embedding's, then the caption's on top."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import tiny_decoder_config

from unclip.checkpoint import save_checkpoint
from unclip.config import DecoderSamplingDefaults, DecoderStageConfig
from unclip.errors import InvalidArgument
from unclip.models.unet import UNet
from unclip.options import SamplingOptions
from unclip.stages import load_engine
from unclip.stages.guidance import guided, guided_two_conditions
from unclip.validation import MAX_GUIDANCE_SCALE

FAST = SamplingOptions(steps=3)


def tiny_config(text_guidance_scale: float | None = None) -> DecoderStageConfig:
    sampling = DecoderSamplingDefaults(steps=3, guidance_scale=2.0, text_guidance_scale=text_guidance_scale)
    return dataclasses.replace(tiny_decoder_config(), sampling=sampling)


def random_weights(config: DecoderStageConfig) -> dict[str, torch.Tensor]:
    """Random weights everywhere (zero-initialised output layers included), so every condition
    changes the network's output."""
    torch.manual_seed(0)
    module = UNet(config.model)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return module.state_dict()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints with the same weights: one without a text scale, one with 5."""
    root = tmp_path_factory.mktemp("decoders")
    weights = random_weights(tiny_config())
    save_checkpoint(root / "plain", tiny_config(), weights)
    save_checkpoint(root / "text5", tiny_config(5.0), weights)
    return root


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(3)
    embeddings = rng.standard_normal((2, 64)).astype(np.float32)
    encodings = rng.standard_normal((2, 5, 64)).astype(np.float32)
    mask = np.array([[True] * 5, [True] * 3 + [False] * 2])
    return embeddings, dict(text_encodings=encodings, text_mask=mask)


def test_a_text_scale_equal_to_the_image_scale_is_plain_guidance(checkpoints, inputs):
    engine = load_engine("decoder", checkpoints / "plain")
    embeddings, text = inputs
    plain = engine.decode(embeddings, [1, 2], sampling=FAST, **text)
    same = engine.decode(embeddings, [1, 2], text_guidance_scale=2.0, sampling=FAST, **text)
    np.testing.assert_array_equal(plain, same)
    other = engine.decode(embeddings, [1, 2], text_guidance_scale=5.0, sampling=FAST, **text)
    assert not np.array_equal(plain, other)


def test_the_text_scale_changes_the_image_and_the_checkpoint_sets_its_default(checkpoints, inputs):
    plain = load_engine("decoder", checkpoints / "plain")
    text5 = load_engine("decoder", checkpoints / "text5")
    embeddings, text = inputs
    by_argument = plain.decode(embeddings, [1, 2], text_guidance_scale=5.0, sampling=FAST, **text)
    by_default = text5.decode(embeddings, [1, 2], sampling=FAST, **text)
    np.testing.assert_array_equal(by_argument, by_default)
    # The argument overrides the checkpoint's default.
    np.testing.assert_array_equal(
        text5.decode(embeddings, [1, 2], text_guidance_scale=2.0, sampling=FAST, **text),
        plain.decode(embeddings, [1, 2], sampling=FAST, **text),
    )


def test_three_pass_guidance_pairs_each_row_with_its_own_conditions():
    """With equal scales the tripled batch must give plain guidance's result: a row mixed up with
    another row's conditions, or a condition dropped in the wrong pass, would not."""

    def net(x, t, *, image, text, drop_image, drop_text):
        image = torch.where(drop_image[:, None], torch.zeros_like(image), image)
        text = torch.where(drop_text[:, None], torch.zeros_like(text), text)
        return x * t[:, None].float() + image * 2 + text**2

    x, t = torch.randn(3, 4), torch.tensor([3, 5, 7])
    kept, dropped = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    cond = dict(image=torch.randn(3, 4), text=torch.randn(3, 4), drop_image=kept, drop_text=kept)
    uncond = {**cond, "drop_image": dropped, "drop_text": dropped}
    image_only = {**cond, "drop_text": dropped}

    def model_output(guidance):
        x_in, t_in, conditioning = guidance.inputs(x, t)
        return guidance.output(net(x_in, t_in, **conditioning))

    expected = model_output(guided(cond, uncond, 3.0))
    torch.testing.assert_close(model_output(guided_two_conditions(cond, image_only, uncond, 3.0, 3.0)), expected)
    # Image guidance at 1 and text guidance at 0 leave the image-only prediction.
    torch.testing.assert_close(model_output(guided_two_conditions(cond, image_only, uncond, 1.0, 0.0)), net(x, t, **image_only))


def test_rows_decoded_together_match_rows_decoded_alone(checkpoints, inputs):
    engine = load_engine("decoder", checkpoints / "text5")
    embeddings, text = inputs
    both = engine.decode(embeddings, [7, 8], sampling=FAST, **text)
    for row, seed in enumerate([7, 8]):
        alone = engine.decode(
            embeddings[row : row + 1],
            [seed],
            sampling=FAST,
            text_encodings=text["text_encodings"][row : row + 1],
            text_mask=text["text_mask"][row : row + 1],
        )
        np.testing.assert_array_equal(both[row : row + 1], alone)


def test_without_text_the_text_scale_has_nothing_to_guide(checkpoints, inputs):
    plain = load_engine("decoder", checkpoints / "plain")
    text5 = load_engine("decoder", checkpoints / "text5")
    embeddings, _ = inputs
    np.testing.assert_array_equal(
        text5.decode(embeddings, [1, 2], sampling=FAST), plain.decode(embeddings, [1, 2], sampling=FAST)
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, MAX_GUIDANCE_SCALE + 1])
def test_bad_text_scales_are_refused_by_name(checkpoints, inputs, bad):
    engine = load_engine("decoder", checkpoints / "plain")
    embeddings, text = inputs
    with pytest.raises(InvalidArgument, match="text_guidance_scale"):
        engine.decode(embeddings, [1, 2], text_guidance_scale=bad, sampling=FAST, **text)


def test_a_bad_text_scale_in_the_checkpoint_is_refused_by_name(tmp_path, inputs):
    config = tiny_config(-2.0)
    save_checkpoint(tmp_path / "bad", config, random_weights(config))
    engine = load_engine("decoder", tmp_path / "bad")
    embeddings, text = inputs
    with pytest.raises(InvalidArgument, match="text_guidance_scale"):
        engine.decode(embeddings, [1, 2], sampling=FAST, **text)
