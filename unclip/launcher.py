"""Start the four stage services and the gateway as separate processes on one host.

Used by `unclip serve all`, `unclip bench pipeline` and the end-to-end tests. Each service is
`python -m unclip serve <stage>`; the launcher waits for health, and on stop sends SIGTERM
(graceful gRPC shutdown) and kills whatever has not exited in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from unclip.stage import DEFAULT_GATEWAY_PORT, GATEWAY, Stage
from unclip.stages.batcher import BatchSettings

STOP_TIMEOUT_SECONDS = 15.0


def shared_cores_environment() -> dict[str, str]:
    """The environment of compute processes that share one machine's cores. An idle OpenMP
    thread (libgomp, as in torch's wheels) spins 300,000 times by default before it sleeps;
    with several processes computing at once, spinning threads take the cores from the ones
    that compute. `bench load` against `serve all` (one warm-up request first), in img/s at
    concurrency 1 and 4: default 0.36 and 0.05, GOMP_SPINCOUNT=1000 0.34 and 0.37,
    OMP_WAIT_POLICY=PASSIVE 0.25 and 0.44. 1000 keeps a lone request fast; a policy or
    spin count the user set is kept."""
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", "1000")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_health(address: str, timeout: float = 2.0) -> bool:
    """True when the server at `address` reports SERVING for its overall health."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class ServiceProcess:
    name: str
    address: str
    args: list[str]
    process: subprocess.Popen | None = field(default=None, repr=False)

    def exited(self) -> bool:
        """Started, and no longer running."""
        return self.process is not None and self.process.poll() is not None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode


@dataclass
class LocalCluster:
    """The five services on `host`; `weights` is a directory with clip/ prior/ decoder/ upsampler/."""

    host: str = "127.0.0.1"
    gateway_port: int = DEFAULT_GATEWAY_PORT
    stage_ports: dict[Stage, int] | None = None  # default: gateway_port + 1 .. + 4, as Stage.port
    http_port: int = 0  # the gateway's OpenAI-compatible HTTP API; 0: off
    # The stages' Prometheus metrics on metrics_port + 1 .. + 4, as Stage.port_next_to; 0: off
    # (the gateway's are at /metrics on its HTTP port).
    metrics_port: int = 0
    weights: Path | None = None
    settings: dict[Stage, BatchSettings] | None = None  # each stage's compute batch and batching
    quiet: bool = False
    log_format: str = "text"  # each service's (unclip.logs)
    services: list[ServiceProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = self.stage_ports or {stage: stage.port_next_to(self.gateway_port) for stage in Stage}
        addresses = {stage: f"{self.host}:{ports[stage]}" for stage in Stage}
        for stage in Stage:
            args = ["serve", stage.value, "--host", self.host, "--port", str(ports[stage]), "--log-format", self.log_format]
            if self.metrics_port:
                args += ["--metrics-port", str(stage.port_next_to(self.metrics_port))]
            if self.weights is not None:
                args += ["--checkpoint", str(Path(self.weights) / stage.kind)]
            if self.settings is not None and stage in self.settings:
                batching = self.settings[stage]
                args += ["--compute-batch", str(batching.compute_batch), "--max-batch-size", str(batching.max_batch_size)]
                args += ["--batch-wait", str(batching.batch_wait_s), "--max-pending", str(batching.max_pending)]
            self.services.append(ServiceProcess(stage.value, addresses[stage], args))
        gateway_args = [
            "serve",
            GATEWAY,
            "--host",
            self.host,
            "--port",
            str(self.gateway_port),
            "--http-port",
            str(self.http_port),
            "--log-format",
            self.log_format,
        ]
        gateway_args += [arg for stage in Stage for arg in (f"--{stage.value}", addresses[stage])]
        self.services.append(ServiceProcess(GATEWAY, f"{self.host}:{self.gateway_port}", gateway_args))

    @property
    def gateway_address(self) -> str:
        return self.services[-1].address

    def start(self) -> None:
        output = subprocess.DEVNULL if self.quiet else None
        for service in self.services:
            service.process = subprocess.Popen(
                [sys.executable, "-m", "unclip", *service.args],
                stdout=output,
                stderr=output,
                # Own process group: a terminal's Ctrl-C reaches the launcher, which stops them in order.
                start_new_session=True,
                env=shared_cores_environment(),
            )

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.services)
        while pending:
            for service in list(pending):
                if service.exited():
                    raise RuntimeError(f"{service.name} exited with code {service.returncode} while starting")
                if check_health(service.address):
                    pending.remove(service)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {[s.name for s in pending]}")
            time.sleep(0.2)

    def failed(self) -> ServiceProcess | None:
        """A service that has exited although nobody stopped it."""
        return next((s for s in self.services if s.exited()), None)

    def stop(self) -> None:
        running = [s.process for s in self.services if s.process is not None and s.process.poll() is None]
        for process in reversed(running):  # the gateway first, so it stops taking requests
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> LocalCluster:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
