"""Tests for the diffusion prior and the decoder / upsampler UNets (CPU, small configs)."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from unclip.models.prior import DiffusionPrior, PriorConfig
from unclip.models.unet import UNet, UNetConfig, decoder_config_tiny, upsampler_config_tiny

EMBED_DIM = 64
TEXT_WIDTH = 64


def perturb_parameters(model: nn.Module) -> nn.Module:
    """Zero-initialised output layers make a fresh net ignore its inputs; add noise so conditioning is observable."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def small_decoder_config() -> UNetConfig:
    return UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_downsample_rates=(1, 2),
        num_head_channels=16,
        image_embed_dim=EMBED_DIM,
        num_image_tokens=2,
        text_width=TEXT_WIDTH,
    )


def small_upsampler_config() -> UNetConfig:
    return UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_downsample_rates=(), low_res_channels=3)


@pytest.fixture(scope="module")
def prior() -> DiffusionPrior:
    torch.manual_seed(0)
    return perturb_parameters(DiffusionPrior(PriorConfig(width=64, layers=2, heads=4)))


@pytest.fixture(scope="module")
def decoder() -> UNet:
    torch.manual_seed(0)
    return perturb_parameters(UNet(small_decoder_config()))


def prior_inputs(batch: int = 3, num_tokens: int = 8) -> dict[str, torch.Tensor]:
    text_mask = torch.ones(batch, num_tokens, dtype=torch.bool)
    text_mask[:, num_tokens - 3 :] = False  # the last 3 positions are padding
    return dict(
        x_t=torch.randn(batch, EMBED_DIM),
        t=torch.randint(0, 1000, (batch,)),
        text_embed=torch.randn(batch, EMBED_DIM),
        text_encodings=torch.randn(batch, num_tokens, TEXT_WIDTH),
        text_mask=text_mask,
    )


def decoder_inputs(batch: int = 3, size: int = 16, num_tokens: int = 6) -> dict[str, torch.Tensor]:
    text_mask = torch.ones(batch, num_tokens, dtype=torch.bool)
    text_mask[:, num_tokens - 2 :] = False
    return dict(
        x=torch.randn(batch, 3, size, size),
        t=torch.randint(0, 1000, (batch,)),
        image_embed=torch.randn(batch, EMBED_DIM),
        text_encodings=torch.randn(batch, num_tokens, TEXT_WIDTH),
        text_mask=text_mask,
    )


def run_decoder(model: UNet, inputs: dict[str, torch.Tensor], **extra: torch.Tensor) -> torch.Tensor:
    inputs = dict(inputs, **extra)
    return model(inputs.pop("x"), inputs.pop("t"), **inputs)


# ---------------------------------------------------------------- shapes


def test_prior_output_shape() -> None:
    model = DiffusionPrior(PriorConfig())
    with torch.no_grad():
        out = model(**prior_inputs(batch=2, num_tokens=32))
    assert out.shape == (2, EMBED_DIM)


def test_decoder_preset_output_shape() -> None:
    model = UNet(decoder_config_tiny())
    with torch.no_grad():
        out = run_decoder(model, decoder_inputs(batch=2, size=32))
    assert out.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("low_res_size", [32, 16])
def test_upsampler_preset_runs_at_4x(low_res_size: int) -> None:
    model = UNet(upsampler_config_tiny())
    size = 4 * low_res_size
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size), torch.tensor([10]), low_res=torch.randn(1, 3, low_res_size, low_res_size))
    assert out.shape == (1, 3, size, size)


def test_unet_output_conv_is_zero_initialised() -> None:
    model = UNet(small_upsampler_config())
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), low_res=torch.randn(2, 3, 4, 4))
    assert torch.count_nonzero(out) == 0


# ---------------------------------------------------------------- prior conditioning and masking


@torch.no_grad()
def test_prior_depends_on_text_conditioning(prior: DiffusionPrior) -> None:
    inputs = prior_inputs()
    base = prior(**inputs)
    other_embed = prior(**dict(inputs, text_embed=torch.randn(3, EMBED_DIM)))
    encodings = inputs["text_encodings"].clone()
    encodings[:, 0] += 1.0  # a real token
    other_encodings = prior(**dict(inputs, text_encodings=encodings))
    other_x_t = prior(**dict(inputs, x_t=torch.randn(3, EMBED_DIM)))
    for changed in (other_embed, other_encodings, other_x_t):
        assert not torch.allclose(base, changed, atol=1e-4)


@torch.no_grad()
def test_prior_dropped_rows_ignore_text(prior: DiffusionPrior) -> None:
    inputs = prior_inputs()
    drop_text = torch.tensor([True, False, True])
    base = prior(**inputs, drop_text=drop_text)
    changed_inputs = dict(
        inputs,
        text_embed=torch.randn(3, EMBED_DIM),
        text_encodings=torch.randn(3, 8, TEXT_WIDTH),
        text_mask=torch.rand(3, 8) > 0.5,
    )
    changed = prior(**changed_inputs, drop_text=drop_text)
    torch.testing.assert_close(changed[drop_text], base[drop_text])
    assert not torch.allclose(changed[~drop_text], base[~drop_text], atol=1e-4)


@torch.no_grad()
def test_prior_ignores_padded_text_positions(prior: DiffusionPrior) -> None:
    inputs = prior_inputs(num_tokens=8)  # 5 real tokens, 3 padded
    base = prior(**inputs)
    garbage = inputs["text_encodings"].clone()
    garbage[:, 5:] = 1e4 * torch.randn(3, 3, TEXT_WIDTH)
    torch.testing.assert_close(prior(**dict(inputs, text_encodings=garbage)), base)
    # Trimming the padding away (fewer text tokens) gives the same prediction too.
    trimmed = dict(inputs, text_encodings=inputs["text_encodings"][:, :5], text_mask=inputs["text_mask"][:, :5])
    torch.testing.assert_close(prior(**trimmed), base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_prior_attention_is_causal(prior: DiffusionPrior) -> None:
    hidden_states = []
    handle = prior.blocks[-1].register_forward_hook(lambda module, args, output: hidden_states.append(output))
    try:
        inputs = prior_inputs(num_tokens=8)
        prior(**inputs)
        prior(**dict(inputs, x_t=torch.randn(3, EMBED_DIM)))
    finally:
        handle.remove()
    before, after = hidden_states
    x_t_position = 8 + 2  # [8 text tokens, text embed, timestep, x_t, query]
    torch.testing.assert_close(after[:, :x_t_position], before[:, :x_t_position])
    assert not torch.allclose(after[:, x_t_position:], before[:, x_t_position:], atol=1e-4)


@torch.no_grad()
def test_prior_all_masked_text_gives_finite_output(prior: DiffusionPrior) -> None:
    inputs = prior_inputs()
    inputs["text_mask"] = torch.zeros(3, 8, dtype=torch.bool)
    assert torch.isfinite(prior(**inputs)).all()
    assert torch.isfinite(prior(**inputs, drop_text=torch.ones(3, dtype=torch.bool))).all()


# ---------------------------------------------------------------- decoder conditioning


@torch.no_grad()
def test_decoder_depends_on_image_and_text(decoder: UNet) -> None:
    inputs = decoder_inputs()
    base = run_decoder(decoder, inputs)
    other_image = run_decoder(decoder, dict(inputs, image_embed=torch.randn(3, EMBED_DIM)))
    encodings = inputs["text_encodings"].clone()
    encodings[:, 0] += 1.0  # a real token
    other_text = run_decoder(decoder, dict(inputs, text_encodings=encodings))
    for changed in (other_image, other_text):
        assert not torch.allclose(base, changed, atol=1e-4)


@torch.no_grad()
def test_decoder_dropped_image_rows_ignore_image_embed(decoder: UNet) -> None:
    inputs = decoder_inputs()
    drop_image = torch.tensor([False, True, True])
    base = run_decoder(decoder, inputs, drop_image=drop_image)
    changed = run_decoder(decoder, dict(inputs, image_embed=torch.randn(3, EMBED_DIM)), drop_image=drop_image)
    torch.testing.assert_close(changed[drop_image], base[drop_image])
    assert not torch.allclose(changed[~drop_image], base[~drop_image], atol=1e-4)


@torch.no_grad()
def test_decoder_dropped_text_rows_ignore_text(decoder: UNet) -> None:
    inputs = decoder_inputs()
    drop_text = torch.tensor([True, False, True])
    base = run_decoder(decoder, inputs, drop_text=drop_text)
    changed_inputs = dict(inputs, text_encodings=torch.randn(3, 6, TEXT_WIDTH), text_mask=torch.rand(3, 6) > 0.5)
    changed = run_decoder(decoder, changed_inputs, drop_text=drop_text)
    torch.testing.assert_close(changed[drop_text], base[drop_text])
    assert not torch.allclose(changed[~drop_text], base[~drop_text], atol=1e-4)


@torch.no_grad()
def test_decoder_all_masked_text_gives_finite_output(decoder: UNet) -> None:
    inputs = dict(decoder_inputs(), text_mask=torch.zeros(3, 6, dtype=torch.bool))
    assert torch.isfinite(run_decoder(decoder, inputs)).all()
    everything_dropped = torch.ones(3, dtype=torch.bool)
    assert torch.isfinite(run_decoder(decoder, inputs, drop_text=everything_dropped, drop_image=everything_dropped)).all()


# ---------------------------------------------------------------- batch independence


@torch.no_grad()
def test_prior_rows_are_independent(prior: DiffusionPrior) -> None:
    inputs = prior_inputs()
    drop_text = torch.tensor([False, True, False])
    batched = prior(**inputs, drop_text=drop_text)
    alone = prior(**{name: value[:1] for name, value in inputs.items()}, drop_text=drop_text[:1])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


@torch.no_grad()
def test_decoder_rows_are_independent(decoder: UNet) -> None:
    inputs = decoder_inputs()
    batched = run_decoder(decoder, inputs, drop_image=torch.tensor([False, True, False]))
    alone = run_decoder(decoder, {name: value[:1] for name, value in inputs.items()}, drop_image=torch.tensor([False]))
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


@torch.no_grad()
def test_upsampler_rows_are_independent() -> None:
    torch.manual_seed(0)
    model = perturb_parameters(UNet(small_upsampler_config()))
    x, t, low_res = torch.randn(3, 3, 32, 32), torch.tensor([5, 500, 999]), torch.randn(3, 3, 8, 8)
    batched = model(x, t, low_res=low_res)
    alone = model(x[:1], t[:1], low_res=low_res[:1])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad_fields",
    [
        dict(attention_downsample_rates=(8,)),  # only 3 levels: factors 1, 2, 4
        dict(num_head_channels=40),  # 64 channels at the attention levels
        dict(attention_downsample_rates=()),  # text / image tokens need attention
        dict(channel_mult=()),
        dict(num_image_tokens=0),
    ],
)
def test_unet_rejects_inconsistent_configs(bad_fields: dict) -> None:
    with pytest.raises(ValueError):
        UNet(dataclasses.replace(decoder_config_tiny(), **bad_fields))


def test_unet_rejects_bad_inputs(decoder: UNet) -> None:
    upsampler = UNet(small_upsampler_config())
    inputs = decoder_inputs()
    t = inputs["t"]
    with pytest.raises(ValueError, match="not divisible"):
        run_decoder(decoder, dict(inputs, x=torch.randn(3, 3, 15, 15)))
    with pytest.raises(ValueError, match="not divisible"):
        upsampler(torch.randn(3, 3, 17, 17), t, low_res=torch.randn(3, 3, 8, 8))
    with pytest.raises(ValueError, match="image_embed"):
        upsampler(torch.randn(3, 3, 16, 16), t, low_res=torch.randn(3, 3, 4, 4), image_embed=torch.randn(3, EMBED_DIM))
    with pytest.raises(ValueError, match="text_encodings"):
        upsampler(torch.randn(3, 3, 16, 16), t, low_res=torch.randn(3, 3, 4, 4), text_encodings=torch.randn(3, 4, TEXT_WIDTH))
    with pytest.raises(ValueError, match="low_res"):
        upsampler(torch.randn(3, 3, 16, 16), t)
    with pytest.raises(ValueError, match="low_res"):
        run_decoder(decoder, inputs, low_res=torch.randn(3, 3, 8, 8))
    with pytest.raises(ValueError, match="image_embed"):
        run_decoder(decoder, dict(inputs, image_embed=None))


def test_prior_rejects_too_many_text_tokens(prior: DiffusionPrior) -> None:
    with pytest.raises(ValueError, match="context_length"):
        prior(**prior_inputs(num_tokens=prior.config.context_length + 1))


# ---------------------------------------------------------------- gradients


def assert_every_parameter_has_grad(model: nn.Module) -> None:
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters())


def test_gradients_reach_every_prior_parameter() -> None:
    torch.manual_seed(0)
    model = DiffusionPrior(PriorConfig(width=64, layers=2, heads=4))
    out = model(**prior_inputs(), drop_text=torch.tensor([True, False, False]))
    out.square().mean().backward()
    assert_every_parameter_has_grad(model)


def test_gradients_reach_every_unet_parameter() -> None:
    torch.manual_seed(0)
    decoder = UNet(small_decoder_config())
    drop = torch.tensor([True, False, False])
    run_decoder(decoder, decoder_inputs(), drop_image=drop, drop_text=drop.flip(0)).square().mean().backward()
    assert_every_parameter_has_grad(decoder)

    upsampler = UNet(small_upsampler_config())
    upsampler(torch.randn(2, 3, 16, 16), torch.tensor([3, 7]), low_res=torch.randn(2, 3, 4, 4)).square().mean().backward()
    assert_every_parameter_has_grad(upsampler)


@torch.no_grad()
def test_position_embeddings_start_neutral_and_tell_attention_where_it_is(decoder: UNet) -> None:
    config = dataclasses.replace(small_decoder_config(), position_embedding_size=16)
    positioned = UNet(config).eval()
    missing = positioned.load_state_dict(decoder.state_dict(), strict=False).missing_keys
    assert missing and all(name.endswith(".position") for name in missing)  # one per attention block
    inputs = decoder_inputs()
    # Zero-initialised, so a trained network gains them without changing what it computes...
    torch.testing.assert_close(run_decoder(positioned, inputs), run_decoder(decoder, inputs))
    # ...and once learned they make the output depend on where a feature is.
    for name in missing:
        positioned.get_parameter(name).normal_()
    assert not torch.allclose(run_decoder(positioned, inputs), run_decoder(decoder, inputs), atol=1e-4)
    with pytest.raises(ValueError, match="position embeddings for 16x16"):
        run_decoder(positioned, decoder_inputs(size=32))
    with pytest.raises(ValueError, match="multiple of 2"):
        UNet(dataclasses.replace(small_decoder_config(), position_embedding_size=15))


def with_new_parameters(decoder: UNet, new: list[str], **change) -> UNet:
    """`decoder` rebuilt with a config change: only the parameters `new` are added, zero-initialised,
    so that it still computes the same function (a trained network can be fine-tuned with them)."""
    changed = UNet(dataclasses.replace(decoder.config, **change)).eval()
    assert sorted(changed.load_state_dict(decoder.state_dict(), strict=False).missing_keys) == new
    inputs = decoder_inputs()
    torch.testing.assert_close(run_decoder(changed, inputs), run_decoder(decoder, inputs))
    return changed


@torch.no_grad()
def test_coordinate_channels_start_neutral_and_break_translation_invariance(decoder: UNet) -> None:
    placed = with_new_parameters(decoder, ["coordinate_conv.bias", "coordinate_conv.weight"], coordinate_channels=True)
    inputs = decoder_inputs()
    # Once learned, what they add to a blank input differs from place to place.
    blank = dict(inputs, x=torch.zeros_like(inputs["x"]))
    placed.coordinate_conv.weight.normal_()
    added = run_decoder(placed, blank) - run_decoder(decoder, blank)
    assert (added - added[:, :, :1, :1]).abs().amax() > 1e-3


@torch.no_grad()
def test_text_in_embedding_starts_neutral_then_hears_every_token(decoder: UNet) -> None:
    pooled = with_new_parameters(decoder, ["text_to_embed.bias", "text_to_embed.weight"], text_in_embedding=True)
    inputs = decoder_inputs()
    pooled.text_to_embed.weight.normal_()
    assert not torch.allclose(run_decoder(pooled, inputs), run_decoder(decoder, inputs), atol=1e-4)
    # What it hears is the mean of the real tokens; padding does not count.
    heard = []
    pooled.text_to_embed.register_forward_hook(lambda module, args, output: heard.append(args[0]))
    run_decoder(pooled, inputs)
    torch.testing.assert_close(heard[0], inputs["text_encodings"][:, :4].mean(dim=1))  # decoder_inputs pads the last two
    # Rows without text (dropped) get the same output whatever their tokens were.
    dropped = torch.ones(3, dtype=torch.bool)
    noise = dict(inputs, text_encodings=torch.randn_like(inputs["text_encodings"]))
    torch.testing.assert_close(run_decoder(pooled, inputs, drop_text=dropped), run_decoder(pooled, noise, drop_text=dropped))
    with pytest.raises(ValueError, match="text_in_embedding needs text_width"):
        UNet(dataclasses.replace(small_upsampler_config(), text_in_embedding=True))
