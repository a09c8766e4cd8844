"""`unclip bench pipeline`: the same prompts, seeds and steps in-process and through the local
services (`unclip serve all` on loopback), with latency per request and their ratio."""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from unclip.client import Client
from unclip.launcher import LocalCluster, free_port
from unclip.local import LocalStages
from unclip.parameters import GenerationParameters
from unclip.pipeline import generate
from unclip.stage import Stage

BENCH_PROMPTS = [
    "a red circle in the top left corner",
    "a large blue square in the center on a white background",
    "a yellow triangle to the left of a purple circle",
    "a small green square at the bottom",
    "an orange circle above a blue triangle",
]


def _median_seconds(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def _generate_in_process(stages: LocalStages, params: GenerationParameters) -> list[Any]:
    return asyncio.run(generate(stages, params))


def run_pipeline_benchmark(num_prompts: int, seed: int, repeats: int, sampling: dict) -> int:
    prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(num_prompts)]
    sampling = {key: value for key, value in sampling.items() if value is not None}
    stages = LocalStages.load()
    local_rows = []
    for index, prompt in enumerate(prompts):
        params = GenerationParameters(prompt=prompt, seed=seed + index, **sampling)
        local_rows.append(_median_seconds(functools.partial(_generate_in_process, stages, params), repeats))

    # Stage ports picked free one by one; the gateway gets its own.
    cluster = LocalCluster(
        gateway_port=free_port(),
        stage_ports={stage: free_port() for stage in Stage},
        quiet=True,
    )
    remote_rows = []
    with cluster, Client(cluster.gateway_address, timeout=3600) as client:
        client.generate(prompts[0], seed=seed, size=32, prior_steps=1, decoder_steps=1)  # warm the connections
        for index, prompt in enumerate(prompts):
            call = functools.partial(client.generate, prompt, seed=seed + index, **sampling)
            remote_rows.append(_median_seconds(call, repeats))

    print(f"{'prompt':<58} {'in-process s':>12} {'services s':>11} {'ratio':>6} {'same pixels':>11}")
    for prompt, (local_s, local_images), (remote_s, remote_images) in zip(prompts, local_rows, remote_rows, strict=True):
        same = np.array_equal(local_images[0].pixels, np.asarray(remote_images[0].image))
        print(f"{prompt[:58]:<58} {local_s:>12.3f} {remote_s:>11.3f} {remote_s / local_s:>6.2f} {'yes' if same else 'NO':>11}")
    local_total = sum(row[0] for row in local_rows)
    remote_total = sum(row[0] for row in remote_rows)
    print(f"{'total':<58} {local_total:>12.3f} {remote_total:>11.3f} {remote_total / local_total:>6.2f}")
    print(f"settings: seed {seed}, repeats {repeats} (median), sampling {sampling or 'stage defaults'}")
    return 0
