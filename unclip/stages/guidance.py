"""Turning a conditional network's outputs into a sampler's model output, and evaluating the
network on many rows at a fixed compute batch.

`Guidance` says which conditionings a step needs (one pass without guidance, two for
classifier-free guidance, three with a scale per condition) and how their outputs combine.
`evaluate` runs the network on the rows of any number of such requests at once, always at the
same batch shape, which is what keeps a row's result independent of what it is batched with.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from unclip.diffusion import classifier_free_guidance, two_condition_guidance

NetworkInput = tuple[Tensor, Tensor, dict[str, Tensor]]
"""(x, original timesteps, conditioning tensors): one batch of rows for the network."""


@dataclass(frozen=True)
class Guidance:
    """The passes of one guided model output: each conditioning is evaluated on the same x_t
    (stacked as one batch, pass-major), and `combine` makes one output of their outputs."""

    conditionings: Sequence[dict[str, Tensor]]
    combine: Callable[[tuple[Tensor, ...]], Tensor]

    @functools.cached_property
    def stacked(self) -> dict[str, Tensor]:
        """The conditionings as one batch, pass-major (they stay the same every step)."""
        return {key: torch.cat([c[key] for c in self.conditionings]) for key in self.conditionings[0]}

    def inputs(self, x_t: Tensor, t: Tensor) -> NetworkInput:
        copies = len(self.conditionings)
        if copies == 1:
            return x_t, t, self.stacked
        return torch.cat([x_t] * copies), torch.cat([t] * copies), self.stacked

    def output(self, network_output: Tensor) -> Tensor:
        return self.combine(network_output.chunk(len(self.conditionings)))


def unguided(cond: dict[str, Tensor]) -> Guidance:
    return Guidance([cond], lambda outputs: outputs[0])


def _on_the_mean(
    combine: Callable[[tuple[Tensor, ...]], Tensor], learned_variance: bool
) -> Callable[[tuple[Tensor, ...]], Tensor]:
    """With a learned variance (the second half of the channels) only the mean half is guided;
    the variance is the fully conditioned pass's (the first), as Karlo samples."""
    if not learned_variance:
        return combine

    def on_the_mean(outputs: tuple[Tensor, ...]) -> Tensor:
        means = tuple(output.chunk(2, dim=1)[0] for output in outputs)
        return torch.cat([combine(means), outputs[0].chunk(2, dim=1)[1]], dim=1)

    return on_the_mean


def guided(cond: dict[str, Tensor], uncond: dict[str, Tensor], scale: float, *, learned_variance: bool = False) -> Guidance:
    """Classifier-free guidance; with scale 1 the unconditional pass cannot change the result
    and is skipped."""
    if scale == 1.0:
        return unguided(cond)
    combine = _on_the_mean(lambda outputs: classifier_free_guidance(outputs[0], outputs[1], scale), learned_variance)
    return Guidance([cond, uncond], combine)


def guided_two_conditions(
    both: dict[str, Tensor], first_only: dict[str, Tensor], uncond: dict[str, Tensor], first_scale: float, second_scale: float,
    *, learned_variance: bool = False,
) -> Guidance:  # fmt: skip
    """A scale per condition (`two_condition_guidance`): three passes a step."""
    combine = _on_the_mean(
        lambda outputs: two_condition_guidance(outputs[2], outputs[1], outputs[0], first_scale, second_scale), learned_variance
    )
    return Guidance([both, first_only, uncond], combine)


def signature(inputs: NetworkInput) -> Hashable:
    """What must agree for two inputs to share a network call: every tensor's row shape and dtype."""
    x, t, conditioning = inputs
    return tuple((key, tuple(v.shape[1:]), v.dtype) for key, v in (("x", x), ("t", t), *sorted(conditioning.items())))


def in_compute_batches(
    function: Callable[..., Tensor | tuple[Tensor, ...]], compute_batch: int, *tensors: Tensor
) -> tuple[tuple[Tensor, ...], int]:
    """`function(*tensors)` computed `compute_batch` rows at a time, every call at that batch
    shape: the last chunk is padded with copies of its first row, and the padding's outputs are
    dropped. Kernels pick their blocking by shape, not by content, so a row's output depends on
    its own content and the compute batch only: the same alone, in a request of many images, or
    next to other requests (tests/test_batching.py checks it). Compute batch 1 evaluates every
    row alone. Returns the outputs (a tuple even for one) and the calls made."""
    rows = tensors[0].shape[0]
    pieces: list[tuple[Tensor, ...]] = []
    for start in range(0, rows, compute_batch):
        end = min(start + compute_batch, rows)
        padding = compute_batch - (end - start)
        chunk = [t[start:end] for t in tensors]
        if padding:
            chunk = [torch.cat([t, t[:1].expand(padding, *t.shape[1:])]) for t in chunk]
        output = function(*chunk)
        pieces.append(tuple(o[: end - start] for o in (output if isinstance(output, tuple) else (output,))))
    if len(pieces) == 1:
        return pieces[0], 1
    return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True)), len(pieces)


def evaluate(network: Callable[..., Tensor], compute_batch: int, inputs: Sequence[NetworkInput]) -> tuple[list[Tensor], int]:
    """The network's output for each input (inputs of one `signature`), all their rows computed
    together `in_compute_batches`. Returns the outputs and the network calls made."""
    keys = list(inputs[0][2])

    def rows(tensors: list[Tensor]) -> Tensor:
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    x = rows([x for x, _, _ in inputs])
    t = rows([t for _, t, _ in inputs])
    conditioning = [rows([c[key] for _, _, c in inputs]) for key in keys]

    def call(x: Tensor, t: Tensor, *values: Tensor) -> Tensor:
        return network(x, t, **dict(zip(keys, values, strict=True)))

    (output,), calls = in_compute_batches(call, compute_batch, x, t, *conditioning)
    return list(output.split([x.shape[0] for x, _, _ in inputs])), calls
