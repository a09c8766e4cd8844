"""`unclip bench throughput`: images per second, latency and memory under concurrent load, row by
row against a compute batch, in-process, through `serve all` and through Ray Serve.

For each mode and each compute batch (row by row always first), for each concurrency c, c
workers send requests back to back until `requests` have been answered: whole generations
(`--load pipeline`), or one stage's calls alone (`--load decoder`, `--load upsampler`).
Reported per point: images per second, p50 and p95 latency, the peak resident memory of each stage's process while the
point ran (sampled from /proc every 50 ms) and, where the stages' counters can be read
(in-process and Ray Serve), the seconds each stage spent in its network: which stage limits
the throughput. Printed as a table, written as JSON.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unclip.calls import DecodeCall, EncodeTextCall, SampleCall, StageCall, UpsampleCall
from unclip.parameters import GenerationParameters
from unclip.stage import GATEWAY, Stage
from unclip.stages.batcher import BatchSettings, compute_batches

MODES = ("inprocess", "services", "ray")
LOADS = ("pipeline", "decoder", "upsampler")
PROMPTS = [
    "a red circle in the top left corner",
    "a large blue square in the center on a white background",
    "a yellow triangle to the left of a purple circle",
    "a small green square at the bottom",
]


@dataclass
class Point:
    mode: str
    load: str
    compute_batch: str
    concurrency: int
    requests: int
    seconds: float
    images_per_second: float
    p50_s: float
    p95_s: float
    peak_rss_mb: dict[str, float]
    network_s: dict[str, float]  # per stage; empty where the counters cannot be read (services)


class MemoryPeaks:
    """The highest VmRSS of each named process while the `with` block runs."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.peaks = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for name, pid in self.pids.items():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmRSS:"):
                        self.peaks[name] = max(self.peaks[name], int(line.split()[1]) / 1024)
            if self._stop.wait(0.05):
                return

    def __enter__(self) -> MemoryPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(send: Callable[[int], int], concurrency: int, requests: int) -> tuple[float, list[float], int]:
    """(wall seconds, latencies, images) of `requests` calls of `send(index) -> images`, made
    by `concurrency` workers back to back."""
    latencies: list[float] = []
    images = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        nonlocal images
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            started = time.perf_counter()
            count = send(index)
            with lock:
                latencies.append(time.perf_counter() - started)
                images += count

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return time.perf_counter() - started, latencies, images


class Target:
    """One mode at one compute batch: `send(load, index)` and the processes to watch."""

    pids: dict[str, int]

    def send(self, load: str, index: int) -> int:
        raise NotImplementedError

    def network_seconds(self) -> dict[str, float]:
        """Each stage's seconds in its network so far (a counter); empty where unknown."""
        return {}


class InProcess(Target):
    def __init__(self, settings: dict[Stage, BatchSettings], parameters: dict[str, Any]):
        from unclip.local import LocalStages

        self.stages = LocalStages.load(settings=settings)
        self.parameters = parameters
        self.pids = {"inprocess": os.getpid()}
        self.calls = _stage_calls(parameters)

    def send(self, load: str, index: int) -> int:
        from unclip.pipeline import generate

        if load == "pipeline":
            params = GenerationParameters(prompt=PROMPTS[index % len(PROMPTS)], seed=index, **self.parameters)
            return len(asyncio.run(generate(self.stages, params)))
        calls = self.calls[load]
        asyncio.run(self.stages.run(calls[index % len(calls)], deadline=None))
        return 1

    def network_seconds(self) -> dict[str, float]:
        return {stage.value: sum(e.stats.network_seconds for e in engines) for stage, engines in self.stages.engines.items()}

    def close(self) -> None:
        self.stages.shutdown()


class OverGrpc(Target):
    """The gateway and the stages reached over gRPC: `serve all`'s processes (an address per
    stage) or Ray Serve's proxy (one address; `application` metadata picks the app)."""

    def __init__(self, gateway: str, stages: dict[Stage, str], parameters: dict[str, Any], application: str | None):
        import grpc

        from unclip.calls import SERVICE_NAMES, grpc_module
        from unclip.client import Client
        from unclip.transport import GRPC_OPTIONS

        self.client = Client(gateway, timeout=3600, application=application)
        self.channels = {stage: grpc.insecure_channel(address, options=GRPC_OPTIONS) for stage, address in stages.items()}
        self.stubs = {
            stage: getattr(grpc_module(stage), f"{SERVICE_NAMES[stage]}Stub")(channel) for stage, channel in self.channels.items()
        }
        self.routed = application is not None
        self.parameters = parameters
        self.calls = _stage_calls(parameters)

    def send(self, load: str, index: int) -> int:
        if load == "pipeline":
            return len(self.client.generate(PROMPTS[index % len(PROMPTS)], seed=index, **self.parameters))
        calls = self.calls[load]
        call = calls[index % len(calls)]
        metadata = (("application", call.STAGE.value),) if self.routed else None
        getattr(self.stubs[call.STAGE], call.METHOD)(call.to_proto(), timeout=3600, metadata=metadata)
        return 1

    def close(self) -> None:
        self.client.close()
        for channel in self.channels.values():
            channel.close()


class OverRay(OverGrpc):
    """Ray Serve's proxy, with each stage replica's counters read through its Serve handle."""

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        from ray import serve

        return {stage.value: serve.get_app_handle(stage.value).stats.remote().result(timeout_s=60) for stage in Stage}

    def network_seconds(self) -> dict[str, float]:
        return {stage: replica["network_seconds"] for stage, replica in self.replica_stats().items()}


@functools.cache
def _cached_stage_calls(parameters: str) -> dict[str, list[StageCall[Any]]]:
    from unclip.local import LocalStages

    settings = json.loads(parameters)
    stages = LocalStages.load()
    try:
        text = asyncio.run(stages.run(EncodeTextCall(PROMPTS), deadline=None))
        seeds = list(range(len(PROMPTS)))
        prior = GenerationParameters(**{k: v for k, v in settings.items() if k in {"sampler", "prior_steps"}}).stage_settings(
            Stage.PRIOR
        )
        embeddings = asyncio.run(
            stages.run(SampleCall(text.embeddings, text.encodings, text.mask, seeds=seeds, **prior), deadline=None)
        )
        params = GenerationParameters(**settings)
        decode = [
            DecodeCall(embeddings[i : i + 1], seeds=[i], text_encodings=text.encodings[i : i + 1], text_mask=text.mask[i : i + 1],
                       **params.stage_settings(Stage.DECODER))
            for i in seeds
        ]  # fmt: skip
        images = [asyncio.run(stages.run(call, deadline=None)) for call in decode]
        upsample: list[StageCall[Any]] = [
            UpsampleCall(images[i], seeds=[i], **params.stage_settings(Stage.UPSAMPLER)) for i in seeds
        ]
    finally:
        stages.shutdown()
    return {"decoder": list(decode), "upsampler": upsample}


def _stage_calls(parameters: dict[str, Any]) -> dict[str, list[StageCall[Any]]]:
    """For each stage load, one call per prompt with one image, its inputs computed once in-process
    row by row from the earlier stages (prior, then decoder) and sent as they are by every mode."""
    return _cached_stage_calls(json.dumps(parameters, sort_keys=True))


@contextmanager
def target(mode: str, spec: str, parameters: dict[str, Any], grouping: dict[str, Any]) -> Iterator[Target]:
    settings = {stage: BatchSettings(compute_batch=n, **grouping) for stage, n in compute_batches(spec).items()}
    if mode == "inprocess":
        local = InProcess(settings, parameters)
        try:
            yield local
        finally:
            local.close()
    elif mode == "services":
        from unclip.launcher import LocalCluster, free_port

        cluster = LocalCluster(
            gateway_port=free_port(), stage_ports={stage: free_port() for stage in Stage}, settings=settings, quiet=True
        )
        with cluster:
            addresses = {Stage(service.name): service.address for service in cluster.services if service.name != GATEWAY}
            remote = OverGrpc(cluster.gateway_address, addresses, parameters, None)
            remote.pids = {service.name: service.process.pid for service in cluster.services if service.process is not None}
            try:
                yield remote
            finally:
                remote.close()
    else:
        yield from _ray_target(settings, parameters)


def _ray_target(settings: dict[Stage, BatchSettings], parameters: dict[str, Any]) -> Iterator[Target]:
    import ray
    from ray import serve

    from unclip.launcher import free_port
    from unclip.ray_apps import deploy, grpc_proxy_address, load_config

    config = load_config()
    config["grpc_options"]["port"], config["http_options"]["port"] = free_port(), free_port()
    for app in config["applications"]:
        if app["name"] != GATEWAY:
            batching = settings[Stage(app["name"])]
            app["args"] |= {
                "compute_batch": batching.compute_batch,
                "max_batch_size": batching.max_batch_size,
                "batch_wait_timeout_s": batching.batch_wait_s,
                "allow_external_calls": True,  # the stage loads call each stage through the proxy
            }
        for deployment in app["deployments"]:
            deployment["autoscaling_config"]["max_replicas"] = 1  # one replica per stage: batching, not scaling, is measured
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the table, not deployment chatter
    ray.init(address="local", include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False, logging_level=logging.WARNING)
    try:
        address = grpc_proxy_address(deploy(config))
        remote = OverRay(address, dict.fromkeys(Stage, address), parameters, GATEWAY)
        remote.pids = {stage: replica["pid"] for stage, replica in remote.replica_stats().items()}
        try:
            yield remote
        finally:
            remote.close()
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_throughput_benchmark(
    modes: list[str], loads: list[str], specs: list[str], concurrencies: list[int], requests: int, parameters: dict[str, Any],
    grouping: dict[str, Any], json_path: Path,
) -> int:  # fmt: skip
    """Measure every (mode, compute batch, load, concurrency); print the table, write JSON."""
    specs = ["1", *[spec for spec in specs if spec != "1"]]  # row by row first, as the baseline
    points: list[Point] = []
    for mode in modes:
        for spec in specs:
            with target(mode, spec, parameters, grouping) as measured:
                for load in loads:
                    measured.send(load, 0)  # warm: first calls load kernels and connections
                    for concurrency in concurrencies:
                        count = max(requests, concurrency)
                        busy = measured.network_seconds()
                        with MemoryPeaks(measured.pids) as memory:
                            seconds, latencies, images = measure(functools.partial(measured.send, load), concurrency, count)
                        busy = {stage: t - busy[stage] for stage, t in measured.network_seconds().items()}
                        point = Point(
                            mode, load, spec, concurrency, count, round(seconds, 3), round(images / seconds, 3),
                            round(statistics.median(latencies), 3), round(float(np.percentile(latencies, 95)), 3),
                            {name: round(mb, 1) for name, mb in memory.peaks.items()},
                            {stage: round(t, 2) for stage, t in busy.items()},
                        )  # fmt: skip
                        points.append(point)
                        print(_row(point, points), flush=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps(
            {"settings": {"parameters": parameters, "grouping": grouping}, "points": [asdict(p) for p in points]}, indent=2
        )
        + "\n"
    )
    print(f"JSON: {json_path}")
    return 0


def _row(point: Point, points: list[Point]) -> str:
    """A table row; the speedup is against row by row at the same mode, load and concurrency."""
    base = next(
        p for p in points if (p.mode, p.load, p.concurrency, p.compute_batch) == (point.mode, point.load, point.concurrency, "1")
    )
    if len(points) == 1:
        header = f"{'mode':<10} {'load':<9} {'compute batch':<22} {'conc':>4} {'img/s':>7} {'x row':>6} {'p50 s':>7} {'p95 s':>7}"
        print(f"{header}  network s per stage | peak RSS MB")
    busy = ", ".join(f"{stage} {t:.1f}" for stage, t in point.network_s.items()) or "-"
    memory = ", ".join(f"{name} {mb:.0f}" for name, mb in point.peak_rss_mb.items())
    return (
        f"{point.mode:<10} {point.load:<9} {point.compute_batch:<22} {point.concurrency:>4} {point.images_per_second:>7.2f} "
        f"{point.images_per_second / base.images_per_second:>6.2f} {point.p50_s:>7.2f} {point.p95_s:>7.2f}  {busy} | {memory}"
    )
