"""Noise schedules: the per-step variances beta_t of the forward (noising) process, as float64."""

import math
from collections.abc import Callable

import torch
from torch import Tensor


def linear_betas(num_timesteps: int) -> Tensor:
    """Ho et al.'s linear schedule, 1e-4 .. 0.02 for 1000 steps.

    The endpoints scale with 1000 / num_timesteps so that shorter schedules destroy the signal
    about as completely as the 1000-step one does.
    """
    if num_timesteps <= 20:
        raise ValueError(f"the linear schedule needs more than 20 steps (its last beta would reach 1), got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule, defined through alphas_cumprod(t) = f(t) / f(0).

    The offset s keeps beta from being vanishingly small near t = 0; max_beta caps the last
    steps, where f(t) -> 0 would otherwise push beta to 1 (a singular step).
    """

    def f(t: Tensor) -> Tensor:
        return torch.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    # Each step's alpha is the ratio of consecutive alphas_cumprod, so the 1 / f(0) cancels.
    f_t = f(torch.arange(num_timesteps + 1, dtype=torch.float64))
    betas = 1.0 - f_t[1:] / f_t[:-1]
    return betas.clamp(max=max_beta)


def squaredcos_cap_v2_betas(num_timesteps: int) -> Tensor:
    """The cosine schedule as diffusers' UnCLIPScheduler holds it: betas rounded to float32 (a
    process with float32 arithmetic then takes their cumulative product as the scheduler does)."""
    return cosine_betas(num_timesteps).float().double()


SCHEDULES: dict[str, Callable[[int], Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "squaredcos_cap_v2": squaredcos_cap_v2_betas,  # Karlo's (diffusers' name)
}


def make_betas(name: str, num_timesteps: int) -> Tensor:
    """The named schedule with num_timesteps steps."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return SCHEDULES[name](num_timesteps)
