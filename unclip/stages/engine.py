"""What every stage engine shares: loading from a checkpoint, the device, per-row seeding,
and sampling with counters.

An engine is the in-process core of one stage: numpy in, numpy out, inputs validated. The gRPC
services and the in-process pipeline call the same engines, which is what makes an image
identical whichever way it was produced.
"""

from __future__ import annotations

import functools
import threading
import time
import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from unclip import metrics, settings
from unclip.calls import ModelInfo
from unclip.cancel import CancelToken
from unclip.checkpoint import CheckpointError, load_weights, read_config, weights_version
from unclip.config import DiffusionConfig
from unclip.diffusion import GaussianDiffusion, SamplingRun, make_betas
from unclip.errors import Cancelled, DeadlineExceeded
from unclip.options import ResolvedSampling, SamplingOptions
from unclip.stage import Stage
from unclip.stages.guidance import Guidance, NetworkInput, evaluate, signature
from unclip.stages.tensors import images_to_unit
from unclip.validation import MAX_BATCH, check_array, check_batch, check_seeds

ProgressFn = Callable[[int, int, torch.Tensor], None]


@dataclass
class StageStats:
    """Counters a service exposes (and tests read) to show what its engine did.

    `network_calls` counts calls of the network and `network_rows` the rows they computed,
    padding aside: their ratio is how well batching fills the compute batch. `network_seconds`
    is the time spent in them (what a stage costs under load, for benchmarks).
    """

    completed: int = 0
    stopped: int = 0
    steps: int = 0
    network_calls: int = 0
    network_rows: int = 0
    network_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_steps(self, count: int = 1) -> None:
        with self.lock:
            self.steps += count

    def add_network_calls(self, calls: int, rows: int, seconds: float) -> None:
        with self.lock:
            self.network_calls += calls
            self.network_rows += rows
            self.network_seconds += seconds

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
    return GaussianDiffusion(
        make_betas(config.schedule, config.timesteps), parameterization=config.parameterization, variance=config.variance,
        arithmetic=config.arithmetic,
    )  # fmt: skip


class Engine:
    """Base of the stage engines: a config, a network on the compute device, a weights version,
    and the compute batch every network evaluation runs at (1: each row alone)."""

    STAGE: ClassVar[Stage]

    def __init__(self, config: Any, model: torch.nn.Module, version: str = "unversioned", *, compute_batch: int = 1):
        if compute_batch < 1:
            raise ValueError(f"compute_batch must be at least 1, got {compute_batch}")
        self.config = config
        self.version = version
        self.compute_batch = compute_batch
        self.model = model.eval().requires_grad_(False).to(compute_device())
        self.device = next(self.model.parameters()).device
        self.stats = StageStats()

    @classmethod
    def from_checkpoint(cls, directory: str | Path, *, compute_batch: int = 1) -> Any:
        config = read_config(directory)
        if config.kind != cls.STAGE.kind:
            raise CheckpointError(f"{directory}: holds a {config.kind!r} checkpoint, expected {cls.STAGE.kind!r}")
        return cls(config, cls.network(config, Path(directory)), weights_version(directory, config), compute_batch=compute_batch)

    @classmethod
    def network(cls, config: Any, directory: Path) -> torch.nn.Module:
        """The stage's network for `config`, with the checkpoint's weights loaded."""
        raise NotImplementedError

    def info(self) -> ModelInfo:
        return ModelInfo(kind=self.STAGE.kind, version=self.version, compute_batch=self.compute_batch, **self.describe())

    def describe(self) -> dict[str, int]:
        """What the stage's ModelInfo says besides kind, version and compute batch."""
        return {}

    def evaluate(self, network: Callable[..., torch.Tensor], inputs: Sequence[NetworkInput]) -> list[torch.Tensor]:
        """`guidance.evaluate` at this engine's compute batch, counted in `stats`."""
        started = time.perf_counter()
        outputs, calls = evaluate(network, self.compute_batch, inputs)
        rows = sum(x.shape[0] for x, _, _ in inputs)
        self.stats.add_network_calls(calls, rows, time.perf_counter() - started)
        observe = metrics.NETWORK_ROWS.labels(self.STAGE.value).observe
        for call in range(calls):  # every call but the last is full; the last holds the rest
            observe(min(self.compute_batch, rows - call * self.compute_batch))
        return outputs

    def run_calls(self, calls: Sequence[tuple[Any, CancelToken | None, ProgressFn | None]]) -> list[Any]:
        """Each (call, cancel, progress)'s result, or the exception it failed with. Calls that
        can share network evaluations do (`DiffusionEngine`); here they run one by one."""
        results: list[Any] = []
        for call, cancel, progress in calls:
            try:
                results.append(call.run(self, cancel, progress))
            except Exception as error:  # noqa: BLE001 - each call answers with its own error
                results.append(error)
        return results


@dataclass(eq=False)
class Job:
    """One call's rows in a joint sampling run: its sampler state, its guidance, how its final
    tensor becomes the call's result, and its own cancellation and progress."""

    run: SamplingRun
    guidance: Guidance
    finish: Callable[[torch.Tensor], Any]
    cancel: CancelToken | None = None
    progress: ProgressFn | None = None

    @property
    def rows(self) -> int:
        """Network rows per step: the call's rows times its guidance passes."""
        return self.run.x.shape[0] * len(self.guidance.conditionings)


Deliver = Callable[[Any], None]


class JointRun:
    """Jobs of one engine sampling together, one step at a time. Jobs join between steps and
    leave as soon as they finish, each handing its result (or error) to its `deliver`.

    Every step, the jobs whose network inputs have the same shapes are evaluated in one go
    (`Engine.evaluate`), whatever their step counts, samplers or guidance; a job stops alone
    when its own deadline passes or its caller goes away. Rows do not depend on what they are
    evaluated with, so when a job joins or leaves changes no image.
    """

    def __init__(self, engine: DiffusionEngine):
        self.engine = engine
        self._jobs: list[tuple[Job, Deliver]] = []

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def rows(self) -> int:
        """Network rows per step of the jobs in the run."""
        return sum(job.rows for job, _ in self._jobs)

    def add(self, job: Job, deliver: Deliver) -> None:
        self._jobs.append((job, deliver))

    def _leave(self, entry: tuple[Job, Deliver], result: Any, stopped: bool) -> None:
        self._jobs.remove(entry)
        self.engine.stats.finish(stopped=stopped)
        entry[1](result)

    @torch.no_grad()
    def step(self) -> None:
        """One denoising step of every job; a failure of the step fails every job in it."""
        for entry in list(self._jobs):
            if entry[0].cancel is not None:
                try:
                    entry[0].cancel.check()
                except (Cancelled, DeadlineExceeded) as error:
                    self._leave(entry, error, stopped=True)
        try:
            by_signature: dict[Hashable, list[tuple[tuple[Job, Deliver], NetworkInput]]] = {}
            for entry in self._jobs:
                inputs = entry[0].guidance.inputs(*entry[0].run.model_input())
                by_signature.setdefault(signature(inputs), []).append((entry, inputs))
            for members in by_signature.values():
                outputs = self.engine.evaluate(self.engine.model, [inputs for _, inputs in members])
                for ((job, _), _), output in zip(members, outputs, strict=True):
                    x0 = job.run.advance(job.guidance.output(output))
                    self.engine.stats.add_steps()
                    if job.progress is not None:
                        job.progress(job.run.step - 1, job.run.total, x0)
        except Exception as error:  # noqa: BLE001 - handed to every job of the step
            for entry in list(self._jobs):
                self._leave(entry, error, stopped=True)
            return
        for entry in [entry for entry in self._jobs if entry[0].run.done]:
            try:
                result = entry[0].finish(entry[0].run.x)
            except Exception as error:  # noqa: BLE001 - this job's own failure
                result = error
            self._leave(entry, result, stopped=False)


class DiffusionEngine(Engine):
    """A diffusion stage: the diffusion process of its config, and sampling runs that any number
    of calls share. A subclass turns each of its calls into a `Job` (`job`)."""

    def __init__(self, config: Any, model: torch.nn.Module, version: str = "unversioned", *, compute_batch: int = 1):
        super().__init__(config, model, version, compute_batch=compute_batch)
        self.diffusion = build_diffusion(config.diffusion)

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
        return {"max_steps": self.config.diffusion.timesteps, "default_steps": self.config.sampling.steps}

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

    def sampling_run(
        self,
        shape: tuple[int, ...],
        generators: list[torch.Generator],
        options: ResolvedSampling,
        *,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SamplingRun:
        """The sampler state of one call's rows, with resolved `options` (`sampling_options`)."""
        return SamplingRun(
            self.diffusion, shape, generators, steps=options.steps, sampler=options.sampler, eta=options.eta,
            denoised_fn=denoised_fn, known=known, device=self.device, spacing=self.config.diffusion.spacing,
        )  # fmt: skip

    def job(self, call: Any, cancel: CancelToken | None = None, progress: ProgressFn | None = None) -> Job:
        """The validated `Job` of one of this stage's calls."""
        raise NotImplementedError

    def run_jobs(self, jobs: Sequence[Job]) -> list[Any]:
        """Run jobs together to the end (`JointRun`); each one's result, or the error that
        stopped it."""
        results: dict[int, Any] = {}
        run = JointRun(self)
        for index, job in enumerate(jobs):
            run.add(job, functools.partial(results.__setitem__, index))
        while run:
            run.step()
        return [results[index] for index in range(len(jobs))]

    def run_one(self, job: Job) -> Any:
        (result,) = self.run_jobs([job])
        if isinstance(result, BaseException):
            raise result
        return result

    def run_calls(self, calls: Sequence[tuple[Any, CancelToken | None, ProgressFn | None]]) -> list[Any]:
        """The calls' results (or errors) from one joint run; a call refused as it is validated
        fails alone, and a failure of the joint run fails all of them."""
        jobs: list[Job] = []
        refused: dict[int, Exception] = {}
        for index, (call, cancel, progress) in enumerate(calls):
            try:
                jobs.append(self.job(call, cancel, progress))
            except Exception as error:  # noqa: BLE001 - each call answers with its own error
                refused[index] = error
        joint = iter(self.run_jobs(jobs))
        return [refused[index] if index in refused else next(joint) for index in range(len(calls))]
