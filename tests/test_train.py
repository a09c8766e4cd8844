"""Training: data sources, per-stage objectives, checkpoints the engines load, exact resumption, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, IterableDataset

from unclip.cli.train import add_parser as add_train_parser
from unclip.cli.train import run as run_train
from unclip.config import ClipStageConfig, DecoderStageConfig, PriorStageConfig, UpsamplerStageConfig
from unclip.data.shapes import parse_caption, render, sample_scene_for
from unclip.models.prior import PriorConfig
from unclip.options import SamplingOptions
from unclip.stages import default_checkpoint, load_engine
from unclip.stages.clip import ClipEncoder
from unclip.train.data import BatchStream, DataError, IterableSource, open_source
from unclip.train.loop import TRAIN_WEIGHTS, TrainOptions, read_train_state, train
from unclip.train.stages import FrozenClip, gaussian_blur, make_objective

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


class Squares(IterableDataset):
    """ShapesDataset's interface in miniature: an endless seeded stream of coloured squares."""

    def __init__(self, seed: int, size: int = 128):
        self.seed = seed
        self.size = size

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            name = list(COLOURS)[rng.integers(len(COLOURS))]
            image = np.zeros((self.size, self.size, 3), np.uint8)
            side = self.size // 2
            y, x = rng.integers(0, self.size - side, 2)
            image[y : y + side, x : x + side] = COLOURS[name]
            yield {"image": image, "caption": f"a {name} square"}


def squares() -> IterableSource:
    return IterableSource(lambda epoch: Squares(seed=epoch), name="squares")


def tiny_config(kind: str):
    if kind == "clip":
        return ClipStageConfig()
    if kind == "prior":
        return PriorStageConfig(model=PriorConfig(width=32, layers=1, heads=2))
    if kind == "decoder":
        model = dataclasses.replace(DecoderStageConfig().model, model_channels=16, num_head_channels=16, num_res_blocks=1)
        return DecoderStageConfig(model=model)
    return UpsamplerStageConfig(model=dataclasses.replace(UpsamplerStageConfig().model, model_channels=16, num_res_blocks=1))


def run(kind: str, out: Path, steps: int, *, seed: int = 0, init_seed: int = 0, **options) -> list[float]:
    torch.manual_seed(init_seed)
    objective = make_objective(tiny_config(kind))
    options = TrainOptions(steps=steps, batch_size=4, lr=1e-3, seed=seed, device="cpu", progress=False, **options)
    return train(objective, squares(), out, options).losses


@pytest.fixture(scope="module")
def clip_encoder() -> ClipEncoder:
    return ClipEncoder.from_checkpoint(default_checkpoint("clip"))


# -- each stage trains and its checkpoint runs in the inference engine ----------------------------


@pytest.mark.parametrize("kind", ["clip", "prior", "decoder", "upsampler"])
def test_checkpoint_loads_in_the_inference_engine(kind: str, tmp_path: Path, clip_encoder: ClipEncoder):
    losses = run(kind, tmp_path / kind, steps=3)
    assert len(losses) == 3 and all(np.isfinite(losses))
    engine = load_engine(kind, tmp_path / kind)
    fast = SamplingOptions(steps=2)
    text = clip_encoder.encode_text(["a red square"])
    if kind == "clip":
        assert engine.encode_text(["a red square"]).embeddings.shape == (1, 64)
        assert engine.encode_image(np.zeros((1, 128, 128, 3), np.uint8)).shape == (1, 64)
    elif kind == "prior":
        embedding = engine.sample(text.embeddings, text.encodings, text.mask, [0], sampling=fast)
        assert embedding.shape == (1, 64) and np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    elif kind == "decoder":
        image = engine.decode(text.embeddings, [0], text_encodings=text.encodings, text_mask=text.mask, sampling=fast)
        assert image.shape == (1, 32, 32, 3) and image.dtype == np.uint8
    else:
        image = engine.upsample(np.full((1, 8, 8, 3), 128, np.uint8), [0], sampling=fast)
        assert image.shape == (1, 32, 32, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("kind", ["clip", "decoder"])
def test_loss_decreases_on_a_learnable_toy(kind: str, tmp_path: Path):
    losses = run(kind, tmp_path / kind, steps=30)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_conditioning_matches_the_clip_engine(clip_encoder: ClipEncoder):
    frozen = FrozenClip(default_checkpoint("clip"))
    captions = ["a red square", "a big blue circle in the corner"]
    images = next(iter(BatchStream(squares(), 2)))["images"]
    embeddings, states, mask = frozen.encode_text(captions, torch.device("cpu"))
    expected = clip_encoder.encode_text(captions)
    torch.testing.assert_close(embeddings, torch.from_numpy(expected.embeddings), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(states, torch.from_numpy(expected.encodings), atol=1e-5, rtol=1e-4)
    assert torch.equal(mask, torch.from_numpy(expected.mask))
    image_embeddings = frozen.encode_image(images, torch.device("cpu"))
    expected_images = torch.from_numpy(clip_encoder.encode_image(images.numpy()))
    torch.testing.assert_close(image_embeddings, expected_images, atol=1e-5, rtol=1e-4)


def test_gaussian_blur_keeps_sharp_rows_and_the_mean():
    x = torch.rand(2, 3, 8, 8) * 255
    blurred = gaussian_blur(x, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(blurred[0], x[0])
    assert not torch.allclose(blurred[1], x[1])
    torch.testing.assert_close(blurred[1].mean(), x[1].mean(), rtol=0.02, atol=0.0)


# -- checkpoints and resumption -------------------------------------------------------------------


def test_resume_equals_an_uninterrupted_run(tmp_path: Path):
    straight = run("decoder", tmp_path / "straight", steps=6, checkpoint_every=100)
    first = run("decoder", tmp_path / "resumed", steps=3, checkpoint_every=100)
    assert read_train_state(tmp_path / "resumed")["step"] == 3
    # A different initialisation: resuming must replace it with the saved weights.
    second = run("decoder", tmp_path / "resumed", steps=6, init_seed=123, resume=True)
    assert first + second == straight
    for name in ("model.safetensors", TRAIN_WEIGHTS, "train_state.safetensors"):
        expected, actual = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.allclose(expected[key].float(), actual[key].float()), f"{name}: {key}"

    ema, raw = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "straight" / TRAIN_WEIGHTS))
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[key], raw[key]) for key in raw)


def test_checkpoints_are_written_periodically_and_never_silently_overwritten(tmp_path: Path):
    run("upsampler", tmp_path / "run", steps=4, checkpoint_every=2)
    assert read_train_state(tmp_path / "run")["step"] == 4
    with pytest.raises(FileExistsError, match="--resume"):
        run("upsampler", tmp_path / "run", steps=6)
    with pytest.raises(Exception, match=r"no config.json"):
        run("upsampler", tmp_path / "missing", steps=6, resume=True)


# -- data sources ---------------------------------------------------------------------------------


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def take(source, count: int) -> list[dict]:
    stream = iter(source)
    return [next(stream) for _ in range(count)]


def test_folder_source_reads_captioned_images_recursively(tmp_path: Path):
    (tmp_path / "nested").mkdir()
    (tmp_path / "a.png").write_bytes(png_bytes((255, 0, 0)))
    (tmp_path / "a.txt").write_text("a red thing\n")
    (tmp_path / "nested" / "b.png").write_bytes(png_bytes((0, 0, 255, 128), mode="RGBA"))
    (tmp_path / "nested" / "b.txt").write_text("a blue thing")
    (tmp_path / "uncaptioned.png").write_bytes(png_bytes((0, 255, 0)))
    examples = take(open_source(str(tmp_path), 16, seed=0), 4)  # two epochs
    assert sorted(e["caption"] for e in examples) == ["a blue thing"] * 2 + ["a red thing"] * 2
    for example in examples:
        assert example["image"].shape == (16, 16, 3) and example["image"].dtype == np.uint8
    red = next(e["image"] for e in examples if e["caption"] == "a red thing")
    assert (red == [255, 0, 0]).all()


def write_shard(path: Path, samples: dict[str, tuple[str, bytes]]) -> None:
    """img2dataset layout: <key>.jpg|png, <key>.txt, <key>.json, consecutive per key."""
    with tarfile.open(path, "w") as archive:
        for key, (caption, image) in samples.items():
            for name, data in ((f"{key}.png", image), (f"{key}.txt", caption.encode()), (f"{key}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def test_tar_shards_as_a_file_a_directory_and_a_glob(tmp_path: Path):
    write_shard(tmp_path / "00000.tar", {f"0000{i}": (f"caption {i}", png_bytes((i * 40, 0, 0))) for i in range(3)})
    write_shard(tmp_path / "00001.tar", {f"0001{i}": (f"caption {i + 3}", png_bytes((0, i * 40, 0))) for i in range(3)})
    captions = {f"caption {i}" for i in range(6)}
    for spec in (str(tmp_path), str(tmp_path / "*.tar")):
        examples = take(open_source(spec, 8, seed=1), 6)  # one epoch: every sample once
        assert {e["caption"] for e in examples} == captions
        assert all(e["image"].shape == (8, 8, 3) for e in examples)
    single = take(open_source(str(tmp_path / "00001.tar"), 8, seed=1), 3)
    assert {e["caption"] for e in single} == {"caption 3", "caption 4", "caption 5"}
    # The order is shuffled by the seed, and repeatable.
    orders = [[e["caption"] for e in take(open_source(str(tmp_path), 8, seed=s), 6)] for s in (1, 1, 2)]
    assert orders[0] == orders[1] and sorted(orders[0]) == sorted(orders[2])


def test_bad_data_paths_give_clear_errors(tmp_path: Path):
    with pytest.raises(DataError, match="no such file or directory"):
        open_source(str(tmp_path / "missing"), 32, 0)
    with pytest.raises(DataError, match="no images"):
        open_source(str(tmp_path), 32, 0)
    (tmp_path / "a.png").write_bytes(png_bytes((1, 2, 3)))
    with pytest.raises(DataError, match=r"none with a same-named .txt caption"):
        open_source(str(tmp_path), 32, 0)
    with pytest.raises(DataError, match=r"matches no .tar files"):
        open_source(str(tmp_path / "*.tar"), 32, 0)
    with pytest.raises(DataError, match=r"must be a .tar shard"):
        open_source(str(tmp_path / "a.png"), 32, 0)
    write_shard(tmp_path / "empty.tar", {})
    with pytest.raises(DataError, match="no examples"):
        take(open_source(str(tmp_path / "empty.tar"), 32, 0), 1)


def test_batches_are_the_same_with_any_number_of_workers():
    def batches(workers: int) -> list[dict]:
        loader = DataLoader(BatchStream(squares(), 3, start=2), batch_size=None, num_workers=workers)
        stream = iter(loader)
        return [next(stream) for _ in range(4)]

    for alone, shared in zip(batches(0), batches(2), strict=True):
        assert alone["captions"] == shared["captions"] and torch.equal(alone["images"], shared["images"])


# -- command line ---------------------------------------------------------------------------------


def unclip_train(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="unclip")
    add_train_parser(parser.add_subparsers(dest="command"))
    return run_train(parser.parse_args(["train", *argv]))


def write_folder(data: Path) -> Path:
    data.mkdir()
    for index, (name, colour) in enumerate(COLOURS.items()):
        (data / f"{index}.png").write_bytes(png_bytes(colour, size=(128, 128)))
        (data / f"{index}.txt").write_text(f"a {name} picture")
    return data


def test_cli_trains_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = write_folder(tmp_path / "data")
    out = tmp_path / "upsampler"
    common = ["upsampler", "--data", str(data), "--out", str(out), "--batch-size", "2", "--device", "cpu"]
    assert unclip_train(*common, "--steps", "2") == 0
    assert "step 2 (2 this run)" in capsys.readouterr().out
    assert unclip_train(*common, "--steps", "3", "--resume") == 0
    captured = capsys.readouterr()
    report = captured.out
    assert "step 3 (1 this run)" in report and "steps/s" in report and "final loss" in report
    # Every checkpoint leaves a log line, so runs in the background can be followed.
    assert "upsampler: step 3/3, loss " in captured.err and f"checkpoint {out}" in captured.err
    assert unclip_train(*common, "--steps", "4") == 1
    assert "--resume" in capsys.readouterr().err
    assert unclip_train("prior", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "p")) == 1
    assert "no such file or directory" in capsys.readouterr().err


def test_cli_contrast_groups_train_on_shapes_and_refuse_what_would_split_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    common = ["clip", "--data", "shapes", "--contrast-group", "3", "--device", "cpu", "--steps", "1", "--image-size", "64"]
    assert unclip_train(*common, "--batch-size", "6", "--out", str(tmp_path / "clip")) == 0
    assert read_train_state(tmp_path / "clip")["contrast_group"] == 3
    capsys.readouterr()
    assert unclip_train(*common, "--batch-size", "4", "--out", str(tmp_path / "split")) == 1
    assert "not a multiple of --contrast-group 3" in capsys.readouterr().err
    folder = [
        "clip",
        "--data",
        str(write_folder(tmp_path / "data")),
        "--contrast-group",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert unclip_train(*folder, "--out", str(tmp_path / "folder")) == 1
    assert "use them with --data shapes" in capsys.readouterr().err


def test_cli_lock_trains_one_clip_tower_and_resumes_with_its_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    common = [
        "clip",
        "--data",
        "shapes",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--image-size",
        "64",
        "--out",
        str(tmp_path / "lit"),
    ]
    assert unclip_train(*common, "--steps", "1", "--lock", "text") == 0
    first = load_file(str(tmp_path / "lit" / "model.safetensors"))
    assert unclip_train(*common, "--steps", "2", "--resume") == 0
    second = load_file(str(tmp_path / "lit" / "model.safetensors"))
    assert read_train_state(tmp_path / "lit")["lock"] == "text"
    text = [name for name in first if name.startswith(("transformer.", "token_embedding", "ln_final", "text_projection"))]
    assert text and all(torch.equal(first[name], second[name]) for name in text)  # frozen, also after resuming
    assert not all(torch.equal(first[name], second[name]) for name in first if name.startswith("visual."))
    capsys.readouterr()
    assert unclip_train(*common, "--steps", "3", "--resume", "--lock", "image") == 1
    assert "resumes with that lock only" in capsys.readouterr().err
    prior = ["prior", "--data", "shapes", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--lock", "text"]
    assert unclip_train(*prior, "--out", str(tmp_path / "prior")) == 1
    assert "the prior stage has none" in capsys.readouterr().err


def test_cli_resumes_the_prior_with_the_clip_it_started_with(tmp_path: Path):
    clip = tmp_path / "my-clip"
    shutil.copytree(default_checkpoint("clip"), clip)
    common = [
        "prior",
        "--data",
        str(write_folder(tmp_path / "data")),
        "--out",
        str(tmp_path / "prior"),
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert unclip_train(*common, "--steps", "1", "--clip", str(clip)) == 0
    assert unclip_train(*common, "--steps", "2", "--resume") == 0
    state = read_train_state(tmp_path / "prior")
    assert state["step"] == 2 and state["clip"] == str(clip)


def test_export_keeps_only_the_served_weights_and_says_where_they_came_from(tmp_path: Path):
    from unclip.cli import main
    from unclip.train.export import TRAINING_RECORD

    run("decoder", tmp_path / "run", steps=2)
    served = load_file(str(tmp_path / "run" / "model.safetensors"))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "run"), str(tmp_path / "shipped")])
    assert exit_info.value.code == 0
    shipped = tmp_path / "shipped"
    assert sorted(p.name for p in shipped.iterdir()) == ["config.json", "model.safetensors", TRAINING_RECORD]
    weights = load_file(str(shipped / "model.safetensors"))
    assert weights.keys() == served.keys()
    for name, tensor in served.items():
        assert weights[name].dtype == torch.float16
        torch.testing.assert_close(weights[name].float(), tensor, atol=1e-3, rtol=1e-3)
    record = json.loads((shipped / TRAINING_RECORD).read_text())
    assert record["kind"] == "decoder" and record["step"] == 2 and record["stored_as"] == "float16"
    assert load_engine("decoder", shipped).image_size == 32  # services load it as any checkpoint
    # Exporting onto the run itself would throw its training state away.
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "run"), str(tmp_path / "run")])
    assert exit_info.value.code == 1
    assert (tmp_path / "run" / TRAIN_WEIGHTS).is_file()


def test_init_starts_a_new_run_from_another_checkpoints_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = str(write_folder(tmp_path / "data"))
    common = ["--data", data, "--batch-size", "2", "--device", "cpu", "--steps", "1"]
    assert unclip_train("upsampler", *common, "--out", str(tmp_path / "a"), "--lr", "1e-2") == 0
    # With a zero learning rate the new run's weights are exactly the ones it started from.
    assert unclip_train("upsampler", *common, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"), "--lr", "0") == 0
    source = load_file(str(tmp_path / "a" / "model.safetensors"))
    started = load_file(str(tmp_path / "b" / TRAIN_WEIGHTS))
    assert source.keys() == started.keys() and all(torch.equal(source[k], started[k]) for k in source)
    state = read_train_state(tmp_path / "b")
    assert state["step"] == 1 and state["init"] == str(tmp_path / "a")  # a fresh run that records its origin
    b = ["--data", data, "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "b")]
    assert unclip_train("upsampler", *b, "--steps", "2", "--resume") == 0
    assert read_train_state(tmp_path / "b")["init"] == str(tmp_path / "a")  # and keeps it
    capsys.readouterr()
    # Another stage, or weights of another geometry, cannot start a run.
    assert unclip_train("decoder", *common, "--out", str(tmp_path / "c"), "--init", str(tmp_path / "a")) == 1
    assert "cannot start a 'decoder' run" in capsys.readouterr().err
    other = tmp_path / "other"
    run("upsampler", other, steps=1)  # 16 channels, the CLI trains 32
    assert unclip_train("upsampler", *common, "--out", str(tmp_path / "d"), "--init", str(other)) == 1
    assert "do not fit this configuration" in capsys.readouterr().err


def test_config_trains_another_geometry(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from unclip.checkpoint import read_config

    data = str(write_folder(tmp_path / "data"))
    common = ["--data", data, "--batch-size", "2", "--device", "cpu", "--steps", "1"]
    other = tmp_path / "other"
    run("upsampler", other, steps=1)  # 16 channels, where the stage default has 32
    # Its geometry, given as the directory or as its config.json, lets its weights start the run.
    for name, config in (("a", other), ("b", other / "config.json")):
        args = [*common, "--out", str(tmp_path / name), "--config", str(config), "--init", str(other), "--lr", "0"]
        assert unclip_train("upsampler", *args) == 0
        assert read_config(tmp_path / name).model == read_config(other).model
    assert unclip_train("upsampler", *common, "--out", str(tmp_path / "default")) == 0
    assert read_config(tmp_path / "default").model.model_channels == 32 != read_config(tmp_path / "a").model.model_channels
    capsys.readouterr()
    # A config of another stage, or one given to a resumed run, is refused with a reason.
    assert unclip_train("decoder", *common, "--out", str(tmp_path / "c"), "--config", str(other)) == 1
    assert "not 'decoder'" in capsys.readouterr().err
    assert unclip_train("upsampler", *common, "--out", str(tmp_path / "a"), "--resume", "--config", str(other)) == 1
    assert "resumes with the config saved there" in capsys.readouterr().err
    assert unclip_train("upsampler", *common, "--out", str(tmp_path / "d"), "--config", str(tmp_path / "none")) == 1
    assert "no config.json" in capsys.readouterr().err


def load_tool(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"unclip_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _with_full_resolution_attention(config) -> tuple[int, ...]:
    """The UNet's attention rates plus full resolution: a wider network whatever the shipped decoder has."""
    return tuple(sorted({1, *config.model.attention_downsample_rates}))


def test_added_attention_keeps_the_output_and_trains_from_it(tmp_path: Path):
    from unclip.checkpoint import load_weights, read_config
    from unclip.models.unet import UNet

    shipped = default_checkpoint("decoder")
    before = read_config(shipped)
    rates = _with_full_resolution_attention(before)
    assert len(rates) > len(before.model.attention_downsample_rates)
    widened = load_tool("add_attention").add_attention(shipped, tmp_path / "widened", rates)
    after = read_config(widened)
    assert after.model.attention_downsample_rates == rates
    record = json.loads((widened / "training.json").read_text())["widened"]
    assert record["attention_downsample_rates"] == list(rates) and record["from"]["path"] == str(shipped)
    old, new = UNet(before.model), UNet(after.model)
    old.load_state_dict(load_weights(shipped, before))
    new.load_state_dict(load_weights(widened, after))
    assert sum(p.numel() for p in new.parameters()) > sum(p.numel() for p in old.parameters())
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([30, 700])
    inputs = {"image_embed": torch.randn(2, 64), "text_encodings": torch.randn(2, 5, 64)}
    with torch.no_grad():
        assert torch.allclose(old(x, t, **inputs), new(x, t, **inputs), atol=1e-5)
        # The new blocks are in the path: once their output projection is nonzero, the output moves.
        for name, parameter in new.named_parameters():
            if "proj_out" in name and name not in dict(old.named_parameters()):
                parameter.add_(0.1)
        assert not torch.allclose(old(x, t, **inputs), new(x, t, **inputs), atol=1e-3)
    # A run of that geometry starts from those weights.
    data = str(write_folder(tmp_path / "data"))
    args = ["--data", data, "--batch-size", "2", "--device", "cpu", "--steps", "1", "--lr", "0"]
    assert unclip_train("decoder", *args, "--out", str(tmp_path / "run"), "--config", str(widened), "--init", str(widened)) == 0
    assert read_config(tmp_path / "run").model == after.model
    with pytest.raises(ValueError, match="must keep the attention"):
        load_tool("add_attention").add_attention(shipped, tmp_path / "narrowed", (1,))


def test_interpolated_weights_mix_a_checkpoint_with_its_fine_tune_and_record_both(tmp_path: Path):
    from unclip.checkpoint import load_weights, read_config, save_checkpoint
    from unclip.train.export import TRAINING_RECORD

    interpolate = load_tool("interpolate_weights").interpolate
    shipped = default_checkpoint("decoder")
    config = read_config(shipped)
    start = load_weights(shipped, config)
    torch.manual_seed(0)
    tuned = {name: tensor + 0.05 * torch.randn_like(tensor) for name, tensor in start.items()}
    save_checkpoint(tmp_path / "tuned", config, tuned)
    mixed_dir = interpolate(shipped, tmp_path / "tuned", tmp_path / "mix", 0.25, dtype="float32")
    mixed = load_weights(mixed_dir, read_config(mixed_dir))
    for name in start:
        torch.testing.assert_close(mixed[name], 0.75 * start[name] + 0.25 * tuned[name])
    record = json.loads((mixed_dir / TRAINING_RECORD).read_text())
    shipped_record = json.loads((shipped / TRAINING_RECORD).read_text())
    shipped_record.pop("stored_as")
    assert record["stored_as"] == "float32" and record["interpolated"]["alpha"] == 0.25
    assert record["interpolated"]["start"] == {"path": str(shipped), **shipped_record}
    assert record["interpolated"]["end"] == {"path": str(tmp_path / "tuned")}
    assert load_engine("decoder", mixed_dir).image_size == 32
    with pytest.raises(ValueError, match="alpha must lie in"):
        interpolate(shipped, tmp_path / "tuned", tmp_path / "bad", 1.5)
    widened = load_tool("add_attention").add_attention(shipped, tmp_path / "widened", _with_full_resolution_attention(config))
    with pytest.raises(ValueError, match="not the same network"):
        interpolate(shipped, widened, tmp_path / "bad", 0.5)
    assert not (tmp_path / "bad").exists()


def test_interpolated_clip_weights_average_two_checkpoints_of_one_run(tmp_path: Path):
    """A CLIP config names its network by open_clip model name, not by a geometry; the mix of two
    checkpoints of one run (a two-point weight average) must load and encode."""
    from unclip.checkpoint import load_weights, read_config, save_checkpoint

    interpolate = load_tool("interpolate_weights").interpolate
    shipped = default_checkpoint("clip")
    config = read_config(shipped)
    start = load_weights(shipped, config)
    later = {name: tensor.float() + 0.01 for name, tensor in start.items()}
    save_checkpoint(tmp_path / "later", config, later)
    mixed_dir = interpolate(shipped, tmp_path / "later", tmp_path / "mix", 0.5, dtype="float32")
    mixed = load_weights(mixed_dir, read_config(mixed_dir))
    for name in start:
        torch.testing.assert_close(mixed[name], 0.5 * start[name].float() + 0.5 * later[name])
    assert load_engine("clip", mixed_dir).encode_text(["a red circle"]).embeddings.shape == (1, 64)
    with pytest.raises(ValueError, match="not the same network"):
        interpolate(shipped, default_checkpoint("prior"), tmp_path / "bad", 0.5)


def test_init_keeps_new_parameters_at_their_initialisation(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from unclip.cli.train import initialise_from

    without = tiny_config("decoder")
    without.model = dataclasses.replace(without.model, position_embedding_size=0)
    torch.manual_seed(0)
    train(make_objective(without), squares(), tmp_path / "old", TrainOptions(steps=1, batch_size=2, device="cpu", progress=False))
    objective = make_objective(tiny_config("decoder"))  # the same network plus position embeddings
    initialise_from(objective, tmp_path / "old")
    assert "new parameters start from their initialisation" in capsys.readouterr().err
    old = load_file(str(tmp_path / "old" / "model.safetensors"))
    for name, tensor in objective.model.state_dict().items():
        expected = old[name] if name in old else torch.zeros_like(tensor)
        assert torch.equal(tensor, expected), name


def test_two_object_fraction_sets_the_share_of_two_object_scenes_and_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    def share(fraction: float) -> float:
        examples = take(open_source("shapes", 16, seed=0, two_object_fraction=fraction), 200)
        return sum(len(parse_caption(e["caption"]).objects) == 2 for e in examples) / len(examples)

    assert share(0.0) == 0.0 and share(1.0) == 1.0 and 0.4 < share(0.5) < 0.6
    common = ["prior", "--data", "shapes", "--device", "cpu", "--steps", "1", "--batch-size", "2", "--image-size", "64"]
    assert unclip_train(*common, "--two-object-fraction", "0.6", "--out", str(tmp_path / "p")) == 0
    assert read_train_state(tmp_path / "p")["two_object_fraction"] == 0.6
    capsys.readouterr()
    assert unclip_train(*common, "--two-object-fraction", "1.5", "--out", str(tmp_path / "bad")) == 1
    assert "two_object_fraction must lie in [0, 1], got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["prior", "decoder"])
def test_drop_text_sets_the_share_of_rows_trained_without_the_caption(kind: str):
    def dropped_rows(drop_text: float | None) -> float:
        torch.manual_seed(0)
        objective = make_objective(tiny_config(kind), drop_text=drop_text)
        masks = []
        objective.model.register_forward_pre_hook(lambda _, args, kwargs: masks.append(kwargs["drop_text"]), with_kwargs=True)
        batch = next(iter(BatchStream(squares(), 64)))
        objective(batch, torch.Generator().manual_seed(0))
        return masks[0].float().mean().item()

    assert dropped_rows(0.0) == 0.0 and dropped_rows(1.0) == 1.0
    default = {"prior": 0.1, "decoder": 0.5}[kind]  # DALL-E 2's
    assert abs(dropped_rows(None) - default) < 0.15
    with pytest.raises(ValueError, match=r"drop_text must lie in \[0, 1\], got 1.5"):
        make_objective(tiny_config(kind), drop_text=1.5)


def test_cli_drop_text_is_recorded_kept_on_resume_and_refused_where_there_is_no_caption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    common = [
        "decoder",
        "--data",
        "shapes",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--image-size",
        "64",
        "--out",
        str(tmp_path / "d"),
    ]
    assert unclip_train(*common, "--steps", "1", "--drop-text", "0.2") == 0
    assert unclip_train(*common, "--steps", "2", "--resume") == 0
    assert read_train_state(tmp_path / "d")["drop_text"] == 0.2
    prior = ["prior", "--data", "shapes", "--device", "cpu", "--batch-size", "2", "--image-size", "64", "--steps", "1"]
    assert unclip_train(*prior, "--out", str(tmp_path / "p")) == 0
    assert read_train_state(tmp_path / "p")["drop_text"] == 0.1
    capsys.readouterr()
    upsampler = ["upsampler", "--data", "shapes", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--drop-text", "0.2"]
    assert unclip_train(*upsampler, "--out", str(tmp_path / "u")) == 1
    assert "the upsampler stage has no caption dropout" in capsys.readouterr().err


def test_cli_resume_alone_continues_the_same_run(tmp_path: Path):
    """`--resume` without the options a run started with keeps them (data, batch size, seed), so it
    equals the uninterrupted run; an option given again on resume is the one that applies."""
    started = ["--mention-p", "0.9", "--two-object-fraction", "0.8", "--seed", "5", "--batch-size", "2", "--lr", "1e-3"]
    base = ["decoder", "--data", "shapes", "--device", "cpu", "--image-size", "64", "--checkpoint-every", "1"]
    assert unclip_train(*base, *started, "--steps", "2", "--out", str(tmp_path / "straight")) == 0
    assert unclip_train(*base, *started, "--steps", "1", "--out", str(tmp_path / "resumed")) == 0
    assert (
        unclip_train(
            "decoder",
            "--data",
            "shapes",
            "--device",
            "cpu",
            "--image-size",
            "64",
            "--steps",
            "2",
            "--resume",
            "--out",
            str(tmp_path / "resumed"),
        )
        == 0
    )
    state = read_train_state(tmp_path / "resumed")
    assert (state["mention_p"], state["two_object_fraction"], state["options"]["seed"], state["options"]["batch_size"]) == (
        0.9,
        0.8,
        5,
        2,
    )
    assert state["examples"] == 4 and state["options"]["lr"] == 1e-3
    for name in ("model.safetensors", "train_weights.safetensors"):
        expected, actual = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key])
    assert unclip_train(*base, "--steps", "3", "--resume", "--lr", "5e-4", "--out", str(tmp_path / "resumed")) == 0
    state = read_train_state(tmp_path / "resumed")
    assert state["options"]["lr"] == 5e-4 and all(group["lr"] == 5e-4 for group in state["param_groups"])


def test_cli_extra_vocabulary_is_recorded_kept_on_resume_and_refused_off_shapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    common = [
        "prior",
        "--data",
        "shapes",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--image-size",
        "64",
        "--out",
        str(tmp_path / "p"),
    ]
    assert unclip_train(*common, "--steps", "1", "--extra-vocabulary", "0.4") == 0
    assert unclip_train(*common, "--steps", "2", "--resume") == 0
    assert read_train_state(tmp_path / "p")["extra_vocabulary"] == 0.4
    capsys.readouterr()
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "a.txt").write_text("a red circle")
    other = ["prior", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--extra-vocabulary", "0.4"]
    assert unclip_train(*other, "--data", str(folder), "--out", str(tmp_path / "f")) == 1
    assert "the extra vocabulary is drawn from the Shapes grammar" in capsys.readouterr().err
    assert unclip_train(*other[:-1], "1.5", "--data", "shapes", "--out", str(tmp_path / "bad")) == 1
    assert "extra_vocabulary must lie in [0, 1], got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize(("crop", "expected"), [(0, 32), (64, 64), (128, 128)])
def test_upsampler_trains_on_crops_of_the_configured_side(crop: int, expected: int):
    config = dataclasses.replace(tiny_config("upsampler"), train_crop_size=crop)
    objective = make_objective(config)
    seen = []
    objective.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((tuple(args[0].shape), tuple(kwargs["low_res"].shape))), with_kwargs=True
    )
    images = torch.from_numpy(
        np.stack([render(sample_scene_for(parse_caption("a red circle"), np.random.default_rng(i)), 128) for i in range(2)])
    )
    loss = objective({"images": images}, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert seen == [((2, 3, expected, expected), (2, 3, expected // 4, expected // 4))]


@pytest.mark.parametrize("crop", [100, 256, -32])
def test_upsampler_crop_sides_that_do_not_fit_are_refused(crop: int):
    with pytest.raises(ValueError, match="upsampler crops"):
        make_objective(dataclasses.replace(tiny_config("upsampler"), train_crop_size=crop))
