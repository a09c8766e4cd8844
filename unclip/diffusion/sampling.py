"""Ancestral (DDPM) and DDIM sampling loops, with per-row random streams.

Every batch row draws all of its randomness from its own torch.Generator, so a row's result is
the same whether it is sampled alone or batched with any other rows.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.respace import respace_to_steps

SAMPLERS = ("ddim", "ddpm")

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""(x_t, original timesteps LongTensor[B]) -> output in the diffusion's parameterization, shaped like x_t."""
DenoisedFn = Callable[[Tensor], Tensor]
ProgressFn = Callable[[int, int, Tensor], None]


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Extrapolate from the unconditional toward the conditional prediction (Ho & Salimans 2022)."""
    return uncond + scale * (cond - uncond)


def two_condition_guidance(uncond: Tensor, first_only: Tensor, both: Tensor, first_scale: float, second_scale: float) -> Tensor:
    """Classifier-free guidance with a scale per condition, the second added on top of the first
    (as InstructPix2Pix guides by image and instruction): a step of `first_scale` from nothing to
    the first condition, then `second_scale` from the first to both. Equal scales give
    `classifier_free_guidance(both, uncond, scale)`."""
    return uncond + first_scale * (first_only - uncond) + second_scale * (both - first_only)


def row_noise(
    generators: Sequence[torch.Generator],
    shape_per_row: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal noise [len(generators), *shape_per_row]; row i comes from generators[i] alone.

    Drawn in float32 on each generator's device, then converted, so a seed yields the same numbers
    whatever the dtype. `device` defaults to the first generator's device.
    """
    if not generators:
        raise ValueError("row_noise needs at least one generator")
    rows = [torch.randn(tuple(shape_per_row), generator=g, device=g.device) for g in generators]
    return torch.stack([row.to(device or rows[0].device) for row in rows]).to(dtype)


class SamplingRun:
    """The reverse process for one group of rows, a step at a time.

    `model_input()` is what the network must be evaluated at next, and `advance(output)` takes
    the step with its answer. `sample` drives one run with one network; an engine can drive
    several runs (other step counts, samplers, guidance) and answer them with shared network
    calls, since each row's randomness comes from its own generator.

    x_T (if not given) and every step's noise come from `row_noise(generators, ...)`. DDPM draws
    noise on every step but the last; DDIM only when eta > 0 (eta is ignored by DDPM).
    `denoised_fn` post-processes each predicted x_0 (e.g. clamping), and eps is re-derived from
    the result so the step stays consistent with it. `device` (default: x_T's, else the first
    generator's) is where sampling happens.

    `known = (x0_known, keep)` inpaints: where `keep` is 1 the result is x0_known, and at every
    step that region of x_t is replaced by x0_known noised to the same level (per-row noise), so
    the model fills in the rest consistently with it. `spacing` picks the respaced timesteps
    (`space_timesteps`). With a learned variance (`GaussianDiffusion.variance`) the network's
    output has twice x's channels, and DDPM steps take their variance from the second half.
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        shape: Sequence[int],
        generators: Sequence[torch.Generator],
        *,
        steps: int,
        sampler: str = "ddim",
        eta: float = 0.0,
        denoised_fn: DenoisedFn | None = None,
        x_T: Tensor | None = None,
        device: torch.device | str | None = None,
        known: tuple[Tensor, Tensor] | None = None,
        spacing: str = "even",
    ):
        shape = tuple(shape)
        _validate_arguments(shape, generators, sampler, eta, x_T)
        self.process = respace_to_steps(diffusion, steps, spacing)
        self.generators, self.sampler, self.eta = generators, sampler, eta
        self.denoised_fn, self.known = denoised_fn, known
        self.x = row_noise(generators, shape[1:], device=device) if x_T is None else x_T.to(device or x_T.device)
        self.total = self.process.num_timesteps
        self.step = 0  # steps taken
        if known is not None:
            self.x = _impose_known(self.process, self.x, known, generators, self.total - 1)

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def _t(self) -> Tensor:
        """The respaced timestep of the next step, per row."""
        return torch.full((self.x.shape[0],), self.total - 1 - self.step, dtype=torch.long, device=self.x.device)

    def model_input(self) -> tuple[Tensor, Tensor]:
        """(x_t, the original timesteps) the network is evaluated at for the next step."""
        return self.x, self.process.model_timesteps(self._t())

    @torch.no_grad()
    def advance(self, model_output: Tensor) -> Tensor:
        """Take the next step with the network's output for `model_input()`; the predicted x_0."""
        t = self._t()
        t_index = self.total - 1 - self.step
        prediction, variance_output = self.process.split_variance(model_output, self.x)
        if self.sampler == "ddpm":  # needs no eps
            x0_pred = self.process.predict_x0(prediction, self.x, t)
            if self.denoised_fn is not None:
                x0_pred = self.denoised_fn(x0_pred)
            noise = _step_noise(self.generators, self.x, self.sampler, self.eta, is_last_step=t_index == 0)
            log_variance = None if variance_output is None else self.process.learned_log_variance(variance_output, t)
            self.x = self.process.ddpm_step(x0_pred, self.x, t, noise, log_variance)
        else:
            x0_pred, eps_pred = self.process.split_model_output(prediction, self.x, t)
            if self.denoised_fn is not None:
                x0_pred = self.denoised_fn(x0_pred)
                eps_pred = self.process.predict_eps_from_x0(self.x, t, x0_pred)
            noise = _step_noise(self.generators, self.x, self.sampler, self.eta, is_last_step=t_index == 0)
            self.x = self.process.ddim_step(x0_pred, eps_pred, self.x, t, self.eta, noise)
        if self.known is not None:
            self.x = _impose_known(self.process, self.x, self.known, self.generators, t_index - 1)
        self.step += 1
        return x0_pred


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    check_cancelled: Callable[[], None] | None = None,
    progress: ProgressFn | None = None,
    **run_options: Any,
) -> Tensor:
    """Generate x_0 by running `diffusion` in reverse with the network `model_fn`; `run_options`
    (`steps`, `sampler`, `eta`, `x_T`, ...) are `SamplingRun`'s keyword arguments.

    `check_cancelled()` runs before each step and stops sampling by raising;
    `progress(step_index, steps, x0_pred)` runs after each step.
    """
    run = SamplingRun(diffusion, shape, generators, **run_options)
    while not run.done:
        if check_cancelled is not None:
            check_cancelled()
        x0_pred = run.advance(model_fn(*run.model_input()))
        if progress is not None:
            progress(run.step - 1, run.total, x0_pred)
    return run.x


def _validate_arguments(
    shape: tuple[int, ...], generators: Sequence[torch.Generator], sampler: str, eta: float, x_T: Tensor | None
) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per batch row: got {len(generators)} for batch size {shape[0]}")
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")


def _step_noise(
    generators: Sequence[torch.Generator], x_t: Tensor, sampler: str, eta: float, is_last_step: bool
) -> Tensor | None:
    """Fresh per-row noise for a step that uses it; None for deterministic steps and the last step."""
    stochastic = sampler == "ddpm" or eta > 0
    if not stochastic or is_last_step:
        return None
    return row_noise(generators, x_t.shape[1:], dtype=x_t.dtype, device=x_t.device)


def _impose_known(
    process: GaussianDiffusion, x: Tensor, known: tuple[Tensor, Tensor], generators: Sequence[torch.Generator], t_index: int
) -> Tensor:
    """Replace the kept region of x (now at respaced step t_index; -1 means clean) with the known
    content at that noise level."""
    x0_known, keep = known
    if t_index < 0:
        noised = x0_known
    else:
        t = torch.full((x.shape[0],), t_index, dtype=torch.long, device=x.device)
        noised = process.q_sample(x0_known, t, row_noise(generators, x.shape[1:], dtype=x.dtype, device=x.device))
    return keep * noised + (1 - keep) * x
