"""transformers CLIP -> open_clip conversion: tiny random transformers models, outputs compared within 1e-5."""

from __future__ import annotations

import open_clip
import pytest
import torch

from unclip.models.clip import encode_text_tokens, preprocess_images
from unclip.models.clip_import import NO_IMAGE_TOWER_KEY, build_open_clip, convert_state_dict, open_clip_config

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorms included), so any wrong or transposed mapping shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)


def text_model(vocab_size: int = 1000, eos: int | None = None, context: int = 77, act: str = "quick_gelu", seed: int = 0):
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=24,
        max_position_embeddings=context,
        hidden_act=act,
        eos_token_id=vocab_size - 1 if eos is None else eos,
        pad_token_id=1,
        bos_token_id=vocab_size - 2,
    )
    model = transformers.CLIPTextModelWithProjection(config).eval()
    randomise(model, seed)
    return model


def vision_model(image_size: int = 32, patch_size: int = 8, act: str = "quick_gelu", seed: int = 1):
    config = transformers.CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=24,
        hidden_act=act,
    )
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    randomise(model, seed)
    return model


def convert(text, vision=None) -> tuple[dict, open_clip.CLIP]:
    vision_config = None if vision is None else vision.config.to_dict()
    vision_state = None if vision is None else vision.state_dict()
    config = open_clip_config(text.config.to_dict(), vision_config)
    model = build_open_clip(config).eval()
    model.load_state_dict(convert_state_dict(text.state_dict(), vision_state, text.config.to_dict(), vision_config), strict=True)
    return config, model


def token_rows(vocab_size: int, eos: int, context: int, pad: int) -> torch.Tensor:
    """Rows of [bos, words..., eos, pad...] of several lengths (one filling the context), as a tokenizer gives."""
    gen = torch.Generator().manual_seed(7)
    rows = torch.full((4, context), pad)
    for row, length in zip(rows, (2, 5, context // 2, context), strict=True):
        # words below eos - 1 (the bos id in these configs), as in the OpenAI vocabulary
        row[:length] = torch.randint(0, eos - 1, (length,), generator=gen)
        row[0] = eos - 1
        row[length - 1] = eos
    return rows


@pytest.mark.parametrize(
    ("vocab_size", "eos", "context"),
    [
        (1000, 999, 77),
        (1000, 999, 16),
        (49408, 49407, 77),  # the OpenAI CLIP tokenizer's vocabulary
        (49408, 2, 77),  # legacy config (Karlo's): transformers pools at argmax, with eot 49407 in the ids
    ],
)
@torch.no_grad()
def test_text_tower_matches_transformers(vocab_size: int, eos: int, context: int) -> None:
    hf = text_model(vocab_size, eos, context)
    _, model = convert(hf)
    eot = vocab_size - 1  # the tokenizer's end-of-text id, whatever the config's eos_token_id says
    tokens = token_rows(vocab_size, eot, context, pad=0)  # open_clip's tokenizer pads with 0
    pooled, states = encode_text_tokens(model, tokens)

    # Identical ids: every position matches.
    out = hf(input_ids=tokens)
    torch.testing.assert_close(pooled, out.text_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(states, out.last_hidden_state, atol=ATOL, rtol=0)

    # The HF tokenizer pads differently (CLIP's pads with eot itself; 1 here is the config's pad id). The mask is causal,
    # so positions up to and including eos cannot see the padding and still match; later ones may differ.
    for hf_pad in (1, eot):
        hf_tokens = tokens.clone()
        hf_tokens[torch.arange(context) > (tokens == eot).int().argmax(dim=1, keepdim=True)] = hf_pad
        out = hf(input_ids=hf_tokens)
        torch.testing.assert_close(pooled, out.text_embeds, atol=ATOL, rtol=0)
        for row, end in enumerate((tokens == eot).int().argmax(dim=1).tolist()):
            torch.testing.assert_close(states[row, : end + 1], out.last_hidden_state[row, : end + 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("image_size", "patch_size", "act"), [(32, 8, "quick_gelu"), (30, 4, "gelu")])
@torch.no_grad()
def test_image_tower_matches_transformers(image_size: int, patch_size: int, act: str) -> None:
    text, vision = text_model(act=act), vision_model(image_size, patch_size, act=act)
    config, model = convert(text, vision)
    assert config[NO_IMAGE_TOWER_KEY] is False
    assert config["quick_gelu"] is (act == "quick_gelu")
    pixels = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.encode_image(pixels), vision(pixel_values=pixels).image_embeds, atol=ATOL, rtol=0)
    # unclip's image preprocessing finds open_clip's preprocess config on the model, as with create_model
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    assert preprocess_images(model, images).shape == (2, 3, image_size, image_size)
    assert open_clip.get_model_preprocess_cfg(model)["mean"] == open_clip.OPENAI_DATASET_MEAN
    # and the text tower still right alongside it
    tokens = token_rows(1000, 999, 77, pad=0)
    torch.testing.assert_close(encode_text_tokens(model, tokens)[0], text(input_ids=tokens).text_embeds, atol=ATOL, rtol=0)


def test_keys_match_open_clip_exactly() -> None:
    text, vision = text_model(), vision_model()
    config = open_clip_config(text.config.to_dict(), vision.config.to_dict())
    state = convert_state_dict(text.state_dict(), vision.state_dict(), text.config.to_dict(), vision.config.to_dict())
    expected = build_open_clip(config).state_dict()
    assert set(state) == set(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_text_only_has_a_marked_deterministic_placeholder_image_tower() -> None:
    text = text_model()
    config = open_clip_config(text.config.to_dict(), None)
    assert config[NO_IMAGE_TOWER_KEY] is True
    rng = torch.get_rng_state()
    first = convert_state_dict(text.state_dict(), None, text.config.to_dict(), None)
    assert torch.equal(torch.get_rng_state(), rng)  # the seeded init leaves the global RNG alone
    torch.manual_seed(123)
    second = convert_state_dict(text.state_dict(), None, text.config.to_dict(), None)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    model = build_open_clip(config)
    model.load_state_dict(first, strict=True)
    assert {k for k in first if k.startswith("visual.")} == {k for k in model.state_dict() if k.startswith("visual.")}
    # open_clip itself does not accept the marker, hence build_open_clip strips it
    with pytest.raises(TypeError):
        open_clip.model.CLIP(**config)


def test_building_registers_nothing_with_open_clip() -> None:
    before = open_clip.list_models()
    build_open_clip(open_clip_config(text_model().config.to_dict(), None))
    assert open_clip.list_models() == before


def test_legacy_position_ids_buffer_is_accepted() -> None:
    text = text_model(context=16)
    state = dict(text.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    convert_state_dict(state, None, text.config.to_dict(), None)
    state["text_model.embeddings.position_ids"] = torch.arange(16).flip(0).unsqueeze(0)
    with pytest.raises(ValueError, match="position_ids"):
        convert_state_dict(state, None, text.config.to_dict(), None)


def test_bad_state_dicts_raise_naming_the_key() -> None:
    text, vision = text_model(), vision_model()
    tcfg, vcfg = text.config.to_dict(), vision.config.to_dict()

    missing = dict(text.state_dict())
    del missing["text_model.encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"missing key 'text_model\.encoder\.layers\.1\.self_attn\.k_proj\.bias'"):
        convert_state_dict(missing, None, tcfg, None)

    misshapen = dict(vision.state_dict())
    misshapen["visual_projection.weight"] = misshapen["visual_projection.weight"].t()
    with pytest.raises(ValueError, match=r"'visual_projection\.weight' has shape \(32, 24\)"):
        convert_state_dict(text.state_dict(), misshapen, tcfg, vcfg)

    unexpected = {**text.state_dict(), "logit_scale": torch.tensor(1.0)}
    with pytest.raises(ValueError, match=r"unexpected keys.*logit_scale"):
        convert_state_dict(unexpected, None, tcfg, None)

    with pytest.raises(ValueError, match="vision_state"):
        convert_state_dict(text.state_dict(), None, tcfg, vcfg)


@pytest.mark.parametrize(
    ("tower", "change", "field"),
    [
        ("text", {"hidden_act": "gelu_new"}, r"text_config\.hidden_act='gelu_new'"),
        ("vision", {"hidden_act": "relu"}, r"vision_config\.hidden_act='relu'"),
        ("vision", {"hidden_act": "gelu"}, r"vision_config\.hidden_act='gelu': differs"),  # one flag for both towers
        ("text", {"layer_norm_eps": 1e-6}, r"text_config\.layer_norm_eps"),
        ("vision", {"projection_dim": 16}, r"vision_config\.projection_dim"),
        ("text", {"eos_token_id": 500}, r"text_config\.eos_token_id=500"),  # argmax pooling would pick the wrong token
        ("text", {"num_attention_heads": 5}, r"text_config\.num_attention_heads"),
        ("vision", {"num_channels": 1}, r"vision_config\.num_channels"),
    ],
)
def test_unrepresentable_configs_raise_naming_the_field(tower: str, change: dict, field: str) -> None:
    text = {**text_model().config.to_dict(), **(change if tower == "text" else {})}
    vision = {**vision_model().config.to_dict(), **(change if tower == "vision" else {})}
    with pytest.raises(ValueError, match=field):
        open_clip_config(text, vision)


def test_missing_config_field_is_named() -> None:
    text = text_model().config.to_dict()
    del text["intermediate_size"]
    with pytest.raises(ValueError, match=r"text_config\.intermediate_size: missing"):
        open_clip_config(text, None)


def test_mlp_ratio_round_trips_awkward_sizes() -> None:
    # width * (hidden / width) can round below hidden (e.g. 49 * (1 / 49) < 1); open_clip truncates with int().
    for width, hidden in [(49, 1), (768, 3072), (1024, 4096), (1280, 5120), (32, 37), (100, 333)]:
        text = {**text_model().config.to_dict(), "hidden_size": width, "num_attention_heads": 1, "intermediate_size": hidden}
        cfg = open_clip_config(text, None)["text_cfg"]
        assert int(cfg["width"] * cfg["mlp_ratio"]) == hidden
