"""Ancestral (DDPM) and DDIM sampling loops, with per-row random streams.

Every batch row draws all of its randomness from its own torch.Generator, so a row's result is
the same whether it is sampled alone or batched with any other rows.
"""

from collections.abc import Callable, Sequence

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


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    denoised_fn: DenoisedFn | None = None,
    check_cancelled: Callable[[], None] | None = None,
    progress: ProgressFn | None = None,
    x_T: Tensor | None = None,
    device: torch.device | str | None = None,
    known: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Generate x_0 by running `diffusion`, respaced to `steps` steps, in reverse.

    x_T (if not given) and every step's noise come from `row_noise(generators, ...)`. DDPM draws
    noise on every step but the last; DDIM only when eta > 0 (eta is ignored by DDPM).
    `denoised_fn` post-processes each predicted x_0 (e.g. clamping), and eps is re-derived from
    the result so the step stays consistent with it. `check_cancelled()` runs before each step and
    stops sampling by raising; `progress(step_index, steps, x0_pred)` runs after each step.
    `device` (default: x_T's, else the first generator's) is where sampling happens.

    `known = (x0_known, keep)` inpaints: where `keep` is 1 the result is x0_known, and at every
    step that region of x_t is replaced by x0_known noised to the same level (per-row noise), so
    the model fills in the rest consistently with it.
    """
    shape = tuple(shape)
    _validate_arguments(shape, generators, sampler, eta, x_T)
    process = respace_to_steps(diffusion, steps)
    x = row_noise(generators, shape[1:], device=device) if x_T is None else x_T.to(device or x_T.device)
    if known is not None:
        x = _impose_known(process, x, known, generators, process.num_timesteps - 1)

    for step_index, t_index in enumerate(reversed(range(process.num_timesteps))):
        if check_cancelled is not None:
            check_cancelled()
        t = torch.full((shape[0],), t_index, dtype=torch.long, device=x.device)
        x0_pred, eps_pred = _predict(process, model_fn, x, t, denoised_fn)
        noise = _step_noise(generators, x, sampler, eta, is_last_step=t_index == 0)
        if sampler == "ddpm":
            x = process.ddpm_step(x0_pred, x, t, noise)
        else:
            x = process.ddim_step(x0_pred, eps_pred, x, t, eta, noise)
        if known is not None:
            x = _impose_known(process, x, known, generators, t_index - 1)
        if progress is not None:
            progress(step_index, process.num_timesteps, x0_pred)
    return x


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


def _predict(
    process: GaussianDiffusion, model_fn: ModelFn, x_t: Tensor, t: Tensor, denoised_fn: DenoisedFn | None
) -> tuple[Tensor, Tensor]:
    """(x0, eps) predicted at respaced step t; the network sees the original timesteps."""
    x0_pred, eps_pred = process.split_model_output(model_fn(x_t, process.model_timesteps(t)), x_t, t)
    if denoised_fn is not None:
        x0_pred = denoised_fn(x0_pred)
        eps_pred = process.predict_eps_from_x0(x_t, t, x0_pred)
    return x0_pred, eps_pred


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
