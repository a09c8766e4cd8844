"""`unclip bench load`: a bounded load generator against a running gateway, through the SDK.

C clients send N generate requests in all, back to back (closed loop), or started at R per
second (open loop: a request waits only for a free client, so a slow server shows up as
latency and as errors, not as a lower offered rate). It stops by itself after the N answers
and reports throughput, latency percentiles of the answered requests, and the failures by
status code. Torch-free: it needs only the SDK.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PERCENTILES = (50, 95, 99)


@dataclass
class LoadReport:
    server: str
    concurrency: int
    requests: int
    rate: float | None
    parameters: dict[str, Any]
    seconds: float = 0.0
    answered: int = 0
    images: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # status code -> count
    latencies_s: list[float] = field(default_factory=list)  # answered requests, in completion order
    # The object store's view of the answered requests, when checked (`check_store`).
    stored: dict[str, Any] | None = None
    # request id -> sha256 of each PNG answered, for `check_store`; not reported.
    answers: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def percentile(self, p: int) -> float | None:
        """The p-th percentile latency of the answered requests (nearest rank); None if none."""
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[max(0, -(-p * len(ordered) // 100) - 1)]

    def as_dict(self) -> dict[str, Any]:
        figures = asdict(self)
        del figures["answers"]
        return {
            **figures,
            "images_per_second": self.images_per_second,
            "latency_s": {f"p{p}": self.percentile(p) for p in PERCENTILES},
        }

    def table(self) -> str:
        rate = "closed loop" if self.rate is None else f"{self.rate:g} req/s offered"
        latency = "  ".join(
            f"p{p} {value:.2f} s" if (value := self.percentile(p)) is not None else f"p{p} -" for p in PERCENTILES
        )
        errors = ", ".join(f"{code} {count}" for code, count in sorted(self.errors.items())) or "none"
        lines = [
            f"server {self.server}: {self.requests} requests, concurrency {self.concurrency}, {rate}",
            f"answered   {self.answered} of {self.requests} in {self.seconds:.2f} s",
            f"throughput {self.images_per_second:.3f} img/s, {self.answered / self.seconds if self.seconds else 0:.3f} req/s",
            f"latency    {latency}",
            f"errors     {errors}",
        ]
        if self.stored is not None:
            lost = len(self.stored["missing"]) + len(self.stored["different"])
            lines.append(
                f"stored     {self.stored['complete']} of {self.stored['checked']} answered requests complete in "
                f"{self.stored['where']} ({lost} missing or different)"
            )
        return "\n".join(lines)


async def run_load(
    server: str,
    *,
    concurrency: int,
    requests: int,
    rate: float | None = None,
    prompt: str = "a red circle in the top left corner",
    timeout: float = 600.0,
    application: str | None = None,
    credentials: Any = None,
    api_key: str | None = None,
    **parameters: Any,
) -> LoadReport:
    """Send `requests` generate calls from `concurrency` clients and measure them; `application`
    names the Ray Serve application behind a Ray gRPC proxy ("gateway"); `credentials`
    (grpc.ChannelCredentials, e.g. `unclip.tls.channel_credentials(ca=...)`): a gateway that
    serves TLS, None for plaintext; `api_key`: the key a gateway with API keys on wants."""
    from unclip.client import AsyncClient, UnclipError

    if concurrency < 1 or requests < 1:
        raise ValueError("concurrency and requests must be at least 1")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be positive")
    report = LoadReport(server, concurrency, requests, rate, dict(parameters, prompt=prompt))
    clients = asyncio.Semaphore(concurrency)
    started = time.perf_counter()

    async def one(index: int, client: AsyncClient) -> None:
        if rate is not None:
            await asyncio.sleep(max(0.0, started + index / rate - time.perf_counter()))
        async with clients:
            sent = time.perf_counter()
            try:
                # Seeds differ per request: a cache of identical requests would measure nothing.
                images = await client.generate(prompt, seed=index, timeout=timeout, **parameters)
            except UnclipError as error:
                report.errors[error.status_name] = report.errors.get(error.status_name, 0) + 1
                return
            report.latencies_s.append(time.perf_counter() - sent)
            report.answered += 1
            report.images += len(images)
            if images and images[0].request_id:
                report.answers[images[0].request_id] = [hashlib.sha256(image.png).hexdigest() for image in images]

    async with AsyncClient(server, application=application, credentials=credentials, api_key=api_key) as client:
        await asyncio.gather(*(one(i, client) for i in range(requests)))
    report.seconds = time.perf_counter() - started
    return report


async def check_store(report: LoadReport, store: Any) -> None:
    """Read back every answered request's result from the gateway's object store (a
    `unclip.storage.ResultStore` on the same bucket) and record in `report.stored` which are
    complete: a record, and the very PNGs the client got. Needs the server extra (minio)."""
    missing: list[str] = []
    different: list[str] = []
    for request_id, digests in report.answers.items():
        stored = await store.load(request_id)
        if stored is None:
            missing.append(request_id)
        elif [hashlib.sha256(png).hexdigest() for png in stored.images] != digests:
            different.append(request_id)
    report.stored = {
        "where": store.config.where,
        "checked": len(report.answers),
        "complete": len(report.answers) - len(missing) - len(different),
        "missing": missing,
        "different": different,
    }


def run_load_benchmark(
    server: str, concurrency: int, requests: int, rate: float | None, parameters: dict[str, Any], out: Path,
    application: str | None = None, check_stored: bool = False, credentials: Any = None, api_key: str | None = None,
) -> int:  # fmt: skip
    store = None
    if check_stored:
        from unclip.storage import ResultStore, StorageConfig

        config = StorageConfig.from_env()
        if config is None:
            raise SystemExit("unclip bench load: --check-store reads the gateway's store from UNCLIP_S3_*; none is set")
        store = ResultStore(config)
    report = asyncio.run(
        run_load(
            server, concurrency=concurrency, requests=requests, rate=rate, application=application,
            credentials=credentials, api_key=api_key, **parameters,
        )
    )  # fmt: skip
    if store is not None:
        asyncio.run(check_store(report, store))
    print(report.table())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    print(f"JSON: {out}")
    lost = report.stored is not None and report.stored["complete"] < report.stored["checked"]
    return 0 if report.answered and not lost else 1
