"""Importing a diffusers-format unCLIP (Karlo's layout) and serving it: the importer's checks,
each imported stage against diffusers' own pipeline code, whole generations, and Karlo's real
geometry mapped completely on the meta device."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import sys
from pathlib import Path

import diffusers.pipelines.deprecated.unclip.pipeline_unclip as pipeline_unclip
import diffusers.schedulers.scheduling_unclip as scheduling_unclip
import karlo_fixtures as kf
import numpy as np
import pytest
import torch
from diffusers import UnCLIPScheduler
from PIL import Image
from servers import serve_all_process

from unclip.errors import FailedPrecondition
from unclip.importers.diffusers_format import WeightsImportError, import_pipeline
from unclip.local import LocalStages
from unclip.options import SamplingOptions
from unclip.parameters import GenerationParameters
from unclip.pipeline import generate
from unclip.png import read_png_text
from unclip.stages.engine import row_generators

PROMPT = "a red circle in the top left corner"


class StageNoise:
    """Feeds diffusers' schedulers the initial latents and per-step noise unclip draws for a
    seed: each stage's own per-row generator, told apart by the sample's shape."""

    def __init__(self, seed: int):
        self.generators = {
            (kf.EMBED,): row_generators([seed], "prior/candidate0")[0],
            (3, kf.DECODER_SIZE, kf.DECODER_SIZE): row_generators([seed], "decoder")[0],
            (3, kf.SUPER_RES_SIZE, kf.SUPER_RES_SIZE): row_generators([seed], "upsampler/x4")[0],
        }

    def draw(self, shape, *args, **kwargs) -> torch.Tensor:
        return torch.randn(tuple(shape[1:]), generator=self.generators[tuple(shape[1:])])[None]

    def latents(self) -> dict[str, torch.Tensor]:
        names = ("prior_latents", "decoder_latents", "super_res_latents")
        return {name: self.draw((1, *shape)) for name, shape in zip(names, self.generators, strict=True)}


def levels(images: np.ndarray) -> np.ndarray:
    """diffusers' float [0, 1] images as 8-bit levels, rounded as its numpy_to_pil does."""
    return np.round(images * 255).astype(np.int16)


def test_the_sampling_timesteps_and_schedule_are_karlos():
    from unclip.diffusion import GaussianDiffusion, make_betas
    from unclip.diffusion.respace import space_timesteps

    scheduler = UnCLIPScheduler()
    for steps in range(2, 120):
        scheduler.set_timesteps(steps)
        assert space_timesteps(1000, steps, "karlo")[::-1] == scheduler.timesteps.tolist(), steps
    process = GaussianDiffusion(make_betas("squaredcos_cap_v2", 1000), arithmetic="float32")
    assert torch.equal(process.betas.float(), scheduler.betas)
    assert torch.equal(process.alphas_cumprod.float(), scheduler.alphas_cumprod)
    # float64 arithmetic takes the product exactly: 1e-6 relative away from the scheduler's
    exact = GaussianDiffusion(make_betas("squaredcos_cap_v2", 1000)).alphas_cumprod
    assert not torch.equal(exact.float(), scheduler.alphas_cumprod)


@pytest.mark.parametrize(("prediction", "variance"), [("sample", "fixed_small_log"), ("epsilon", "learned_range")])
def test_a_sampling_run_follows_unclips_scheduler(prediction, variance, monkeypatch):
    """Step by step from the same x_T and noise, with a stand-in network: with float32
    arithmetic every step is UnCLIPScheduler's to the bit, the first step of the respaced
    process (where beta rounds to 1 in float32) and the last (where diffusers' beta_0 / (1 -
    alphas_cumprod_0) is 1.0005, not 1) included."""
    from unclip.diffusion import GaussianDiffusion, SamplingRun, make_betas

    steps, shape = 7, (2, 3, 4, 4)
    scheduler = UnCLIPScheduler(variance_type=variance, prediction_type=prediction, clip_sample_range=2.0)
    scheduler.set_timesteps(steps)
    ours, theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    parameterization = {"sample": "x0", "epsilon": "eps"}[prediction]
    learned = {"fixed_small_log": "fixed_small", "learned_range": "learned_range"}[variance]
    process = GaussianDiffusion(make_betas("squaredcos_cap_v2", 1000), parameterization, variance=learned, arithmetic="float32")
    run = SamplingRun(
        process, shape, [ours, torch.Generator().manual_seed(1)], steps=steps, sampler="ddpm", spacing="karlo",
        denoised_fn=lambda x0: x0.clamp(-2, 2),
    )  # fmt: skip
    weights = torch.randn(shape[1:], generator=torch.Generator().manual_seed(2))

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(0.8 * x + weights * (t.float() / 1000).view(-1, 1, 1, 1))
        return torch.cat([out, torch.tanh(0.3 * x)], 1) if learned == "learned_range" else out

    x = torch.randn(shape[1:], generator=theirs)[None]
    assert torch.equal(x, run.x[:1])  # each row's x_T from its own generator
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", lambda shape, **_: torch.randn(shape[1:], generator=theirs)[None])
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_x, model_t = run.model_input()
        assert model_t.tolist() == [int(t)] * 2
        previous = None if i + 1 == len(timesteps) else timesteps[i + 1]
        output = network(x, t.view(1))
        x = scheduler.step(output, t, x, prev_timestep=previous).prev_sample
        run.advance(network(model_x, model_t))
        assert torch.equal(run.x[:1], x), i


def test_the_imported_text_encoder_equals_transformers(karlo):
    encoder = karlo["stages"].encoder
    tokens = karlo["text"].tokenizer([PROMPT, "a blue square!"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        reference = karlo["text"].text_encoder(tokens.input_ids)
    ours = encoder.encode_text([PROMPT, "a blue square!"])
    np.testing.assert_allclose(ours.embeddings, reference.text_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours.encodings, reference.last_hidden_state.numpy(), atol=1e-5)  # every position
    np.testing.assert_array_equal(ours.mask, tokens.attention_mask.bool().numpy())


def test_the_imported_image_encoder_equals_transformers(karlo):
    images = np.random.default_rng(0).integers(0, 256, (2, kf.IMAGE_SIZE, kf.IMAGE_SIZE, 3), dtype=np.uint8)
    pixels = karlo["variation"].feature_extractor(images=list(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        reference = karlo["variation"].image_encoder(pixels).image_embeds
    np.testing.assert_allclose(karlo["stages"].encoder.encode_image(images), reference.numpy(), atol=1e-4)


def test_the_prior_follows_diffusers_pipeline(karlo, monkeypatch):
    """The imported prior's embedding against the one UnCLIPPipeline hands its text_proj, from
    the same latents and noise."""
    stages, seed, steps = karlo["stages"], 4, 10
    text = stages.encoder.encode_text([PROMPT])
    ours = stages.prior.sample(text.embeddings, text.encodings, text.mask, [seed], sampling=SamplingOptions(steps))
    noise = StageNoise(seed)
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", noise.draw)
    seen = {}
    pipe = karlo["text"]
    original = pipe.text_proj.forward

    def record(**kwargs):
        seen["image_embeddings"] = kwargs["image_embeddings"].clone()
        return original(**kwargs)

    monkeypatch.setattr(pipe.text_proj, "forward", record)
    pipe(PROMPT, prior_num_inference_steps=steps, decoder_num_inference_steps=2, super_res_num_inference_steps=2,
         output_type="np", **noise.latents())  # fmt: skip
    theirs = seen["image_embeddings"].numpy()
    print(f"prior vs diffusers: {np.abs(theirs - ours).max() / np.abs(theirs).max():.2e} of the largest component")
    assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(theirs).max()


def test_decoding_an_embedding_follows_diffusers_variation_pipeline(karlo, monkeypatch):
    """The decoder (text_proj, learned null embedding, guidance on the mean, learned variance)
    against UnCLIPImageVariationPipeline given the same image embedding: the 16 px image it
    hands the super-resolution step, within one level."""
    stages, seed = karlo["stages"], 6
    embedding = np.random.default_rng(3).standard_normal((1, kf.EMBED)).astype(np.float32)
    ours = stages.decoder.decode(embedding, [seed], sampling=SamplingOptions(25))
    noise = StageNoise(seed)
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", noise.draw)
    seen = {}
    interpolate = pipeline_unclip.F.interpolate

    def record(x, *args, **kwargs):
        if x.shape[1] == 3 and x.shape[-1] == kf.DECODER_SIZE:
            seen.setdefault("small", x.clone())
        return interpolate(x, *args, **kwargs)

    monkeypatch.setattr(pipeline_unclip.F, "interpolate", record)
    latents = noise.latents()
    karlo["variation"](
        image_embeddings=torch.from_numpy(embedding), decoder_latents=latents["decoder_latents"],
        super_res_latents=latents["super_res_latents"], super_res_num_inference_steps=2, output_type="np",
    )  # fmt: skip
    theirs = np.round((seen["small"][0].permute(1, 2, 0).numpy() + 1) * 127.5)
    difference = np.abs(theirs - ours[0])
    print(f"decoder vs diffusers: max {difference.max()}, mean {difference.mean():.3f}, within 1: {(difference <= 1).mean():.4f}")
    assert difference.max() <= 1


def test_upsampling_follows_karlos_two_super_resolution_unets(karlo, monkeypatch):
    """The upsampler against UnCLIPScheduler driving super_res_first for every step but the
    last and super_res_last for the last, as UnCLIPPipeline does."""
    seed, steps = 7, 7
    small = np.random.default_rng(4).integers(0, 256, (1, kf.DECODER_SIZE, kf.DECODER_SIZE, 3), dtype=np.uint8)
    ours = karlo["stages"].upsamplers[0].upsample(small, [seed], sampling=SamplingOptions(steps))
    pipe, noise = karlo["text"], StageNoise(seed)
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", noise.draw)
    scheduler = pipe.super_res_scheduler
    scheduler.set_timesteps(steps)
    x = noise.latents()["super_res_latents"]
    low = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 127.5 - 1
    upscaled = torch.nn.functional.interpolate(
        low, size=[kf.SUPER_RES_SIZE] * 2, mode="bicubic", align_corners=False, antialias=True
    )
    timesteps = scheduler.timesteps
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            unet = pipe.super_res_last if i == len(timesteps) - 1 else pipe.super_res_first
            output = unet(torch.cat([x, upscaled], dim=1), t).sample
            previous = None if i + 1 == len(timesteps) else timesteps[i + 1]
            x = scheduler.step(output, t, x, prev_timestep=previous).prev_sample
    theirs = levels((x[0].permute(1, 2, 0).numpy() * 0.5 + 0.5).clip(0, 1))
    assert np.abs(theirs - ours[0]).max() <= 1


@pytest.mark.parametrize("seed", [3, 8])
def test_whole_generations_equal_diffusers_pipeline(karlo, monkeypatch, seed):
    """Prompt to 64 px image against UnCLIPPipeline at Karlo's default steps and guidance, same
    latents and noise: within one level everywhere. The untrained test networks amplify a 1e-3
    difference in the prior's embedding, or rounding the decoder's image to 8 bits before the
    upsampler, to tens of levels; so this holds only because the steps are UnCLIPScheduler's to
    the bit (float32 arithmetic) and the decoder hands its image on unrounded."""
    params = GenerationParameters(prompt=PROMPT, seed=seed, prior_candidates=1)
    (ours,) = asyncio.run(generate(karlo["stages"], params))
    noise = StageNoise(seed)
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", noise.draw)
    theirs = levels(karlo["text"](PROMPT, output_type="np", **noise.latents()).images[0])
    difference = np.abs(theirs - ours.pixels.astype(np.int16))
    print(f"pipeline vs diffusers: max {difference.max()}, mean {difference.mean():.4f}")
    assert ours.pixels.shape == (kf.SUPER_RES_SIZE, kf.SUPER_RES_SIZE, 3)
    assert difference.max() <= 1


def test_whole_variations_equal_diffusers_variation_pipeline(karlo, monkeypatch):
    """An uploaded image to a 64 px variation against UnCLIPImageVariationPipeline (its
    CLIPImageProcessor, image encoder, decoder and super-resolution), same noise: within one
    level. The image is at the encoder's input size, where the two preprocessings agree."""
    from unclip.manipulations import variations

    seed = 5
    image = np.random.default_rng(9).integers(0, 256, (kf.IMAGE_SIZE, kf.IMAGE_SIZE, 3), dtype=np.uint8)
    (ours,) = asyncio.run(variations(karlo["stages"], image, GenerationParameters(prompt="", seed=seed)))
    noise = StageNoise(seed)
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", noise.draw)
    latents = noise.latents()
    result = karlo["variation"](
        Image.fromarray(image), decoder_latents=latents["decoder_latents"], super_res_latents=latents["super_res_latents"],
        output_type="np",
    )  # fmt: skip
    difference = np.abs(levels(result.images[0]) - ours.pixels.astype(np.int16))
    print(f"variation vs diffusers: max {difference.max()}, mean {difference.mean():.4f}")
    assert difference.max() <= 1


def test_imported_weights_generate_reproducibly_and_say_which_they_are(karlo):
    stages = karlo["stages"]
    info = asyncio.run(stages.describe())
    assert info.output_sizes() == [kf.DECODER_SIZE, kf.SUPER_RES_SIZE]
    params = GenerationParameters(prompt=PROMPT, seed=11, n=2, prior_steps=5, decoder_steps=5, upsampler_steps=2)
    first = asyncio.run(generate(stages, params))
    again = asyncio.run(generate(stages, GenerationParameters(**{**params.__dict__, "n": 1, "seed": 12})))
    assert first[1].png == again[0].png and first[0].png != first[1].png
    models = json.loads(read_png_text(first[0].png)["models"])
    assert models["prior"].startswith("prior-diffusers-") and models["decoder"].startswith("decoder-diffusers-")
    config = json.loads((karlo["weights"] / "decoder" / "config.json").read_text())
    assert config["family"] == "diffusers" and config["sampling"]["steps"] == 25 and config["sampling"]["guidance_scale"] == 8.0
    prior = json.loads((karlo["weights"] / "prior" / "config.json").read_text())
    assert prior["sampling"]["steps"] == 25 and prior["sampling"]["guidance_scale"] == 4.0 and prior["clip_sample_range"] == 5.0
    assert json.loads((karlo["weights"] / "upsampler" / "config.json").read_text())["sampling"]["steps"] == 7


def test_variations_need_the_image_encoder(karlo):
    from unclip.manipulations import variations

    image = np.random.default_rng(5).integers(0, 256, (kf.IMAGE_SIZE, kf.IMAGE_SIZE, 3), dtype=np.uint8)
    params = GenerationParameters(prompt="", seed=1, decoder_steps=3, upsampler_steps=2)
    (result,) = asyncio.run(variations(karlo["stages"], image, params))
    assert result.pixels.shape == (kf.SUPER_RES_SIZE, kf.SUPER_RES_SIZE, 3)
    text_only = LocalStages.load(karlo["text_only"])
    try:
        with pytest.raises(FailedPrecondition, match="no image encoder"):
            asyncio.run(variations(text_only, image, params))
    finally:
        text_only.shutdown()


def _copy(src: Path, root: Path, name: str) -> Path:
    return Path(shutil.copytree(src, root / name))


def test_the_importer_names_what_is_wrong(karlo, tmp_path):
    src, out = karlo["src"], tmp_path / "out"
    with pytest.raises(WeightsImportError, match=r"model_index\.json"):
        import_pipeline(tmp_path, out)
    with pytest.raises(WeightsImportError, match="has no prior"):
        import_pipeline(karlo["var"], out)
    with pytest.raises(WeightsImportError, match="already exists"):
        import_pipeline(src, karlo["weights"])

    missing = _copy(src, tmp_path, "missing")
    shutil.rmtree(missing / "super_res_last")
    with pytest.raises(WeightsImportError, match="super_res_last: component directory"):
        import_pipeline(missing, out)

    other = _copy(src, tmp_path, "other")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(WeightsImportError, match="names 'StableDiffusionPipeline'"):
        import_pipeline(other, out)

    misshapen = _copy(src, tmp_path, "misshapen")
    config_path = misshapen / "text_proj" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "cross_attention_dim": kf.CROSS + 8}))
    with pytest.raises(WeightsImportError, match="text_proj: cross_attention_dim 56 != decoder's 48"):
        import_pipeline(misshapen, out)

    tokenizer = _copy(src, tmp_path, "tokenizer")
    data = json.loads((tokenizer / "tokenizer" / "tokenizer.json").read_text())
    data["model"]["vocab"]["cat</w>"] += 1
    (tokenizer / "tokenizer" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(WeightsImportError, match="tokenizer: the vocabulary is not the CLIP BPE"):
        import_pipeline(tokenizer, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_failed_import_leaves_nothing(karlo, tmp_path, monkeypatch):
    import unclip.importers.diffusers_format as importer

    written = []

    def fail_on_the_third(directory, config, state, source):
        written.append(directory)
        if len(written) == 3:
            raise OSError("disk full")
        original(directory, config, state, source)

    original = importer._write_stage
    monkeypatch.setattr(importer, "_write_stage", fail_on_the_third)
    with pytest.raises(OSError, match="disk full"):
        import_pipeline(karlo["src"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_cli_imports_and_generates(karlo, tmp_path):
    import subprocess

    def unclip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "unclip", *args], capture_output=True, text=True, timeout=300)

    out = tmp_path / "weights"
    result = unclip("import", "diffusers", str(karlo["src"]), str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "prior" / "config.json").is_file() and json.loads((out / "import.json").read_text())[
        "pipeline"
    ] == "UnCLIPPipeline"
    refused = unclip("import", "diffusers", str(karlo["src"]), str(out))
    assert refused.returncode == 1 and "already exists" in refused.stderr and "Traceback" not in refused.stderr
    images = tmp_path / "images"
    generated = unclip("generate", PROMPT, "--weights", str(out), "--seed", "2", "--prior-steps", "3", "--decoder-steps", "3",
                       "--upsampler-steps", "2", "--out", str(images))  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    (png,) = images.glob("*.png")
    assert "prior-diffusers-" in read_png_text(png.read_bytes())["models"]


def test_karlos_real_geometry_maps_completely():
    """Karlo's published geometry (diffusers' convert_kakao_brain_unclip_to_diffusers.py and
    the ViT-L/14 CLIP), built on the meta device: the importer's configs rebuild every network
    and its key mapping fills them exactly, with nothing missing or left over."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    from unclip.importers.diffusers_format import Component, convert
    from unclip.models.clip_import import build_open_clip
    from unclip.models.diffusers_unclip import DecoderNetwork, PriorNetwork, SuperResNetwork
    from unclip.stage import Stage

    super_res = dict(
        sample_size=256, layers_per_block=3, block_out_channels=(320, 640, 960, 1280), in_channels=6, out_channels=3,
        add_attention=False, down_block_types=("ResnetDownsampleBlock2D",) * 4, up_block_types=("ResnetUpsampleBlock2D",) * 4,
    )  # fmt: skip
    with torch.device("meta"):
        text = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2,
        ))  # fmt: skip
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=224,
            patch_size=14, projection_dim=768, hidden_act="quick_gelu",
        ))  # fmt: skip
        models = {
            "text_encoder": text,
            "prior": PriorTransformer(),
            "text_proj": UnCLIPTextProjModel(time_embed_dim=1280, cross_attention_dim=1536),
            "decoder": UNet2DConditionModel(
                sample_size=64,
                layers_per_block=3,
                in_channels=3,
                out_channels=6,
                cross_attention_dim=1536,
                down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                block_out_channels=(320, 640, 960, 1280),
                attention_head_dim=64,
                resnet_time_scale_shift="scale_shift",
                class_embed_type="identity",
            ),
            "super_res_first": UNet2DModel(**super_res),
            "super_res_last": UNet2DModel(**super_res),
        }

    def component(model) -> Component:
        config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
        return Component(config, model.state_dict())

    components = {name: component(model) for name, model in models.items()}
    components |= {
        "prior_scheduler": Component(
            {"variance_type": "fixed_small_log", "prediction_type": "sample", "clip_sample_range": 5.0}, {}
        ),
        "decoder_scheduler": Component({"variance_type": "learned_range", "prediction_type": "epsilon"}, {}),
        "super_res_scheduler": Component({"variance_type": "fixed_small_log", "prediction_type": "epsilon"}, {}),
    }
    stages = convert(components, component(vision))
    clip_config, clip_state = stages[Stage.ENCODER]
    prior_config, prior_state = stages[Stage.PRIOR]
    decoder_config, decoder_state = stages[Stage.DECODER]
    upsampler_config, upsampler_state = stages[Stage.UPSAMPLER]
    with torch.device("meta"):
        networks = [
            (build_open_clip(clip_config.open_clip_config), clip_state),
            (PriorNetwork(prior_config.prior, prior_config.context_length), prior_state),
            (DecoderNetwork(decoder_config.decoder, decoder_config.text_proj, decoder_config.context_length), decoder_state),
            (SuperResNetwork(upsampler_config.super_res_first, upsampler_config.super_res_last), upsampler_state),
        ]
    for network, state in networks:
        network.load_state_dict(state, strict=True, assign=True)  # raises on a missing or unexpected key
    assert (decoder_config.image_size, upsampler_config.scale_factor, decoder_config.embed_dim) == (64, 4, 768)
    assert (
        clip_config.open_clip_config["vision_cfg"]["width"] == 1024 and not clip_config.open_clip_config["unclip_no_image_tower"]
    )
    params = sum(t.numel() for _, state in networks for t in state.values())
    print(f"Karlo geometry: {params / 1e9:.2f} B parameters mapped")
    assert params > 3_000_000_000  # all of Karlo, ViT-L/14 included


@pytest.mark.slow
def test_serve_all_with_imported_weights_gives_the_in_process_images(karlo):
    """`unclip serve all --weights DIR`: every stage service loads its imported checkpoint, and
    generations (with previews) and variations come back byte-identical to in-process ones."""

    from test_e2e import _free_port_block

    from unclip.client import Client
    from unclip.images import upload_to_rgb
    from unclip.manipulations import variations

    port = _free_port_block(6)
    address = f"127.0.0.1:{port}"
    with serve_all_process(["--weights", str(karlo["weights"]), "--http-port", str(port + 5)], port):
        steps = dict(prior_steps=4, decoder_steps=4, upsampler_steps=2)
        expected = asyncio.run(generate(karlo["stages"], GenerationParameters(prompt=PROMPT, n=2, seed=21, **steps)))
        image = np.random.default_rng(6).integers(0, 256, (kf.IMAGE_SIZE, kf.IMAGE_SIZE, 3), dtype=np.uint8)
        decode_steps = dict(decoder_steps=4, upsampler_steps=2)
        upload = io.BytesIO()
        Image.fromarray(image).save(upload, format="PNG")
        as_received = upload_to_rgb(upload.getvalue(), kf.SUPER_RES_SIZE)  # the gateway's view of an upload
        params = GenerationParameters(prompt="", seed=2, **decode_steps)
        varied = asyncio.run(variations(karlo["stages"], as_received, params))
        with Client(address, timeout=120) as client:
            remote = client.generate(PROMPT, n=2, seed=21, **steps)
            remote_variation = client.variations(upload.getvalue(), seed=2, **decode_steps)
        assert [i.png for i in remote] == [i.png for i in expected]
        np.testing.assert_array_equal(np.asarray(remote_variation[0].image), varied[0].pixels)


def test_every_operation_runs_on_imported_weights(karlo):
    """Interpolations, text diffs, edits and streamed previews with Karlo-family stages (the
    embeddings between stages are not unit: slerp keeps their norms)."""
    from unclip.manipulations import interpolate, text_diff
    from unclip.pipeline import Inpaint

    stages, side = karlo["stages"], kf.SUPER_RES_SIZE
    fast = dict(prior_steps=3, decoder_steps=3, upsampler_steps=2, seed=9)
    frames = asyncio.run(interpolate(stages, GenerationParameters(prompt="", **fast), 3, prompts=(PROMPT, "a blue square")))
    assert len(frames) == 3 and frames[0].pixels.tolist() != frames[2].pixels.tolist()
    image = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    decode_only = dict(decoder_steps=3, upsampler_steps=2, seed=9)
    diffs = asyncio.run(
        text_diff(stages, image, "a red circle", "a blue circle", GenerationParameters(prompt="", **decode_only), 2)
    )
    assert len(diffs) == 2 and diffs[0].pixels.tolist() != diffs[1].pixels.tolist()
    regenerate = np.zeros((side, side), bool)
    regenerate[: side // 2] = True
    (edited,) = asyncio.run(generate(stages, GenerationParameters(prompt=PROMPT, **fast), inpaint=Inpaint(image, regenerate)))
    np.testing.assert_array_equal(edited.pixels[side // 2 :], image[side // 2 :])  # kept where not regenerated
    previews = []
    params = GenerationParameters(prompt=PROMPT, preview_every=1, **fast)
    asyncio.run(generate(stages, params, on_preview=lambda *args: previews.append(args)))
    assert len(previews) == 3


@pytest.mark.slow
def test_bench_karlo_measures_unclip_beside_diffusers(karlo, tmp_path):
    import subprocess

    out = tmp_path / "karlo.json"
    result = subprocess.run(
        [sys.executable, "-m", "unclip", "bench", "karlo", "--src", str(karlo["src"]), "--imported", str(karlo["weights"]),
         "--runs", "1", "--images", "2", "--prior-steps", "2", "--decoder-steps", "2", "--upsampler-steps", "2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "unclip / diffusers" in result.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["compute_batch"] == {"encoder": 1, "prior": 4, "decoder": 4, "upsampler": 2}
    for side in ("unclip", "diffusers"):
        assert report[side]["images_per_second"] > 0 and report[side]["network_seconds"]["decoder"] > 0
    assert report["ratio"] == pytest.approx(report["unclip"]["images_per_second"] / report["diffusers"]["images_per_second"])


def test_sharded_and_pickled_components_import_the_same(karlo, tmp_path):
    """Components saved as safetensors shards or as PyTorch .bin files (older Karlo downloads)
    import to the very same checkpoints."""
    src = _copy(karlo["src"], tmp_path, "src")
    pipe = karlo["text"]
    shutil.rmtree(src / "decoder")
    pipe.decoder.save_pretrained(src / "decoder", max_shard_size="200KB")
    assert len(list((src / "decoder").glob("*.safetensors"))) > 1
    shutil.rmtree(src / "prior")
    pipe.prior.save_pretrained(src / "prior", safe_serialization=False)
    assert (src / "prior" / "diffusion_pytorch_model.bin").is_file()
    out = import_pipeline(src, tmp_path / "out")
    from safetensors.torch import load_file

    for stage in ("prior", "decoder"):
        ours = load_file(str(out / stage / "model.safetensors"))
        reference = load_file(str(karlo["root"] / "text-only" / stage / "model.safetensors"))
        assert ours.keys() == reference.keys(), stage
        assert all(torch.equal(ours[key], reference[key]) for key in ours), stage
