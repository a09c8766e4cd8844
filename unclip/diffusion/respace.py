"""Respacing: sampling with a subsequence of a trained process's timesteps (Nichol & Dhariwal 2021)."""

import threading
from collections.abc import Iterable
from weakref import WeakKeyDictionary

import torch

from unclip.diffusion.gaussian import ARITHMETICS, GaussianDiffusion

SPACINGS = ("even", "karlo")


def space_timesteps(num_timesteps: int, steps: int, spacing: str = "even") -> list[int]:
    """`steps` evenly spaced timesteps of a num_timesteps process, ascending.

    With steps > 1 both 0 and num_timesteps - 1 are included. A single step is the last timestep:
    sampling must start from (nearly) pure noise. i * last / (steps - 1) is rounded to the
    nearest integer, exactly with halves up ("even"), or as Karlo's UnCLIPScheduler computes it
    ("karlo": i times the float ratio, halves to even), so imported weights visit exactly the
    timesteps they were sampled at. The spacing is >= 1 either way: no duplicates.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in the range [1, {num_timesteps}], got {steps}")
    last = num_timesteps - 1
    if steps == 1:
        return [last]
    intervals = steps - 1
    if spacing == "karlo":
        ratio = last / intervals
        return [round(i * ratio) for i in range(steps)]
    return [(i * last + intervals // 2) // intervals for i in range(steps)]


def respace(base: GaussianDiffusion, use_timesteps: Iterable[int]) -> GaussianDiffusion:
    """The process that visits only `use_timesteps` of `base` and has the same marginals there.

    Jumping from kept timestep t_{i-1} straight to t_i must reproduce q(x_{t_i} | x_0), so the new
    step's alpha is the ratio acp[t_i] / acp[t_{i-1}] of the base's cumulative products.
    """
    kept = sorted({int(t) for t in use_timesteps})
    if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
        raise ValueError(f"use_timesteps must be a non-empty subset of [0, {base.num_timesteps - 1}]")
    index = torch.tensor(kept)
    dtype = ARITHMETICS[base.arithmetic]
    alphas_cumprod = base.alphas_cumprod[index].to(dtype)
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    betas = 1.0 - alphas_cumprod / previous
    # A step to the adjacent timestep is the base's own step: its beta as it is, which the
    # ratio above only approximates in finite precision (UnCLIPScheduler does the same).
    adjacent = index - torch.cat([index.new_full((1,), -1), index[:-1]]) == 1
    betas = torch.where(adjacent, base.betas[index].to(dtype), betas)
    # Compose maps so that respacing an already respaced process still points at original timesteps.
    return GaussianDiffusion(
        betas, base.parameterization, timestep_map=base.timestep_map[index], variance=base.variance,
        arithmetic=base.arithmetic, alphas_cumprod=alphas_cumprod,
    )  # fmt: skip


_respaced_cache: "WeakKeyDictionary[GaussianDiffusion, dict[tuple[int, str], GaussianDiffusion]]" = WeakKeyDictionary()
_respaced_cache_lock = threading.Lock()


def respace_to_steps(base: GaussianDiffusion, steps: int, spacing: str = "even") -> GaussianDiffusion:
    """`base` respaced to `steps` evenly spaced steps (`space_timesteps`), computed once per
    (base, steps, spacing)."""
    with _respaced_cache_lock:
        by_steps = _respaced_cache.setdefault(base, {})
        if (steps, spacing) not in by_steps:
            by_steps[steps, spacing] = respace(base, space_timesteps(base.num_timesteps, steps, spacing))
        return by_steps[steps, spacing]
