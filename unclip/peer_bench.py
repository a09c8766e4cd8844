"""`unclip bench karlo`: unclip in-process against diffusers' UnCLIPPipeline on the same
diffusers-format weights, the same prompt, steps, guidance and images per request.

diffusers' `UnCLIPPipeline.from_pretrained` fails on `text_proj` in diffusers 0.42, so the
pipeline is assembled from its components one by one. Each side runs once untimed (warm-up),
then `runs` timed requests; the time inside each network is summed by forward hooks (diffusers)
and the engines' counters (unclip), which shows where the rest goes.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from unclip.stage import Stage
from unclip.stages.compute import on_compute_thread

NETWORKS = ("text_encoder", "prior", "decoder", "super_res_first", "super_res_last")
SCHEDULERS = ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")


def load_diffusers_pipeline(src: Path) -> Any:
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    classes = {
        "text_encoder": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer, "prior": PriorTransformer,
        "text_proj": UnCLIPTextProjModel, "decoder": UNet2DConditionModel, "super_res_first": UNet2DModel,
        "super_res_last": UNet2DModel, **dict.fromkeys(SCHEDULERS, UnCLIPScheduler),
    }  # fmt: skip
    return UnCLIPPipeline(**{name: cls.from_pretrained(src / name) for name, cls in classes.items()})


@contextmanager
def _timed_networks(pipe: Any) -> Iterator[dict[str, float]]:
    """Seconds spent in each of the pipeline's networks while the context is open."""
    seconds = dict.fromkeys(NETWORKS, 0.0)
    handles = []
    for name in NETWORKS:
        module = getattr(pipe, name)
        started: list[float] = []
        handles.append(module.register_forward_pre_hook(lambda *_, s=started: s.append(time.perf_counter())))

        def done(*_: Any, s: list[float] = started, n: str = name) -> None:
            seconds[n] += time.perf_counter() - s.pop()

        handles.append(module.register_forward_hook(done))
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def same_batches(n: int) -> dict[Stage, int]:
    """The rows diffusers puts in one network call for n images of one prompt: both guidance
    passes of every image (the prompt and the empty one for the text encoder)."""
    return {Stage.ENCODER: 1, Stage.PRIOR: 2 * n, Stage.DECODER: 2 * n, Stage.UPSAMPLER: n}


def compare(
    src: Path, weights: Path | None, *, prompt: str, n: int, steps: tuple[int, int, int], runs: int, seed: int,
    compute_batches: dict[Stage, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Images per second and network seconds per stage for both, as a dict. unclip evaluates its
    networks at `compute_batches` (default: `same_batches`, the batch diffusers uses). The two
    take turns, run by run, so that a machine getting slower or faster mid-way weighs on both;
    diffusers runs on the thread where unclip's networks run, so both have one OpenMP team."""
    from unclip.importers.diffusers_format import import_pipeline
    from unclip.local import LocalStages
    from unclip.parameters import GenerationParameters
    from unclip.pipeline import generate
    from unclip.stages.batcher import BatchSettings

    batches = compute_batches or same_batches(n)
    prior, decoder, super_res = steps
    params = GenerationParameters(
        prompt=prompt, n=n, seed=seed, prior_steps=prior, decoder_steps=decoder, upsampler_steps=super_res,
        prior_candidates=1,
    )  # fmt: skip
    call = dict(
        num_images_per_prompt=n, prior_num_inference_steps=prior, decoder_num_inference_steps=decoder,
        super_res_num_inference_steps=super_res, output_type="np",
    )  # fmt: skip
    pipe = on_compute_thread(load_diffusers_pipeline, src)
    pipe.set_progress_bar_config(disable=True)

    def run_diffusers() -> float:
        started = time.perf_counter()
        pipe(prompt, generator=torch.Generator().manual_seed(seed), **call)
        return time.perf_counter() - started

    def run_unclip() -> float:
        started = time.perf_counter()
        asyncio.run(generate(stages, params))
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory() as scratch:
        weights = weights or on_compute_thread(import_pipeline, src, Path(scratch) / "weights")
        stages = LocalStages.load(weights, settings={stage: BatchSettings(compute_batch=b) for stage, b in batches.items()})
        try:
            run_unclip(), on_compute_thread(run_diffusers)  # warm-up
            before = {stage: sum(e.stats.network_seconds for e in engines) for stage, engines in stages.engines.items()}
            ours = theirs = 0.0
            with _timed_networks(pipe) as theirs_network:
                for _ in range(runs):
                    ours += run_unclip()
                    theirs += on_compute_thread(run_diffusers)
            network = {
                stage.value: sum(e.stats.network_seconds for e in engines) - before[stage]
                for stage, engines in stages.engines.items()
            }
        finally:
            stages.shutdown()
    images = n * runs
    return {
        "settings": {
            "src": str(src),
            "prompt": prompt,
            "n": n,
            "steps": list(steps),
            "runs": runs,
            "threads": torch.get_num_threads(),
            "compute_batch": {stage.value: b for stage, b in batches.items()},
        },
        "unclip": {"seconds": ours, "images_per_second": images / ours, "network_seconds": network},
        "diffusers": {"seconds": theirs, "images_per_second": images / theirs, "network_seconds": theirs_network},
        "ratio": (images / ours) / (images / theirs),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'':10} {'img/s':>8} {'seconds':>8}   network seconds"]
    for side in ("unclip", "diffusers"):
        figures = report[side]
        network = ", ".join(f"{k} {v:.2f}" for k, v in figures["network_seconds"].items())
        inside = sum(figures["network_seconds"].values())
        lines.append(
            f"{side:10} {figures['images_per_second']:8.3f} {figures['seconds']:8.2f}   {network} "
            f"(outside networks: {figures['seconds'] - inside:.2f})"
        )
    lines.append(f"unclip / diffusers: {report['ratio']:.2f}x (unclip's compute batches: {report['settings']['compute_batch']})")
    return "\n".join(lines)


def run_peer_benchmark(
    src: Path, weights: Path | None, *, n: int, steps: tuple[int, int, int], runs: int, out: Path,
    compute_batches: dict[Stage, int] | None = None,
) -> int:  # fmt: skip
    prompt = "a red circle in the top left corner"
    report = compare(src, weights, prompt=prompt, n=n, steps=steps, runs=runs, seed=0, compute_batches=compute_batches)
    print(format_report(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0
