"""Import a diffusers-format unCLIP (Karlo) into an unclip weights directory.

`import_pipeline(src, out)` reads a local `UnCLIPPipeline` directory (model_index.json plus one
subdirectory per component) and writes one checkpoint directory per stage under `out`:

- clip/: the transformers CLIP text tower (and, from an `UnCLIPImageVariationPipeline`
  directory given as `variations`, its vision tower) converted to open_clip;
- prior/: PriorTransformer, with its clip_mean/clip_std;
- decoder/: UnCLIPTextProjModel + UNet2DConditionModel;
- upsampler/: super_res_first + super_res_last.

Each is a config.json with `"family": "diffusers"` plus a safetensors file; the weights are
copied, not referenced. The prior and decoder also store the text encoder's encoding of the
empty prompt: Karlo's unconditional pass for guidance, which those services cannot compute
without the encoder. The directory is written beside `out` and renamed into place, so `out`
is either complete or absent.

`convert` is the pure part (configs and state dicts in, stage configs and state dicts out), so
a test can run it on Karlo's full geometry on the meta device.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unclip.checkpoint import CONFIG_FILE, FORMAT_VERSION
from unclip.config import (
    ClipStageConfig,
    DiffusersDecoderStageConfig,
    DiffusersPriorStageConfig,
    DiffusersUpsamplerStageConfig,
    DiffusionConfig,
    to_dict,
)
from unclip.models import clip_import
from unclip.stage import DIFFUSERS, Stage

TEXT_PIPELINE = "UnCLIPPipeline"
VARIATION_PIPELINE = "UnCLIPImageVariationPipeline"
# The components each stage is built from.
TEXT_COMPONENTS = (
    "text_encoder", "tokenizer", "prior", "text_proj", "decoder", "super_res_first", "super_res_last",
    "prior_scheduler", "decoder_scheduler", "super_res_scheduler",
)  # fmt: skip
WEIGHT_FILES = ("diffusion_pytorch_model", "model", "pytorch_model")
CLIP_END_OF_TEXT = 49407  # Karlo's tokenizer pads with the end token


class WeightsImportError(ValueError):
    """SRC cannot be imported; the message names the component and what is wrong."""


@dataclass
class Component:
    """One diffusers component as found on disk: its config and (for models) its tensors."""

    config: dict[str, Any]
    state: dict[str, Tensor]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsImportError(f"{what}: {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise WeightsImportError(f"{what}: {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise WeightsImportError(f"{what}: {path} does not hold a JSON object")
    return data


def pipeline_class(src: Path) -> str:
    """The pipeline class model_index.json names; a clear error if src is not a diffusers unCLIP."""
    if not src.is_dir():
        raise WeightsImportError(f"{src}: not a directory")
    index = _read_json(src / "model_index.json", f"{src} (not a diffusers pipeline directory?)")
    name = index.get("_class_name")
    if name not in (TEXT_PIPELINE, VARIATION_PIPELINE):
        raise WeightsImportError(
            f"{src}: model_index.json names {name!r}, not a diffusers {TEXT_PIPELINE} or {VARIATION_PIPELINE}"
        )
    return str(name)


def _load_tensors(directory: Path, name: str) -> dict[str, Tensor]:
    """A component's weights: safetensors (single or sharded), else a PyTorch .bin loaded with
    weights_only (no code runs from the file)."""
    from safetensors.torch import load_file

    for stem in WEIGHT_FILES:
        for variant in ("", ".fp16"):
            single = directory / f"{stem}{variant}.safetensors"
            if single.is_file():
                return load_file(str(single))
            index = directory / f"{stem}{variant}.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(_read_json(index, name).get("weight_map", {}).values()))
                state: dict[str, Tensor] = {}
                for shard in shards:
                    state.update(load_file(str(directory / shard)))
                return state
            binary = directory / f"{stem}{variant}.bin"
            if binary.is_file():
                return torch.load(binary, map_location="cpu", weights_only=True)
    raise WeightsImportError(f"{name}: no weights in {directory} (looked for {', '.join(WEIGHT_FILES)} .safetensors / .bin)")


def read_component(src: Path, name: str, *, weights: bool = True) -> Component:
    directory = src / name
    if not directory.is_dir():
        raise WeightsImportError(f"{name}: component directory {directory} is missing")
    config_file = "scheduler_config.json" if name.endswith("scheduler") else "config.json"
    if name == "feature_extractor":
        config_file = "preprocessor_config.json"
    config = _read_json(directory / config_file, name)
    state = {k: v.float() if v.is_floating_point() else v for k, v in _load_tensors(directory, name).items()} if weights else {}
    return Component(config, state)


# open_clip's names for CLIP's two special tokens, and the names Hugging Face tokenizers give them.
_SPECIAL_TOKENS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def read_tokenizer(directory: Path) -> int:
    """Check that the pipeline's tokenizer is the CLIP BPE that unclip tokenises with (open_clip's);
    the id it pads with. Reads vocab.json (older saves) or tokenizer.json."""
    import open_clip

    vocab: Any
    if (directory / "vocab.json").is_file():
        vocab = _read_json(directory / "vocab.json", "tokenizer")
    else:
        model = _read_json(directory / "tokenizer.json", "tokenizer (neither vocab.json nor tokenizer.json)").get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, dict):
        raise WeightsImportError(f"tokenizer: {directory} holds no BPE vocabulary")
    expected = {_SPECIAL_TOKENS.get(token, token): i for token, i in open_clip.SimpleTokenizer().encoder.items()}
    if vocab != expected:
        differing = next((token for token, i in expected.items() if vocab.get(token) != i), None)
        raise WeightsImportError(
            f"tokenizer: the vocabulary is not the CLIP BPE open_clip tokenises with "
            f"({len(vocab)} tokens, e.g. {differing!r} differs); unclip cannot reproduce this tokenizer"
        )
    pad = "<|endoftext|>"
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            token = _read_json(directory / name, "tokenizer").get("pad_token", pad)
            pad = token.get("content", pad) if isinstance(token, dict) else str(token)
            break
    if pad not in vocab:
        raise WeightsImportError(f"tokenizer: pad_token {pad!r} is not in the vocabulary")
    return int(vocab[pad])


def _diffusion(scheduler: dict[str, Any], name: str) -> tuple[DiffusionConfig, float | None]:
    """An UnCLIPScheduler config as unclip's diffusion config, plus its x_0 clipping range."""
    if scheduler.get("_class_name", "UnCLIPScheduler") != "UnCLIPScheduler":
        raise WeightsImportError(f"{name}: {scheduler.get('_class_name')!r} is not an UnCLIPScheduler")
    schedule = scheduler.get("beta_schedule", "squaredcos_cap_v2")
    if schedule != "squaredcos_cap_v2":
        raise WeightsImportError(f"{name}: beta_schedule {schedule!r} is not supported (UnCLIPScheduler uses squaredcos_cap_v2)")
    prediction = {"epsilon": "eps", "sample": "x0"}.get(scheduler.get("prediction_type", "epsilon"))
    if prediction is None:
        raise WeightsImportError(f"{name}: prediction_type {scheduler.get('prediction_type')!r} is not epsilon or sample")
    variance = {"fixed_small_log": "fixed_small", "learned_range": "learned_range"}.get(
        scheduler.get("variance_type", "fixed_small_log")
    )
    if variance is None:
        raise WeightsImportError(
            f"{name}: variance_type {scheduler.get('variance_type')!r} is not fixed_small_log or learned_range"
        )
    clip = float(scheduler.get("clip_sample_range", 1.0)) if scheduler.get("clip_sample", True) else None
    config = DiffusionConfig(
        timesteps=int(scheduler.get("num_train_timesteps", 1000)), schedule=schedule, parameterization=prediction,
        variance=variance, spacing="karlo", arithmetic="float32",
    )  # fmt: skip
    return config, clip


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise WeightsImportError(message)


NullText = tuple[Tensor, Tensor, Tensor]
"""The empty prompt's (embedding [D], per-token encodings [L, W], mask [L])."""


def null_text(clip_config: dict[str, Any], clip_state: Mapping[str, Tensor], pad_token_id: int) -> NullText:
    """The converted text encoder's encoding of "": what Karlo's guidance conditions its
    unconditional pass on."""
    import open_clip

    from unclip.models.clip import encode_text_tokens, text_mask_and_padding

    device = next(iter(clip_state.values())).device
    with torch.device(device):
        model = clip_import.build_open_clip(clip_config)
    model.load_state_dict(dict(clip_state), strict=True, assign=True)
    tokenizer = open_clip.SimpleTokenizer(context_length=clip_config["text_cfg"]["context_length"])
    tokens, mask = text_mask_and_padding(tokenizer([""]).to(device), pad_token_id)
    with torch.no_grad():
        embedding, encodings = encode_text_tokens(model.eval(), tokens)
    return embedding[0], encodings[0], mask[0]


def _prefixed(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{key}": value for key, value in state.items()}


def _null_tensors(null: NullText) -> dict[str, Tensor]:
    embedding, encodings, mask = null
    return {"null_text_embed": embedding, "null_text_encodings": encodings, "null_text_mask": mask}


def _model_config(component: Component) -> dict[str, Any]:
    # diffusers' bookkeeping keys say nothing about the geometry; keep the rest as the component had it.
    return {k: v for k, v in component.config.items() if not k.startswith("_")}


def convert(
    components: Mapping[str, Component],
    image_encoder: Component | None = None,
    feature_extractor: Component | None = None,
    *,
    pad_token_id: int = CLIP_END_OF_TEXT,
) -> dict[Stage, tuple[Any, dict[str, Tensor]]]:
    """Each stage's config and state dict from a text-to-image pipeline's components (and an
    image-variation pipeline's image encoder). Checks that the components agree with each other."""
    missing = [name for name in TEXT_COMPONENTS if name not in components and name != "tokenizer"]
    _require(not missing, f"missing component(s): {', '.join(missing)}")
    text = components["text_encoder"]
    prior, text_proj, decoder = components["prior"], components["text_proj"], components["decoder"]
    first, last = components["super_res_first"], components["super_res_last"]

    try:
        clip_config = clip_import.open_clip_config(text.config, None if image_encoder is None else image_encoder.config)
        clip_state = clip_import.convert_state_dict(
            text.state, None if image_encoder is None else image_encoder.state, text.config,
            None if image_encoder is None else image_encoder.config,
        )  # fmt: skip
    except ValueError as error:
        source = "text_encoder" if image_encoder is None else "text_encoder / image_encoder"
        raise WeightsImportError(f"{source}: {error}") from error
    if feature_extractor is not None:
        clip_config[clip_import.PREPROCESS_KEY] = {
            "mean": list(feature_extractor.config.get("image_mean", [])),
            "std": list(feature_extractor.config.get("image_std", [])),
        }

    embed_dim = clip_config["embed_dim"]
    width = clip_config["text_cfg"]["width"]
    context = clip_config["text_cfg"]["context_length"]
    p, tp, d = _model_config(prior), _model_config(text_proj), _model_config(decoder)
    f, la = _model_config(first), _model_config(last)
    prior_dim = p.get("embedding_dim", 768)
    _require(prior_dim == embed_dim, f"prior: embedding_dim {prior_dim} != text_encoder projection_dim {embed_dim}")
    _require(prior_dim == width, f"prior: embedding_dim {prior_dim} != text_encoder hidden_size {width} (its text input)")
    _require(
        p.get("num_embeddings", 77) == context,
        f"prior: num_embeddings {p.get('num_embeddings', 77)} != text_encoder max_position_embeddings {context}",
    )
    clip_dim = tp.get("clip_embeddings_dim", 768)
    _require(clip_dim == embed_dim, f"text_proj: clip_embeddings_dim {clip_dim} != text_encoder projection_dim {embed_dim}")
    _require(clip_dim == width, f"text_proj: clip_embeddings_dim {clip_dim} != text_encoder hidden_size {width}")
    _require(
        tp.get("cross_attention_dim") == d.get("cross_attention_dim"),
        f"text_proj: cross_attention_dim {tp.get('cross_attention_dim')} != decoder's {d.get('cross_attention_dim')}",
    )
    channels = d.get("in_channels", 4)
    _require(
        d.get("out_channels") in (channels, 2 * channels),
        f"decoder: out_channels {d.get('out_channels')} must be in_channels {channels} or twice it (learned variance)",
    )
    for name, cfg in (("super_res_first", f), ("super_res_last", la)):
        _require(
            cfg.get("in_channels") == 2 * channels and cfg.get("out_channels") == channels,
            f"{name}: in/out channels {cfg.get('in_channels')}/{cfg.get('out_channels')} must be {2 * channels}/{channels}",
        )
    _require(f.get("sample_size") == la.get("sample_size"), "super_res_first and super_res_last differ in sample_size")
    small, large = int(d.get("sample_size", 64)), int(f.get("sample_size", 256))
    _require(large % small == 0 and large > small, f"super_res sample_size {large} is not a multiple of decoder's {small}")

    null = null_text(clip_config, clip_state, pad_token_id)
    prior_diffusion, prior_clip = _diffusion(components["prior_scheduler"].config, "prior_scheduler")
    decoder_diffusion, decoder_clip = _diffusion(components["decoder_scheduler"].config, "decoder_scheduler")
    sr_diffusion, sr_clip = _diffusion(components["super_res_scheduler"].config, "super_res_scheduler")
    _require(
        (decoder_diffusion.variance == "learned_range") == (d.get("out_channels") == 2 * channels),
        "decoder_scheduler: variance_type must be learned_range exactly when the decoder predicts a variance",
    )

    return {
        Stage.ENCODER: (
            ClipStageConfig(
                model_name="", open_clip_config=clip_config, normalize=False, pad_token_id=pad_token_id, family=DIFFUSERS
            ),
            clip_state,
        ),
        Stage.PRIOR: (
            DiffusersPriorStageConfig(
                prior=p, embed_dim=embed_dim, context_length=context, diffusion=prior_diffusion, clip_sample_range=prior_clip
            ),
            {**_prefixed("prior", prior.state), **_null_tensors(null)},
        ),
        Stage.DECODER: (
            DiffusersDecoderStageConfig(
                decoder=d,
                text_proj=tp,
                embed_dim=embed_dim,
                context_length=context,
                image_size=small,
                channels=channels,
                diffusion=decoder_diffusion,
                clip_sample_range=decoder_clip,
            ),
            {**_prefixed("decoder", decoder.state), **_prefixed("text_proj", text_proj.state), **_null_tensors(null)},
        ),
        Stage.UPSAMPLER: (
            DiffusersUpsamplerStageConfig(
                super_res_first=f,
                super_res_last=la,
                scale_factor=large // small,
                input_size=small,
                diffusion=sr_diffusion,
                clip_sample_range=sr_clip,
            ),
            {**_prefixed("super_res_first", first.state), **_prefixed("super_res_last", last.state)},
        ),
    }


def _write_stage(directory: Path, config: Any, state: dict[str, Tensor], source: str) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    save_file(tensors, str(directory / config.weights), metadata={"kind": config.kind, "source": source})
    (directory / CONFIG_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **to_dict(config)}, indent=2) + "\n")


def import_pipeline(
    src: str | Path, out: str | Path, *, variations: str | Path | None = None, log: Callable[[str], None] = lambda _: None
) -> Path:
    """Convert the diffusers UnCLIPPipeline at `src` (plus the image encoder of the
    UnCLIPImageVariationPipeline at `variations`) into the unclip weights directory `out`, which
    must not exist yet. Raises WeightsImportError naming what is wrong; nothing is left at `out` then."""
    src, target = Path(src), Path(out)
    kind = pipeline_class(src)
    if kind == VARIATION_PIPELINE:
        raise WeightsImportError(
            f"{src}: an {VARIATION_PIPELINE} has no prior; import the {TEXT_PIPELINE} and pass this directory as "
            "--variations to add its image encoder"
        )
    if target.exists():
        raise WeightsImportError(f"{target}: already exists; choose a new directory (an import never overwrites weights)")
    components: dict[str, Component] = {}
    pad_token_id = CLIP_END_OF_TEXT
    for name in TEXT_COMPONENTS:
        if name == "tokenizer":
            pad_token_id = read_tokenizer(src / name)
            continue
        log(f"reading {name}")
        components[name] = read_component(src, name, weights=not name.endswith("scheduler"))
    image_encoder = feature_extractor = None
    if variations is not None:
        variations = Path(variations)
        if pipeline_class(variations) != VARIATION_PIPELINE:
            raise WeightsImportError(f"--variations {variations}: expected an {VARIATION_PIPELINE} directory")
        log("reading image_encoder")
        image_encoder = read_component(variations, "image_encoder")
        if (variations / "feature_extractor").is_dir():
            feature_extractor = read_component(variations, "feature_extractor", weights=False)
    log("converting")
    stages = convert(components, image_encoder, feature_extractor, pad_token_id=pad_token_id)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for stage, (config, state) in stages.items():
            log(f"writing {stage.kind}")
            _write_stage(staging / stage.kind, config, state, str(src))
        provenance = {
            "imported_from": str(src.resolve()),
            "pipeline": kind,
            "variations": None if variations is None else str(variations),
        }
        (staging / "import.json").write_text(json.dumps(provenance, indent=2) + "\n")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


__all__ = ["WeightsImportError", "convert", "import_pipeline", "null_text", "pipeline_class", "read_component"]
