"""DALL-E 2's manipulations, all through the image embedding: variations, interpolations,
text diffs. (Edits are `pipeline.generate` with an `Inpaint`.) Like the pipeline, these are
written once against a `StageBackend` and run in-process or through the services."""

from __future__ import annotations

from typing import Any

import numpy as np

from unclip.calls import EncodeTextCall
from unclip.errors import InvalidArgument
from unclip.parameters import GenerationParameters
from unclip.pipeline import GeneratedImage, Run, StageBackend, StageCallback
from unclip.stage import Stage

MAX_FRAMES = 16
DEFAULT_FRAMES = 5  # interpolations and text diffs when a request gives none


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation between the directions of a and b [D] at fractions t [K] -> [K, D].

    Unit vectors (unclip's own embeddings) stay unit. Embeddings used as CLIP gives them (Karlo's
    decoder takes them so) keep a norm interpolated linearly between the two ends'.
    """
    norms = np.array([np.linalg.norm(a), np.linalg.norm(b)])
    a, b = a / norms[0], b / norms[1]
    omega = np.arccos(np.clip(np.dot(a, b), -1.0, 1.0))
    t = t[:, None]
    # (Anti)parallel within float precision: the straight line.
    mixed = (1 - t) * a + t * b if omega < 1e-6 else (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    unit = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    if np.allclose(norms, 1.0, atol=1e-3):
        return unit.astype(np.float32)
    return (unit * ((1 - t) * norms[0] + t * norms[1])).astype(np.float32)


def check_frames(frames: int) -> None:
    if not 2 <= frames <= MAX_FRAMES:
        raise InvalidArgument(f"frames: must be between 2 and {MAX_FRAMES}, got {frames}")


async def variations(
    backend: StageBackend,
    image: np.ndarray,
    params: GenerationParameters,
    *,
    deadline: float | None = None,
    on_stage: StageCallback | None = None,
) -> list[GeneratedImage]:
    """n new images sharing the uploaded image's CLIP embedding (the decoder sees no text)."""
    run = await Run.start(backend, params, operation="variations", deadline=deadline, on_stage=on_stage, stages_before_decode=1)
    embedding = await run.encode_images(image[None])
    await run.finished(Stage.ENCODER)
    images = await run.decode_and_upsample(np.repeat(embedding, params.n, axis=0), None)
    return await run.results(images, {})


async def interpolate(
    backend: StageBackend,
    params: GenerationParameters,
    frames: int,
    *,
    images: tuple[np.ndarray, np.ndarray] | None = None,
    prompts: tuple[str, str] | None = None,
    deadline: float | None = None,
    on_stage: StageCallback | None = None,
) -> list[GeneratedImage]:
    """`frames` images whose embeddings slerp from the first input's to the second's. Every
    frame uses the same seed, so only the embedding changes from frame to frame."""
    check_frames(frames)
    if (images is None) == (prompts is None):
        raise InvalidArgument("interpolate: give either two images or two prompts")
    if prompts is not None and not all(p.strip() for p in prompts):
        raise InvalidArgument("prompts: must not be empty")
    run = await Run.start(
        backend,
        params,
        operation="interpolate",
        batch=frames,
        same_seed=True,
        deadline=deadline,
        on_stage=on_stage,
        stages_before_decode=1 if images is not None else 2,
    )
    if images is not None:
        ends = await run.encode_images(np.stack(images))
        await run.finished(Stage.ENCODER)
        description: dict[str, Any] = {}
    else:
        assert prompts is not None
        text = await run.encode_prompts(list(prompts))
        ends = await run.sample_prior(text, seeds=run.seeds[:2])
        description = {"prompts": list(prompts)}
    embeddings = slerp(ends[0], ends[1], np.linspace(0.0, 1.0, frames))
    pixels = await run.decode_and_upsample(embeddings, None)
    return await run.results(pixels, description)


async def text_diff(
    backend: StageBackend,
    image: np.ndarray,
    caption: str,
    target_caption: str,
    params: GenerationParameters,
    frames: int,
    *,
    max_rotation: float = 0.5,
    deadline: float | None = None,
    on_stage: StageCallback | None = None,
) -> list[GeneratedImage]:
    """DALL-E 2 text diffs: rotate the image embedding toward the normalised difference of the
    target and current caption embeddings, from 0 to max_rotation of the arc between them."""
    check_frames(frames)
    if not caption.strip() or not target_caption.strip():
        raise InvalidArgument("caption and target_caption: must not be empty")
    if not 0.0 < max_rotation <= 1.0:
        raise InvalidArgument(f"max_rotation: must be in (0, 1], got {max_rotation}")
    run = await Run.start(
        backend,
        params,
        operation="text_diff",
        batch=frames,
        same_seed=True,
        deadline=deadline,
        on_stage=on_stage,
        stages_before_decode=1,
    )
    image_embedding = (await run.encode_images(image[None]))[0]
    text = await run.call(EncodeTextCall([caption, target_caption]))
    await run.finished(Stage.ENCODER)
    diff = text.embeddings[1] - text.embeddings[0]
    norm = np.linalg.norm(diff)
    if norm < 1e-6:
        raise InvalidArgument("caption and target_caption: their CLIP embeddings are identical; nothing to move toward")
    # As DALL-E 2: slerp from the image embedding toward the diff direction (at the image
    # embedding's own norm, for embeddings that are not unit).
    toward = diff / norm * np.linalg.norm(image_embedding)
    embeddings = slerp(image_embedding, toward, np.linspace(0.0, max_rotation, frames))
    pixels = await run.decode_and_upsample(embeddings, None)
    return await run.results(pixels, {"caption": caption, "target_caption": target_caption})
