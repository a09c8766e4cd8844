"""Turning a conditional network into the sampler's model function: classifier-free guidance
over stacked conditionings, each batch row computed on its own."""

from __future__ import annotations

from collections.abc import Callable

import torch

from unclip.diffusion import classifier_free_guidance, two_condition_guidance

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
) -> ModelFn:
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
) -> ModelFn:
    """Like `guided`, with a scale per condition (`two_condition_guidance`): three passes a step."""

    net_fn = one_row_at_a_time(net_fn)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_both, out_first, out_uncond = stacked_passes(net_fn, x_t, t, [both, first_only, uncond])
        return two_condition_guidance(out_uncond, out_first, out_both, first_scale, second_scale)

    return model_fn
