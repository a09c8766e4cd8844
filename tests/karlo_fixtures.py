"""Tiny random diffusers unCLIP pipelines (Karlo's layout, built here: nothing is downloaded),
saved with save_pretrained like the ones users import."""

from __future__ import annotations

import gzip
from pathlib import Path

import open_clip
import torch
from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline, UnCLIPPipeline
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from open_clip.tokenizer import default_bpe
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

EMBED = 32  # CLIP width = projection = the prior's embedding_dim
CROSS = 48
DECODER_SIZE = 16
SUPER_RES_SIZE = 64
IMAGE_SIZE = 32  # the image encoder's input


def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP BPE as a transformers tokenizer (as Karlo's), from open_clip's vocabulary file."""
    simple = open_clip.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in simple.encoder.items()}
    with gzip.open(default_bpe()) as handle:
        merges = handle.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], pad_token="<|endoftext|>", model_max_length=77)


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default inits leave output layers and the null embedding at zero, which would hide a wrong
    mapping; every parameter gets seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return module.eval()


def text_encoder() -> CLIPTextModelWithProjection:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=EMBED,
        projection_dim=EMBED, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, hidden_act="quick_gelu",
    )  # fmt: skip
    return _randomise(CLIPTextModelWithProjection(config), 1)


def image_encoder() -> CLIPVisionModelWithProjection:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=EMBED, projection_dim=EMBED, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, hidden_act="quick_gelu",
    )  # fmt: skip
    return _randomise(CLIPVisionModelWithProjection(config), 2)


def decoder_parts() -> dict:
    torch.manual_seed(0)
    text_proj = UnCLIPTextProjModel(clip_embeddings_dim=EMBED, time_embed_dim=128, cross_attention_dim=CROSS)
    decoder = UNet2DConditionModel(
        sample_size=DECODER_SIZE, in_channels=3, out_channels=6, layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), cross_attention_dim=CROSS,
        attention_head_dim=8, resnet_time_scale_shift="scale_shift", class_embed_type="identity",
    )  # fmt: skip

    def super_res(seed: int) -> UNet2DModel:
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=SUPER_RES_SIZE, layers_per_block=1, in_channels=6, out_channels=3, block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
            up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        )  # fmt: skip

    return {
        "text_proj": _randomise(text_proj, 3),
        "decoder": _randomise(decoder, 4),
        "super_res_first": _randomise(super_res(5), 5),
        "super_res_last": _randomise(super_res(6), 6),
        "decoder_scheduler": UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        "super_res_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    }


def text_pipeline() -> UnCLIPPipeline:
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED, num_layers=1)
    prior = _randomise(prior, 7)
    with torch.no_grad():
        prior.clip_std.copy_(prior.clip_std.abs() + 0.5)  # a standard deviation
    return UnCLIPPipeline(
        prior=prior, text_encoder=text_encoder(), tokenizer=clip_tokenizer(),
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
        **decoder_parts(),
    )  # fmt: skip


def variation_pipeline(text: UnCLIPPipeline) -> UnCLIPImageVariationPipeline:
    """Karlo's image-variation sibling: the same decoder and text encoder, plus an image encoder."""
    return UnCLIPImageVariationPipeline(
        decoder=text.decoder, text_encoder=text.text_encoder, tokenizer=text.tokenizer, text_proj=text.text_proj,
        feature_extractor=CLIPImageProcessor(crop_size=IMAGE_SIZE, size={"shortest_edge": IMAGE_SIZE}),
        image_encoder=image_encoder(), super_res_first=text.super_res_first, super_res_last=text.super_res_last,
        decoder_scheduler=text.decoder_scheduler, super_res_scheduler=text.super_res_scheduler,
    )  # fmt: skip


def save(pipeline: UnCLIPPipeline | UnCLIPImageVariationPipeline, directory: Path) -> Path:
    pipeline.save_pretrained(directory)
    return directory
