"""Stage 1 engine: texts and images to CLIP embeddings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from unclip.calls import TextEncoding
from unclip.checkpoint import CheckpointError, load_weights, weights_path
from unclip.config import ClipStageConfig
from unclip.errors import FailedPrecondition, InvalidArgument
from unclip.models import clip_import
from unclip.models.clip import create_clip, encode_text_tokens, preprocess_images, text_mask_and_padding
from unclip.stage import Stage
from unclip.stages.engine import Engine
from unclip.stages.guidance import in_compute_batches
from unclip.validation import MAX_BATCH, check_array, check_batch

MAX_IMAGE_SIDE = 4096


class ClipEncoder(Engine):
    STAGE = Stage.ENCODER
    config: ClipStageConfig
    model: open_clip.CLIP

    def __init__(self, config: ClipStageConfig, model: torch.nn.Module, version: str = "unversioned", **options: int):
        super().__init__(config, model, version, **options)
        self.context_length = int(self.model.context_length)
        if config.open_clip_config is None:
            self.tokenizer = open_clip.get_tokenizer(config.model_name)
        else:  # an imported CLIP: the CLIP BPE, which the importer checked the source used
            self.tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)
        inline = config.open_clip_config or {}
        self.has_image_tower = not inline.get(clip_import.NO_IMAGE_TOWER_KEY, False)

    @classmethod
    def network(cls, config: ClipStageConfig, directory: Path) -> torch.nn.Module:
        path = weights_path(directory, config)
        if not path.is_file():
            raise CheckpointError(f"{directory}: weights file {path} not found")
        if config.open_clip_config is None:
            model = create_clip(config.model_name)
            open_clip.load_checkpoint(model, str(path))
            return model
        model = clip_import.build_open_clip(config.open_clip_config)
        model.load_state_dict(load_weights(directory, config), strict=True)
        return model

    def unit(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings as this checkpoint's stages take them: unit-norm, or as CLIP gives them."""
        return F.normalize(embeddings, dim=-1) if self.config.normalize else embeddings

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    def describe(self) -> dict[str, int]:
        return {"embed_dim": self.embed_dim}

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        check_batch(len(texts), "texts", MAX_BATCH)
        for index, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{index}]: must not be empty")
            # +2 for the start and end tokens; open_clip would silently truncate longer texts.
            length = len(self.tokenizer.encode(text)) + 2
            if length > self.context_length:
                raise InvalidArgument(
                    f"texts[{index}]: {length} tokens exceed the encoder's context length of {self.context_length}"
                )
        return self.tokenizer(texts)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> TextEncoding:
        tokens, mask = text_mask_and_padding(self.tokenize(texts).to(self.device), self.config.pad_token_id)
        # At the compute batch, so that a text's encoding never depends on what it was batched with.
        started = time.perf_counter()
        (pooled, states), calls = in_compute_batches(lambda t: encode_text_tokens(self.model, t), self.compute_batch, tokens)
        self.stats.add_network_calls(calls, len(texts), time.perf_counter() - started)
        return TextEncoding(
            embeddings=self.unit(pooled).float().cpu().numpy(),
            encodings=states.float().cpu().numpy(),
            mask=mask.cpu().numpy(),
        )

    @torch.no_grad()
    def encode_image(self, images: np.ndarray) -> np.ndarray:
        if not self.has_image_tower:
            raise FailedPrecondition(
                "these weights have no image encoder, so they cannot embed images (variations, image "
                "interpolations, edits); import the image-variation pipeline's with `unclip import diffusers --variations`"
            )
        check_array(images, "images", shape=(None, None, None, 3), dtypes=[np.uint8])
        check_batch(images.shape[0], "images", MAX_BATCH)
        if not (1 <= images.shape[1] <= MAX_IMAGE_SIDE and 1 <= images.shape[2] <= MAX_IMAGE_SIDE):
            raise InvalidArgument(f"images: sides must be 1..{MAX_IMAGE_SIDE} pixels, got {images.shape[1]}x{images.shape[2]}")
        pixels = preprocess_images(self.model, torch.from_numpy(np.array(images, dtype=np.uint8))).to(self.device)
        started = time.perf_counter()
        (embeddings,), calls = in_compute_batches(self.model.encode_image, self.compute_batch, pixels)
        self.stats.add_network_calls(calls, len(pixels), time.perf_counter() - started)
        return self.unit(embeddings).float().cpu().numpy()
