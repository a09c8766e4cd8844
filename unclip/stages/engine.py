"""What every stage engine shares: loading from a checkpoint, the device, per-row seeding,
and sampling with counters.

An engine is the in-process core of one stage: numpy in, numpy out, inputs validated. The gRPC
services and the in-process pipeline call the same engines, which is what makes an image
identical whichever way it was produced.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from unclip import settings
from unclip.calls import ModelInfo
from unclip.cancel import CancelToken
from unclip.checkpoint import CheckpointError, load_weights, read_config, weights_version
from unclip.config import DiffusionConfig
from unclip.diffusion import GaussianDiffusion, make_betas, sample
from unclip.errors import Cancelled, DeadlineExceeded
from unclip.options import ResolvedSampling, SamplingOptions
from unclip.stage import Stage
from unclip.stages.tensors import images_to_unit
from unclip.validation import MAX_BATCH, check_array, check_batch, check_seeds

ProgressFn = Callable[[int, int, torch.Tensor], None]


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


def compute_device() -> torch.device:
    """Where engines run: UNCLIP_DEVICE (e.g. "cpu", "cuda", "cuda:1"), else CUDA when present.

    Random numbers are always drawn on the CPU from the per-row generators, so a seed means the
    same noise on any device; GPU kernels still round differently from CPU ones, so pixels are
    identical between processes on the same kind of device.
    """
    return torch.device(settings.DEVICE.get() or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_diffusion(config: DiffusionConfig) -> GaussianDiffusion:
    """The diffusion process a stage config describes (sampling and training share it)."""
    return GaussianDiffusion(make_betas(config.schedule, config.timesteps), parameterization=config.parameterization)


class Engine:
    """Base of the stage engines: a config, a network on the compute device, a weights version."""

    STAGE: ClassVar[Stage]

    def __init__(self, config: Any, model: torch.nn.Module, version: str = "unversioned"):
        self.config = config
        self.version = version
        self.model = model.eval().requires_grad_(False).to(compute_device())
        self.device = next(self.model.parameters()).device

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> Any:
        config = read_config(directory)
        if config.kind != cls.STAGE.kind:
            raise CheckpointError(f"{directory}: holds a {config.kind!r} checkpoint, expected {cls.STAGE.kind!r}")
        return cls(config, cls.network(config, Path(directory)), weights_version(directory, config))

    @classmethod
    def network(cls, config: Any, directory: Path) -> torch.nn.Module:
        """The stage's network for `config`, with the checkpoint's weights loaded."""
        raise NotImplementedError

    def info(self) -> ModelInfo:
        return ModelInfo(kind=self.STAGE.kind, version=self.version, **self.describe())

    def describe(self) -> dict[str, int]:
        """What the stage's ModelInfo says besides kind and version."""
        return {}


class DiffusionEngine(Engine):
    """A diffusion stage: the diffusion process of its config, and a sampler run per request."""

    def __init__(self, config: Any, model: torch.nn.Module, version: str = "unversioned"):
        super().__init__(config, model, version)
        self.diffusion = build_diffusion(config.diffusion)
        self.stats = StageStats()

    @classmethod
    def network(cls, config: Any, directory: Path) -> torch.nn.Module:
        module = cls.build(config)
        module.load_state_dict(load_weights(directory, config))
        return module

    @classmethod
    def build(cls, config: Any) -> torch.nn.Module:
        """The untrained network of `config`."""
        raise NotImplementedError

    def describe(self) -> dict[str, int]:
        return {"max_steps": self.config.diffusion.timesteps}

    def sampling_options(self, sampling: SamplingOptions) -> ResolvedSampling:
        """A request's options completed with the checkpoint's defaults, and checked."""
        return sampling.resolve(self.config.sampling, self.config.diffusion.timesteps)

    def check_rows(self, batch: int, name: str, seeds: list[int]) -> list[int]:
        """Check the batch size and that there is one valid seed per row; the seeds as ints."""
        check_batch(batch, name, MAX_BATCH)
        return check_seeds(seeds, batch)

    def inpaint_condition(
        self, inpaint: tuple[np.ndarray, np.ndarray] | None, batch: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Validate (images uint8 [B,H,W,3], regenerate-mask bool [B,H,W]) and turn them into the
        sampler's (x0_known in [-1, 1], keep mask) pair."""
        if inpaint is None:
            return None
        images, mask = inpaint
        check_array(images, "inpaint_images", shape=(batch, height, width, 3), dtypes=[np.uint8])
        check_array(mask, "inpaint_mask", shape=(batch, height, width), dtypes=[np.bool_])
        keep = torch.from_numpy(~mask)[:, None].float()
        return images_to_unit(images).to(self.device), keep.to(self.device)

    def run_sampler(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        generators: list[torch.Generator],
        options: ResolvedSampling,
        *,
        cancel: CancelToken | None = None,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        progress: ProgressFn | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the sampler with resolved `options` (`sampling_options`), counting steps and
        whether it finished or was stopped."""

        def on_step(step: int, total: int, x0: torch.Tensor) -> None:
            self.stats.add_steps()
            if progress is not None:
                progress(step, total, x0)

        try:
            result = sample(
                self.diffusion,
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
                device=self.device,
            )
        except (Cancelled, DeadlineExceeded):
            self.stats.finish(stopped=True)
            raise
        self.stats.finish(stopped=False)
        return result
