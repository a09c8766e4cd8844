"""What every stage engine shares: per-row seeding and computation, loading, sampling, guidance.

An engine is the in-process core of one stage: numpy in, numpy out, inputs validated. The
gRPC services and the in-process pipeline call the same engines, which is what makes an image
identical whichever way it was produced.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unclip.cancel import CancelToken
from unclip.checkpoint import load_weights, read_config, weights_version
from unclip.config import DiffusionConfig
from unclip.diffusion import GaussianDiffusion, classifier_free_guidance, make_betas, sample, two_condition_guidance
from unclip.errors import Cancelled, DeadlineExceeded
from unclip.options import SamplingOptions
from unclip.validation import check_array, check_range

# Bounds on one request's cost.
MAX_BATCH = 64
MAX_CANDIDATES = 16
MAX_GUIDANCE_SCALE = 50.0


@dataclass
class StageStats:
    """Counters a service exposes (and tests read) to show what its sampler did."""

    completed: int = 0
    stopped: int = 0
    steps: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_steps(self, count: int = 1) -> None:
        with self.lock:
            self.steps += count

    def finish(self, stopped: bool) -> None:
        with self.lock:
            if stopped:
                self.stopped += 1
            else:
                self.completed += 1


def row_generators(seeds: list[int], salt: str) -> list[torch.Generator]:
    """One generator per row, from the row's seed and the stage's salt.

    The salt keeps stages statistically independent although they share the image's seed.
    """
    generators = []
    for seed in seeds:
        state = np.random.SeedSequence([seed, zlib.crc32(salt.encode())]).generate_state(2, np.uint32)
        generators.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return generators


def resolve_guidance(scale: float | None, default: float, name: str = "guidance_scale") -> float:
    return check_range(default if scale is None else scale, name, 0.0, MAX_GUIDANCE_SCALE)


def compute_device() -> torch.device:
    """Where engines run: UNCLIP_DEVICE (e.g. "cpu", "cuda", "cuda:1"), else CUDA when present.

    Random numbers are always drawn on the CPU from the per-row generators, so a seed means the
    same noise on any device; GPU kernels still round differently from CPU ones, so pixels are
    identical between processes on the same kind of device.
    """
    name = os.environ.get("UNCLIP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def images_to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def unit_to_images(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounding to nearest."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def load_module(directory: str | Path, expected_kind: str, build: Callable[[object], torch.nn.Module]):
    """(config, eval-mode module with weights, weights version) from a checkpoint directory."""
    config = read_config(directory)
    if config.kind != expected_kind:
        raise ValueError(f"{directory}: holds a {config.kind!r} checkpoint, expected {expected_kind!r}")
    module = build(config)
    module.load_state_dict(load_weights(directory, config))
    module = module.eval().requires_grad_(False).to(compute_device())
    return config, module, weights_version(directory, config)


ProgressFn = Callable[[int, int, torch.Tensor], None]


def embedding_to_model_space(embeddings: torch.Tensor) -> torch.Tensor:
    """Unit-norm CLIP embeddings scaled by sqrt(D), so each component has about unit variance
    like the Gaussian noise the diffusion models mix them with."""
    return F.normalize(embeddings, dim=-1) * embeddings.shape[-1] ** 0.5


def build_diffusion(config: DiffusionConfig) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas(config.schedule, config.timesteps), parameterization=config.parameterization)


def inpaint_condition(
    inpaint: tuple[np.ndarray, np.ndarray] | None, batch: int, height: int, width: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate (images uint8 [B,H,W,3], regenerate-mask bool [B,H,W]) and turn them into the
    sampler's (x0_known in [-1, 1], keep mask) pair."""
    if inpaint is None:
        return None
    images, mask = inpaint
    check_array(images, "inpaint_images", shape=(batch, height, width, 3), dtypes=[np.uint8])
    check_array(mask, "inpaint_mask", shape=(batch, height, width), dtypes=[np.bool_])
    keep = torch.from_numpy(~mask)[:, None].float()
    return images_to_unit(images).to(device), keep.to(device)


def sample_rows(
    diffusion: GaussianDiffusion,
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    options: SamplingOptions,
    stats: StageStats,
    *,
    cancel: CancelToken | None = None,
    denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: ProgressFn | None = None,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Run the sampler on `device`, counting steps and whether it finished or was stopped."""

    def on_step(step: int, total: int, x0: torch.Tensor) -> None:
        stats.add_steps()
        if progress is not None:
            progress(step, total, x0)

    try:
        result = sample(
            diffusion,
            model_fn,
            shape,
            generators,
            steps=options.steps,
            sampler=options.sampler,
            eta=options.eta,
            denoised_fn=denoised_fn,
            check_cancelled=cancel.check if cancel is not None else None,
            progress=on_step,
            known=known,
            device=device,
        )
    except (Cancelled, DeadlineExceeded):
        stats.finish(stopped=True)
        raise
    stats.finish(stopped=False)
    return result


def one_row_at_a_time(net_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Call `net_fn(x, t, **conditioning)` on each batch row alone and stack the results.

    CPU (and GPU) kernels choose their blocking by batch size, so a row computed inside a batch
    differs in the last bits from the same row alone, and diffusion sampling amplifies that into
    visible pixel changes. Row by row, an image depends only on its own inputs and seed, whatever
    it was batched with: that is what lets a batch be reproduced image by image, and lets a
    server batch requests without changing anyone's images.
    """

    def call(x: torch.Tensor, t: torch.Tensor, **conditioning: torch.Tensor) -> torch.Tensor:
        rows = [
            net_fn(x[i : i + 1], t[i : i + 1], **{key: value[i : i + 1] for key, value in conditioning.items()})
            for i in range(x.shape[0])
        ]
        return torch.cat(rows)

    return call


def stacked_passes(
    net_fn: Callable[..., torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, conditionings: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, ...]:
    """`net_fn` on (x_t, t) under each conditioning, run as one stacked batch; one output each."""
    stacked = {key: torch.cat([conditioning[key] for conditioning in conditionings]) for key in conditionings[0]}
    copies = len(conditionings)
    return net_fn(torch.cat([x_t] * copies), torch.cat([t] * copies), **stacked).chunk(copies)


def guided(
    net_fn: Callable[..., torch.Tensor],
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    guidance_scale: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A sampler model_fn applying classifier-free guidance to `net_fn(x, t, **conditioning)`.

    The conditional and unconditional halves run as one doubled batch; with scale 1 the
    unconditional half is skipped since it cannot change the result.
    """

    net_fn = one_row_at_a_time(net_fn)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            return net_fn(x_t, t, **cond)
        out_cond, out_uncond = stacked_passes(net_fn, x_t, t, [cond, uncond])
        return classifier_free_guidance(out_cond, out_uncond, guidance_scale)

    return model_fn


def guided_two_conditions(
    net_fn: Callable[..., torch.Tensor],
    both: dict[str, torch.Tensor],
    first_only: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    first_scale: float,
    second_scale: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Like `guided`, with a scale per condition (`two_condition_guidance`): three passes a step."""

    net_fn = one_row_at_a_time(net_fn)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_both, out_first, out_uncond = stacked_passes(net_fn, x_t, t, [both, first_only, uncond])
        return two_condition_guidance(out_uncond, out_first, out_both, first_scale, second_scale)

    return model_fn
