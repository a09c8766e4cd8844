"""Tests for checkpoint directories (unclip.checkpoint, unclip.config) and loading engines from them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_decoder_config, tiny_prior_config, tiny_upsampler_config
from safetensors import safe_open

import unclip.checkpoint as checkpoint
from unclip.checkpoint import (
    CONFIG_FILE,
    FORMAT_VERSION,
    CheckpointError,
    load_weights,
    read_config,
    save_checkpoint,
    weights_path,
    weights_version,
)
from unclip.config import (
    ClipStageConfig,
    DecoderStageConfig,
    DiffusionConfig,
    PriorStageConfig,
    SamplingDefaults,
    UpsamplerStageConfig,
)
from unclip.models.prior import DiffusionPrior
from unclip.models.unet import UNet, decoder_config_tiny
from unclip.options import SamplingOptions
from unclip.stages import load_engine

ROOT = Path(__file__).resolve().parent.parent


def build_module(config) -> torch.nn.Module:
    torch.manual_seed(0)
    if isinstance(config, PriorStageConfig):
        return DiffusionPrior(config.model)
    return UNet(config.model)


def small_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=generator),
        "layer.bias": torch.randn(4, generator=generator),
        "counter": torch.tensor([1, 2, 3], dtype=torch.int64),
    }


def assert_state_dicts_equal(loaded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(original)
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def load_init_weights():
    spec = importlib.util.spec_from_file_location("unclip_tools_init_weights", ROOT / "tools" / "init_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    "make_config", [tiny_prior_config, tiny_decoder_config, tiny_upsampler_config], ids=["prior", "decoder", "upsampler"]
)
def test_round_trip_with_model(tmp_path, make_config):
    config = make_config()
    module = build_module(config)
    with torch.no_grad():  # make every tensor distinguishable from a fresh initialisation
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter))
    state = {k: v.clone() for k, v in module.state_dict().items()}

    directory = save_checkpoint(tmp_path / "ckpt", config, module.state_dict())
    assert directory == tmp_path / "ckpt"
    assert entries(directory) == sorted([CONFIG_FILE, config.weights])

    loaded_config = read_config(directory)
    assert type(loaded_config) is type(config)
    assert loaded_config == config
    # Nested dataclasses and tuples come back as such, not as dicts / lists.
    assert type(loaded_config.model) is type(config.model)
    assert isinstance(loaded_config.diffusion, DiffusionConfig)
    assert isinstance(loaded_config.sampling, SamplingDefaults)
    if isinstance(config, (DecoderStageConfig, UpsamplerStageConfig)):
        assert isinstance(loaded_config.model.channel_mult, tuple)
        assert isinstance(loaded_config.model.attention_downsample_rates, tuple)
        assert loaded_config.model.attention_downsample_rates == config.model.attention_downsample_rates

    weights = load_weights(directory, loaded_config)
    assert_state_dicts_equal(weights, state)
    fresh = build_module(loaded_config)
    fresh.load_state_dict(weights, strict=True)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state[name]), name

    with safe_open(str(weights_path(directory, config)), "pt") as handle:
        assert handle.metadata() == {"kind": config.kind}


def test_config_json_layout(tmp_path):
    config = tiny_decoder_config()
    save_checkpoint(tmp_path / "d", config, small_state_dict())
    data = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())
    assert data["format_version"] == FORMAT_VERSION == 1
    assert data["kind"] == "decoder"
    assert data["image_size"] == 16
    assert data["weights"] == "decoder.safetensors"
    assert data["model"]["channel_mult"] == [1, 2]
    assert data["model"]["model_channels"] == 16
    assert data["family"] == "unclip"
    assert data["diffusion"] == {
        "timesteps": 1000, "schedule": "cosine", "parameterization": "v", "variance": "fixed_small", "spacing": "even", "arithmetic": "float64",
        "min_snr_gamma": 0.0,
    }  # fmt: skip


def test_decoder_position_embeddings_must_match_its_image_size():
    with pytest.raises(ValueError, match="position_embedding_size 32 must be 0 or the image_size 16"):
        DecoderStageConfig(image_size=16)
    assert DecoderStageConfig(model=dataclasses.replace(decoder_config_tiny(), position_embedding_size=0), image_size=16)


def test_clip_round_trip(tmp_path):
    config = ClipStageConfig()
    state = small_state_dict(3)
    save_checkpoint(tmp_path / "clip", config, state)
    loaded = read_config(tmp_path / "clip")
    assert isinstance(loaded, ClipStageConfig)
    assert loaded == config and loaded.kind == "clip" and loaded.model_name == "unclip-tiny"
    assert_state_dicts_equal(load_weights(tmp_path / "clip", loaded), state)


def test_non_default_values_round_trip(tmp_path):
    config = dataclasses.replace(ClipStageConfig(), model_name="ViT-B-32", weights="open_clip_model.safetensors")
    save_checkpoint(tmp_path / "c", config, small_state_dict())
    assert read_config(tmp_path / "c") == config
    assert (tmp_path / "c" / "open_clip_model.safetensors").is_file()


def test_extra_files_are_saved(tmp_path):
    ema = {"ema.weight": torch.arange(6.0).reshape(2, 3)}
    directory = save_checkpoint(tmp_path / "p", tiny_prior_config(), small_state_dict(), extra_files={"ema.safetensors": ema})
    assert entries(directory) == sorted([CONFIG_FILE, "model.safetensors", "ema.safetensors"])
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(directory / "ema.safetensors"))["ema.weight"], ema["ema.weight"])


def test_half_storage_loads_as_float32(tmp_path):
    config = tiny_prior_config()
    state = small_state_dict(1)
    directory = save_checkpoint(tmp_path / "half", config, state, storage_dtype=torch.float16)
    with safe_open(str(weights_path(directory, config)), "pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
    assert stored["layer.weight"].dtype == torch.float16
    assert stored["layer.bias"].dtype == torch.float16
    assert stored["counter"].dtype == torch.int64  # integer tensors are not converted
    weights = load_weights(directory, config)
    assert weights["layer.weight"].dtype == torch.float32
    assert weights["counter"].dtype == torch.int64
    assert torch.equal(weights["layer.weight"], state["layer.weight"].half().float())
    assert torch.equal(weights["counter"], state["counter"])
    # Half storage really rounds: the values are not the original float32 ones.
    assert not torch.equal(weights["layer.weight"], state["layer.weight"])

    full = save_checkpoint(tmp_path / "full", config, state)
    assert weights_path(directory, config).stat().st_size < weights_path(full, config).stat().st_size


def test_save_does_not_modify_or_keep_caller_tensors(tmp_path):
    state = small_state_dict()
    before = {k: v.clone() for k, v in state.items()}
    save_checkpoint(tmp_path / "x", tiny_prior_config(), state, storage_dtype=torch.float16)
    assert_state_dicts_equal(state, before)


def test_load_weights_missing_file(tmp_path):
    config = tiny_prior_config()
    save_checkpoint(tmp_path / "p", config, small_state_dict())
    (tmp_path / "p" / config.weights).unlink()
    with pytest.raises(CheckpointError, match=r"weights file .*model\.safetensors.* not found"):
        load_weights(tmp_path / "p", config)


# ---------------------------------------------------------------------------------------------
# read_config errors


def write_config(directory: Path, data) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(data))
    return directory


def valid_config_dict() -> dict:
    return {"format_version": FORMAT_VERSION, **dataclasses.asdict(tiny_prior_config())}


def test_read_config_valid_dict_sanity(tmp_path):
    assert read_config(write_config(tmp_path / "ok", valid_config_dict())) == tiny_prior_config()


def test_read_config_missing_directory(tmp_path):
    with pytest.raises(CheckpointError) as info:
        read_config(tmp_path / "does-not-exist")
    assert "does-not-exist" in str(info.value) and CONFIG_FILE in str(info.value)


def test_read_config_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"no {CONFIG_FILE}"):
        read_config(tmp_path / "empty")


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_read_config_wrong_format_version(tmp_path, version):
    data = valid_config_dict()
    if version is None:
        del data["format_version"]
    else:
        data["format_version"] = version
    with pytest.raises(CheckpointError) as info:
        read_config(write_config(tmp_path / "v", data))
    text = str(info.value)
    assert "format_version" in text and repr(version) in text and f"expected {FORMAT_VERSION}" in text


@pytest.mark.parametrize("kind", ["vae", None, ""])
def test_read_config_unknown_kind(tmp_path, kind):
    data = valid_config_dict()
    if kind is None:
        del data["kind"]
    else:
        data["kind"] = kind
    with pytest.raises(CheckpointError) as info:
        read_config(write_config(tmp_path / "k", data))
    text = str(info.value)
    assert "kind" in text and repr(kind) in text
    for known in ("clip", "prior", "decoder", "upsampler"):
        assert known in text


def test_read_config_unknown_top_level_field(tmp_path):
    data = valid_config_dict() | {"learning_rate": 1e-4}
    with pytest.raises(CheckpointError) as info:
        read_config(write_config(tmp_path / "f", data))
    text = str(info.value)
    assert "learning_rate" in text and "PriorStageConfig" in text and CONFIG_FILE in text


def test_read_config_unknown_nested_field(tmp_path):
    data = valid_config_dict()
    data["model"]["widht"] = 64
    with pytest.raises(CheckpointError) as info:
        read_config(write_config(tmp_path / "n", data))
    text = str(info.value)
    assert "widht" in text and "PriorConfig" in text and "'width'" in text


def test_read_config_fields_of_another_kind(tmp_path):
    data = {"format_version": 1, **dataclasses.asdict(tiny_decoder_config())}
    data["kind"] = "prior"  # decoder fields (image_size) under the prior kind
    with pytest.raises(CheckpointError, match="image_size"):
        read_config(write_config(tmp_path / "m", data))


def test_read_config_defaults_fill_missing_fields(tmp_path):
    config = read_config(write_config(tmp_path / "min", {"format_version": 1, "kind": "decoder"}))
    assert config == DecoderStageConfig()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"], ids=["corrupt", "not-an-object"])
def test_read_config_corrupt_json(tmp_path, text):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        read_config(tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# Atomic replacement


def test_save_replaces_existing_checkpoint(tmp_path):
    old_config, new_config = tiny_prior_config(), dataclasses.replace(tiny_prior_config(), weights="new.safetensors")
    save_checkpoint(tmp_path / "ck", old_config, small_state_dict(1), extra_files={"ema.safetensors": small_state_dict(9)})
    (tmp_path / "ck" / "stray.txt").write_text("left by someone")
    new_state = small_state_dict(2)
    save_checkpoint(tmp_path / "ck", new_config, new_state)

    assert entries(tmp_path) == ["ck"]  # no staging, backup or temporary directories left
    # Replaced, not merged: files of the old checkpoint are gone.
    assert entries(tmp_path / "ck") == sorted([CONFIG_FILE, "new.safetensors"])
    assert read_config(tmp_path / "ck") == new_config
    assert_state_dicts_equal(load_weights(tmp_path / "ck", new_config), new_state)


def test_save_replaces_repeatedly_and_ignores_stale_backup(tmp_path):
    config = tiny_prior_config()
    (tmp_path / ".ck.old").mkdir()  # a backup left by an earlier crash
    for seed in range(3):
        save_checkpoint(tmp_path / "ck", config, small_state_dict(seed))
        assert_state_dicts_equal(load_weights(tmp_path / "ck", config), small_state_dict(seed))
    assert entries(tmp_path) == ["ck"]


def test_save_creates_missing_parents(tmp_path):
    directory = save_checkpoint(tmp_path / "a" / "b" / "ck", tiny_prior_config(), small_state_dict())
    assert read_config(directory) == tiny_prior_config()
    assert entries(tmp_path / "a" / "b") == ["ck"]


def assert_previous_intact(tmp_path: Path, config, state, version: str) -> None:
    assert entries(tmp_path) == ["ck"], "staging directory left behind"
    assert entries(tmp_path / "ck") == sorted([CONFIG_FILE, config.weights])
    assert read_config(tmp_path / "ck") == config
    assert_state_dicts_equal(load_weights(tmp_path / "ck", config), state)
    assert weights_version(tmp_path / "ck", config) == version


def test_failed_save_with_non_tensor_keeps_previous(tmp_path):
    config, state = tiny_prior_config(), small_state_dict(1)
    save_checkpoint(tmp_path / "ck", config, state)
    version = weights_version(tmp_path / "ck", config)
    bad = small_state_dict(2) | {"not_a_tensor": [1.0, 2.0]}
    with pytest.raises((AttributeError, TypeError)):
        save_checkpoint(tmp_path / "ck", tiny_decoder_config(), bad)
    assert_previous_intact(tmp_path, config, state, version)


def test_failed_save_file_keeps_previous(tmp_path, monkeypatch):
    config, state = tiny_prior_config(), small_state_dict(1)
    save_checkpoint(tmp_path / "ck", config, state)
    version = weights_version(tmp_path / "ck", config)

    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"partial")  # a half-written file in the staging directory
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ck", config, small_state_dict(2))
    assert calls and Path(calls[0]).parent != tmp_path / "ck"  # it wrote to a staging directory
    assert_previous_intact(tmp_path, config, state, version)


def test_failed_extra_file_keeps_previous(tmp_path):
    config, state = tiny_prior_config(), small_state_dict(1)
    save_checkpoint(tmp_path / "ck", config, state)
    version = weights_version(tmp_path / "ck", config)
    with pytest.raises(AttributeError):
        save_checkpoint(tmp_path / "ck", config, small_state_dict(2), extra_files={"ema.safetensors": {"x": "nope"}})
    assert_previous_intact(tmp_path, config, state, version)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", tiny_prior_config(), small_state_dict())
    assert entries(tmp_path) == []


def test_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    """KeyboardInterrupt (a BaseException) during the write cleans up too."""
    config, state = tiny_prior_config(), small_state_dict(1)
    save_checkpoint(tmp_path / "ck", config, state)
    version = weights_version(tmp_path / "ck", config)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", config, small_state_dict(2))
    assert_previous_intact(tmp_path, config, state, version)


# ---------------------------------------------------------------------------------------------
# weights_version


def test_weights_version_tracks_weight_content(tmp_path):
    config = tiny_prior_config()
    state = small_state_dict(1)
    save_checkpoint(tmp_path / "a", config, state)
    version = weights_version(tmp_path / "a", config)
    assert version.startswith("prior-")
    digest = version.removeprefix("prior-")
    assert len(digest) == 12 and all(c in "0123456789abcdef" for c in digest)

    # Stable: reading twice, re-saving the same weights, same weights elsewhere, other config fields.
    assert weights_version(tmp_path / "a", config) == version
    save_checkpoint(tmp_path / "a", config, {k: v.clone() for k, v in state.items()})
    assert weights_version(tmp_path / "a", config) == version
    other_sampling = dataclasses.replace(config, sampling=SamplingDefaults(steps=3))
    save_checkpoint(tmp_path / "b", other_sampling, state)
    assert weights_version(tmp_path / "b", other_sampling) == version

    # Changes: one element differs, a tensor is added, or the storage precision differs.
    changed = {k: v.clone() for k, v in state.items()}
    changed["layer.bias"][0] += 1e-3
    save_checkpoint(tmp_path / "a", config, changed)
    assert weights_version(tmp_path / "a", config) != version
    save_checkpoint(tmp_path / "c", config, state | {"extra": torch.zeros(1)})
    assert weights_version(tmp_path / "c", config) != version
    save_checkpoint(tmp_path / "d", config, state, storage_dtype=torch.float16)
    assert weights_version(tmp_path / "d", config) != version


def test_weights_version_prefix_is_kind(tmp_path):
    config = tiny_decoder_config()
    save_checkpoint(tmp_path / "d", config, small_state_dict())
    assert weights_version(tmp_path / "d", config).startswith("decoder-")


# ---------------------------------------------------------------------------------------------
# Engines from init_weights checkpoints


@pytest.fixture(scope="module")
def init_weights():
    return load_init_weights()


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory, init_weights) -> Path:
    out = tmp_path_factory.mktemp("init")
    directory = init_weights.init_stage("prior", out)
    assert directory == out / "prior"
    return directory


def test_init_stage_writes_half_precision_checkpoint(prior_dir):
    config = read_config(prior_dir)
    assert config == PriorStageConfig()
    with safe_open(str(weights_path(prior_dir, config)), "pt") as handle:
        dtypes = {handle.get_tensor(name).dtype for name in handle.keys()}  # noqa: SIM118 - not a dict
        assert handle.metadata() == {"kind": "prior"}
    assert dtypes == {torch.float16}


def test_init_stage_is_deterministic(prior_dir, init_weights, tmp_path):
    again = init_weights.init_stage("prior", tmp_path)
    assert weights_version(again, PriorStageConfig()) == weights_version(prior_dir, PriorStageConfig())
    other_seed = init_weights.init_stage("prior", tmp_path / "seed1", seed=1)
    assert weights_version(other_seed, PriorStageConfig()) != weights_version(prior_dir, PriorStageConfig())


def test_prior_engine_from_init_weights(prior_dir):
    engine = load_engine("prior", prior_dir)
    assert engine.version == weights_version(prior_dir, read_config(prior_dir))
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())
    assert not engine.model.training

    rng = np.random.default_rng(0)
    cfg = engine.config.model
    text_embeddings = rng.standard_normal((3, cfg.embed_dim)).astype(np.float32)
    text_encodings = rng.standard_normal((3, 5, cfg.text_width)).astype(np.float32)
    text_mask = np.ones((3, 5), np.bool_)
    options = SamplingOptions(steps=2)
    out = engine.sample(text_embeddings, text_encodings, text_mask, [1, 2, 3], sampling=options)
    assert out.shape == (3, cfg.embed_dim) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(out[0], out[1])  # rows differ (different seeds and texts)
    again = engine.sample(text_embeddings, text_encodings, text_mask, [1, 2, 3], sampling=options)
    np.testing.assert_array_equal(out, again)
    assert engine.stats.completed == 2


@pytest.mark.parametrize("wrong", ["decoder", "upsampler"])
def test_loading_prior_as_other_kind_fails_clearly(prior_dir, wrong):
    with pytest.raises((CheckpointError, ValueError)) as info:
        load_engine(wrong, prior_dir)
    text = str(info.value)
    assert "'prior'" in text and repr(wrong) in text and str(prior_dir) in text


def test_loading_prior_as_clip_fails_clearly(prior_dir):
    with pytest.raises(CheckpointError, match=r"holds a 'prior' checkpoint, expected 'clip'"):
        load_engine("clip", prior_dir)


def test_load_engine_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        load_engine("prior", tmp_path / "nothing")


def test_load_engine_unknown_kind(prior_dir):
    with pytest.raises(ValueError, match="unknown stage 'vae'"):
        load_engine("vae", prior_dir)


def test_load_engine_geometry_mismatch_fails(tmp_path, prior_dir):
    """A config whose geometry disagrees with the weights does not load silently."""
    data = json.loads((prior_dir / CONFIG_FILE).read_text())
    data["model"]["width"] = 64
    target = tmp_path / "mismatch"
    target.mkdir()
    (target / CONFIG_FILE).write_text(json.dumps(data))
    (target / "model.safetensors").write_bytes((prior_dir / "model.safetensors").read_bytes())
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_engine("prior", target)


def test_decoder_engine_from_tiny_checkpoint(tmp_path):
    config = tiny_decoder_config()
    module = build_module(config)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    save_checkpoint(tmp_path / "dec", config, module.state_dict(), storage_dtype=torch.float16)
    engine = load_engine("decoder", tmp_path / "dec")
    assert engine.config == config and engine.image_size == 16
    embeddings = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    images = engine.decode(embeddings, [5, 6], sampling=SamplingOptions(steps=1), guidance_scale=1.0)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    with pytest.raises(CheckpointError, match="holds a 'decoder' checkpoint, expected 'prior'"):
        load_engine("prior", tmp_path / "dec")
