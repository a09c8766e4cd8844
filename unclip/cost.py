"""What a request costs, defined once: the gateway refuses requests above its cap before any work.

The unit is one denoising step of one image row: a prior candidate, a decoder image or an
upsampler image. A request's cost is

    prior samples x prior_candidates x prior steps
    + images x (decoder steps + the steps of each upsampler its size needs)

where images are `n` (generations, edits, variations) or the frames (interpolations, text diffs),
and prior samples are `n` for generations and edits, 2 for interpolations between prompts (their
two ends), 0 otherwise. Steps a request leaves unset count as the model's default
(`PipelineInfo.default_steps`, from each stage's ModelInfo). Network evaluations per step
(guidance copies) are the model's business and not counted.

Torch-free and grpc-free, like `unclip.parameters`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unclip.errors import InvalidArgument
from unclip.parameters import GenerationParameters
from unclip.stage import Stage

if TYPE_CHECKING:
    from unclip.pipeline import PipelineInfo

# About 25 times an 8-image request at the shipped models' defaults (8 x (2 x 32 + 25 + 10) = 792),
# and 8 images at DALL-E 2's own settings (2 x 64 prior, 250 decoder, 27 + 15 upsampler steps)
# fit 5 times over; a caller asking for 1000 steps everywhere on 8 images does not.
DEFAULT_MAX_REQUEST_COST = 20_000


def request_cost(params: GenerationParameters, info: PipelineInfo, *, images: int, prior_samples: int) -> int:
    """The cost of a request (module docstring) on the models `info` describes. An unknown
    size counts every upsampler (the request is refused for its size anyway)."""
    sizes = info.output_sizes()
    size = sizes[-1] if params.size is None else params.size
    upsamplers = sizes.index(size) if size in sizes else len(sizes) - 1

    prior = prior_samples * params.prior_candidates * info.steps(params.prior_steps, Stage.PRIOR)
    per_image = info.steps(params.decoder_steps, Stage.DECODER)
    per_image += sum(info.steps(params.upsampler_steps, Stage.UPSAMPLER, i) for i in range(upsamplers))
    return prior + images * per_image


def check_cost(cost: int, cap: int | None) -> None:
    """InvalidArgument naming the cap and the cost when `cost` is over `cap` (None: no cap)."""
    if cap is not None and cost > cap:
        raise InvalidArgument(
            f"request cost {cost} exceeds the gateway's limit of {cap} (cost = images x (decoder steps + upsampler "
            "steps) + prior samples x prior_candidates x prior steps); ask for fewer images, steps or candidates"
        )
