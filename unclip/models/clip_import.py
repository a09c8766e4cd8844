"""Import a Hugging Face transformers CLIP (CLIPTextModelWithProjection, optionally CLIPVisionModelWithProjection)
into an open_clip CLIP, so the open_clip based encoder stage can serve Kakao Brain's Karlo weights.

Works on plain config dicts (config.json / ``config.to_dict()``) and state dicts: transformers is not imported.

Text-only repos (Karlo's text-to-image diffusers layout has text_encoder/ but no image_encoder/): open_clip's CLIP
always has a visual tower, so a tiny placeholder ViT is configured, its weights from a fixed-seed init (converting
twice gives identical tensors). The config then carries ``NO_IMAGE_TOWER_KEY`` ("unclip_no_image_tower": true) at top level so the caller
can refuse image encoding. open_clip does *not* tolerate unknown keys (``CLIP(**cfg)`` and
``open_clip.create_model`` raise TypeError), so the marker is always present (false when a real vision tower was
converted) and ``build_open_clip`` strips it; drop it before handing the dict to open_clip directly.

Pooling: transformers pools the text at the first ``eos_token_id`` (or at argmax of the ids for the legacy
``eos_token_id == 2`` configs that older transformers exports carry); open_clip's default pools at argmax of the ids. These agree for the
legacy configs and whenever eos is the largest id (vocab_size - 1, as the OpenAI CLIP tokenizer's 49407 of 49408),
given each row contains an eos token; other eos ids are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg
from torch import Tensor

NO_IMAGE_TOWER_KEY = "unclip_no_image_tower"
# Optional image normalisation of the source (its feature extractor's image_mean / image_std).
PREPROCESS_KEY = "unclip_preprocess"

# open_clip's LayerNorm uses torch's default eps.
_OPEN_CLIP_LN_EPS = 1e-5
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # transformers hidden_act -> open_clip quick_gelu
# transformers' pre-PR-24773 CLIP configs carry this eos id and then pool at argmax of the ids, like open_clip.
_LEGACY_EOS_ID = 2
# The smallest vision tower open_clip builds comfortably; only a stand-in for text-only repos.
_PLACEHOLDER_VISION_CFG = {"image_size": 32, "patch_size": 16, "width": 64, "head_width": 64, "layers": 1, "mlp_ratio": 1.0}
_PLACEHOLDER_SEED = 0
# open_clip's initial logit scale, log(1 / 0.07): the WithProjection models have no logit_scale of their own.
_LOGIT_SCALE = math.log(1 / 0.07)


def _field(cfg: dict[str, Any], name: str, where: str) -> Any:
    if name not in cfg:
        raise ValueError(f"{where}.{name}: missing")
    return cfg[name]


def _positive_int(cfg: dict[str, Any], name: str, where: str, square: bool = False) -> int:
    value = _field(cfg, name, where)
    if square and isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]  # image / patch sizes may be given as (square) pairs
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}.{name}={value!r}: expected a positive integer")
    return value


def _quick_gelu(cfg: dict[str, Any], where: str) -> bool:
    act = _field(cfg, "hidden_act", where)
    if act not in _ACTIVATIONS:
        raise ValueError(f"{where}.hidden_act={act!r}: open_clip supports only {sorted(_ACTIVATIONS)}")
    eps = _field(cfg, "layer_norm_eps", where)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, _OPEN_CLIP_LN_EPS, rel_tol=1e-6):
        raise ValueError(f"{where}.layer_norm_eps={eps!r}: open_clip's LayerNorm uses {_OPEN_CLIP_LN_EPS}")
    return _ACTIVATIONS[act]


def _heads(cfg: dict[str, Any], width: int, where: str) -> int:
    heads = _positive_int(cfg, "num_attention_heads", where)
    if width % heads:
        raise ValueError(f"{where}.num_attention_heads={heads}: does not divide hidden_size {width}")
    return heads


def _mlp_ratio(cfg: dict[str, Any], width: int, where: str) -> float:
    """A ratio for which open_clip's int(width * mlp_ratio) gives back intermediate_size exactly."""
    hidden = _positive_int(cfg, "intermediate_size", where)
    ratio = hidden / width
    for _ in range(4):  # width * (hidden / width) may round to just below hidden
        if int(width * ratio) == hidden:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise ValueError(f"{where}.intermediate_size={hidden}: not representable as an open_clip mlp_ratio of width {width}")


def _check_pooling(text_config: dict[str, Any], vocab_size: int) -> None:
    eos = _field(text_config, "eos_token_id", "text_config")
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if eos == _LEGACY_EOS_ID or eos == vocab_size - 1:
        return
    raise ValueError(
        f"text_config.eos_token_id={eos!r}: transformers pools at the first eos token but open_clip pools at argmax of "
        f"the token ids; they agree only when eos is the largest id (vocab_size - 1 = {vocab_size - 1}) or for the "
        f"legacy eos_token_id {_LEGACY_EOS_ID}"
    )


def open_clip_config(text_config: dict[str, Any], vision_config: dict[str, Any] | None) -> dict[str, Any]:
    """An open_clip model config dict (embed_dim, quick_gelu, text_cfg, vision_cfg) equivalent to the transformers
    CLIPTextConfig (and CLIPVisionConfig) dicts, plus NO_IMAGE_TOWER_KEY (true when vision_config is None).

    Raises ValueError naming the field for anything open_clip cannot represent.
    """
    width = _positive_int(text_config, "hidden_size", "text_config")
    vocab_size = _positive_int(text_config, "vocab_size", "text_config")
    embed_dim = _positive_int(text_config, "projection_dim", "text_config")
    quick_gelu = _quick_gelu(text_config, "text_config")
    _check_pooling(text_config, vocab_size)
    text_cfg = {
        "context_length": _positive_int(text_config, "max_position_embeddings", "text_config"),
        "vocab_size": vocab_size,
        "width": width,
        "heads": _heads(text_config, width, "text_config"),
        "layers": _positive_int(text_config, "num_hidden_layers", "text_config"),
        "mlp_ratio": _mlp_ratio(text_config, width, "text_config"),
        "pool_type": "argmax",
    }

    if vision_config is None:
        vision_cfg: dict[str, Any] = dict(_PLACEHOLDER_VISION_CFG)
    else:
        where = "vision_config"
        if _positive_int(vision_config, "projection_dim", where) != embed_dim:
            raise ValueError(
                f"{where}.projection_dim={vision_config['projection_dim']}: differs from text_config.projection_dim "
                f"{embed_dim}; open_clip has one embed_dim"
            )
        if _quick_gelu(vision_config, where) != quick_gelu:
            raise ValueError(
                f"{where}.hidden_act={vision_config['hidden_act']!r}: differs from text_config.hidden_act "
                f"{text_config['hidden_act']!r}; open_clip has one quick_gelu flag for both towers"
            )
        channels = vision_config.get("num_channels", 3)
        if channels != 3:
            raise ValueError(f"{where}.num_channels={channels!r}: open_clip's ViT takes RGB (3) images")
        vision_width = _positive_int(vision_config, "hidden_size", where)
        vision_cfg = {
            "image_size": _positive_int(vision_config, "image_size", where, square=True),
            "patch_size": _positive_int(vision_config, "patch_size", where, square=True),
            "width": vision_width,
            "layers": _positive_int(vision_config, "num_hidden_layers", where),
            "head_width": vision_width // _heads(vision_config, vision_width, where),
            "mlp_ratio": _mlp_ratio(vision_config, vision_width, where),
        }
        if vision_cfg["image_size"] < vision_cfg["patch_size"]:
            raise ValueError(f"{where}.patch_size={vision_cfg['patch_size']}: larger than image_size")

    return {
        "embed_dim": embed_dim,
        "quick_gelu": quick_gelu,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        NO_IMAGE_TOWER_KEY: vision_config is None,
    }


class _Source:
    """Hands out the tensors of one transformers state dict, checking shapes, and reports what was never taken."""

    def __init__(self, state: dict[str, Tensor], name: str):
        self.state = dict(state)
        self.name = name

    def take(self, key: str, shape: tuple[int, ...]) -> Tensor:
        if key not in self.state:
            raise ValueError(f"{self.name}: missing key {key!r}")
        tensor = self.state.pop(key)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{self.name}: key {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
        return tensor

    def drop_position_ids(self, key: str, positions: int) -> None:
        # Older transformers saved this buffer; it must be the identity arange the open_clip model assumes.
        if key in self.state:
            ids = self.take(key, (1, positions))
            if not torch.equal(ids.to(torch.long).cpu(), torch.arange(positions).unsqueeze(0)):
                raise ValueError(f"{self.name}: key {key!r} is not arange({positions}); custom position ids are unsupported")

    def finish(self) -> None:
        if self.state:
            raise ValueError(f"{self.name}: unexpected keys {sorted(self.state)}")


def _layer_norm(src: _Source, key: str, width: int) -> tuple[Tensor, Tensor]:
    return src.take(f"{key}.weight", (width,)), src.take(f"{key}.bias", (width,))


def _encoder(src: _Source, src_prefix: str, dst_prefix: str, layers: int, width: int, hidden: int) -> dict[str, Tensor]:
    """transformers CLIPEncoderLayer weights -> open_clip ResidualAttentionBlock weights."""
    out: dict[str, Tensor] = {}
    for i in range(layers):
        s, d = f"{src_prefix}.{i}", f"{dst_prefix}.{i}"
        # nn.MultiheadAttention packs the q, k, v projections into one in_proj, in that order.
        qkv = [f"{s}.self_attn.{p}_proj" for p in "qkv"]
        out[f"{d}.attn.in_proj_weight"] = torch.cat([src.take(f"{k}.weight", (width, width)) for k in qkv])
        out[f"{d}.attn.in_proj_bias"] = torch.cat([src.take(f"{k}.bias", (width,)) for k in qkv])
        out[f"{d}.attn.out_proj.weight"] = src.take(f"{s}.self_attn.out_proj.weight", (width, width))
        out[f"{d}.attn.out_proj.bias"] = src.take(f"{s}.self_attn.out_proj.bias", (width,))
        out[f"{d}.ln_1.weight"], out[f"{d}.ln_1.bias"] = _layer_norm(src, f"{s}.layer_norm1", width)
        out[f"{d}.ln_2.weight"], out[f"{d}.ln_2.bias"] = _layer_norm(src, f"{s}.layer_norm2", width)
        out[f"{d}.mlp.c_fc.weight"] = src.take(f"{s}.mlp.fc1.weight", (hidden, width))
        out[f"{d}.mlp.c_fc.bias"] = src.take(f"{s}.mlp.fc1.bias", (hidden,))
        out[f"{d}.mlp.c_proj.weight"] = src.take(f"{s}.mlp.fc2.weight", (width, hidden))
        out[f"{d}.mlp.c_proj.bias"] = src.take(f"{s}.mlp.fc2.bias", (width,))
    return out


def _mlp_width(cfg: dict[str, Any]) -> int:
    return int(cfg["width"] * cfg["mlp_ratio"])


def _placeholder_visual(config: dict[str, Any]) -> dict[str, Tensor]:
    # Seeded inside fork_rng so the weights are reproducible and the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_PLACEHOLDER_SEED)
        model = build_open_clip(config)
    return {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}


def convert_state_dict(
    text_state: dict[str, Tensor],
    vision_state: dict[str, Tensor] | None,
    text_config: dict[str, Any],
    vision_config: dict[str, Any] | None,
) -> dict[str, Tensor]:
    """The open_clip CLIP state dict (keys exactly as the model's state_dict()) from the state dicts of
    CLIPTextModelWithProjection and CLIPVisionModelWithProjection (None with vision_config None: placeholder tower).

    Raises ValueError naming the missing / unexpected / misshapen key.
    """
    if (vision_state is None) != (vision_config is None):
        raise ValueError("vision_state and vision_config must both be given or both be None")
    config = open_clip_config(text_config, vision_config)
    embed_dim, text_cfg = config["embed_dim"], config["text_cfg"]
    width, context = text_cfg["width"], text_cfg["context_length"]

    src = _Source(text_state, "text_state")
    out: dict[str, Tensor] = {
        "token_embedding.weight": src.take("text_model.embeddings.token_embedding.weight", (text_cfg["vocab_size"], width)),
        "positional_embedding": src.take("text_model.embeddings.position_embedding.weight", (context, width)),
    }
    src.drop_position_ids("text_model.embeddings.position_ids", context)
    out.update(
        _encoder(src, "text_model.encoder.layers", "transformer.resblocks", text_cfg["layers"], width, _mlp_width(text_cfg))
    )
    out["ln_final.weight"], out["ln_final.bias"] = _layer_norm(src, "text_model.final_layer_norm", width)
    # nn.Linear stores [out, in]; open_clip multiplies x @ text_projection with a [width, embed_dim] parameter.
    out["text_projection"] = src.take("text_projection.weight", (embed_dim, width)).t().contiguous()
    src.finish()

    if vision_state is None:
        out.update(_placeholder_visual(config))
    else:
        vis = config["vision_cfg"]
        vwidth, patch = vis["width"], vis["patch_size"]
        positions = (vis["image_size"] // patch) ** 2 + 1  # patches plus the class token
        src = _Source(vision_state, "vision_state")
        emb = "vision_model.embeddings"
        out["visual.class_embedding"] = src.take(f"{emb}.class_embedding", (vwidth,))
        out["visual.conv1.weight"] = src.take(f"{emb}.patch_embedding.weight", (vwidth, 3, patch, patch))
        out["visual.positional_embedding"] = src.take(f"{emb}.position_embedding.weight", (positions, vwidth))
        src.drop_position_ids(f"{emb}.position_ids", positions)
        out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = _layer_norm(src, "vision_model.pre_layrnorm", vwidth)
        out.update(
            _encoder(src, "vision_model.encoder.layers", "visual.transformer.resblocks", vis["layers"], vwidth, _mlp_width(vis))
        )
        # transformers normalises only the pooled class token; open_clip normalises all tokens then takes the class
        # token: the same, LayerNorm being per token.
        out["visual.ln_post.weight"], out["visual.ln_post.bias"] = _layer_norm(src, "vision_model.post_layernorm", vwidth)
        out["visual.proj"] = src.take("visual_projection.weight", (embed_dim, vwidth)).t().contiguous()
        src.finish()

    out["logit_scale"] = torch.tensor(_LOGIT_SCALE)
    return out


def build_open_clip(config: dict[str, Any]) -> open_clip.CLIP:
    """An open_clip CLIP with random weights from a config as returned by open_clip_config.

    Constructed directly rather than through open_clip's global model-config registry, so nothing is registered.
    Like open_clip.create_model it attaches the image preprocessing config at the tower's input size: OpenAI
    CLIP's mean / std (which transformers' CLIPImageProcessor uses too) unless the config's optional
    PREPROCESS_KEY ({"mean": [...], "std": [...]}, from the source's feature extractor) says otherwise.
    """
    kwargs = copy.deepcopy({k: v for k, v in config.items() if k not in (NO_IMAGE_TOWER_KEY, PREPROCESS_KEY)})
    model = open_clip.model.CLIP(**kwargs)
    preprocess = dataclasses.asdict(PreprocessCfg())
    preprocess["size"] = model.visual.image_size
    preprocess.update({k: tuple(v) for k, v in (config.get(PREPROCESS_KEY) or {}).items() if k in ("mean", "std") and v})
    open_clip.set_model_preprocess_cfg(model, preprocess)
    return model
