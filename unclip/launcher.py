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

from gateway.admission import GatewayLimits
from unclip.stage import DEFAULT_GATEWAY_PORT, GATEWAY, Stage
from unclip.stages.batcher import BatchSettings
from unclip.tls import CertificateDirectory, channel_credentials
from unclip.transport import SHUTDOWN_GRACE_SECONDS

# Past its shutdown grace, how long a service gets to exit before it is killed.
STOP_MARGIN_SECONDS = 10.0
# A service that died is started again after 1, 2, 4 ... seconds, at most this many.
MAX_RESTART_DELAY_SECONDS = 30.0
# Up this long, a restarted service counts as healthy again: its next failure waits 1 s again.
STABLE_SECONDS = 60.0


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


def check_health(address: str, timeout: float = 2.0, credentials: grpc.ChannelCredentials | None = None) -> bool:
    """True when the server at `address` reports SERVING for its overall health; `credentials`
    for a server that serves TLS (a stage serving mutual TLS wants a client certificate its CA
    signed: `unclip.tls.TlsFiles.channel_credentials`)."""
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
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
    restarts: int = 0  # times it was started again after dying
    started_at: float = 0.0  # time.monotonic() of the last start
    restart_at: float | None = None  # when it died: when it is due to start again
    credentials: grpc.ChannelCredentials | None = field(default=None, repr=False)  # what a health check needs (TLS)

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
    shutdown_grace: float = SHUTDOWN_GRACE_SECONDS  # each service's, on stop
    # A `unclip certs init` directory: the stages serve mutual TLS and accept only the gateway's
    # client certificate; the gateway serves its public endpoints with TLS. None: plaintext.
    tls_dir: Path | None = None
    limits: GatewayLimits = field(default_factory=GatewayLimits)  # the gateway's; the stages take its default timeout
    # More flags for the gateway: its API keys and quotas (`unclip.cli.auth_flags.gateway_args`).
    gateway_flags: list[str] = field(default_factory=list)
    services: list[ServiceProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = self.stage_ports or {stage: stage.port_next_to(self.gateway_port) for stage in Stage}
        # Bound to every interface, the services are reached over loopback: 0.0.0.0 is no address to
        # connect to, nor a name a TLS certificate can carry.
        connect_host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        addresses = {stage: f"{connect_host}:{ports[stage]}" for stage in Stage}
        for stage in Stage:
            args = ["serve", stage.value, "--host", self.host, "--port", str(ports[stage]), "--log-format", self.log_format]
            args += ["--shutdown-grace", str(self.shutdown_grace), *self.limits.serve_flags(gateway=False)]
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
            "--shutdown-grace",
            str(self.shutdown_grace),
        ]
        gateway_args += [arg for stage in Stage for arg in (f"--{stage.value}", addresses[stage])]
        gateway_args += self.limits.serve_flags(gateway=True)
        gateway_args += self.gateway_flags
        self.services.append(ServiceProcess(GATEWAY, f"{connect_host}:{self.gateway_port}", gateway_args))
        if self.tls_dir is not None:
            self._use_tls(CertificateDirectory(Path(self.tls_dir)))

    def _use_tls(self, files: CertificateDirectory) -> None:
        """Each service's TLS flags from `files`, and the credentials its health checks present:
        a stage's, the gateway's client certificate (the launcher checks on the gateway's behalf);
        the gateway's, its CA only (its public endpoints ask no client certificate)."""
        *stages, gateway = self.services
        for service in stages:
            tls = files.stage_server(service.name)
            service.args += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]
            service.credentials = files.gateway_client().channel_credentials()
        client, public = files.gateway_client(), files.gateway_server()
        gateway.args += ["--stage-tls-cert", str(client.cert), "--stage-tls-key", str(client.key)]
        gateway.args += ["--stage-tls-ca", str(client.ca)]
        gateway.args += ["--tls-cert", str(public.cert), "--tls-key", str(public.key)]
        gateway.credentials = channel_credentials(ca=files.ca)

    @property
    def gateway_address(self) -> str:
        return self.services[-1].address

    def start(self) -> None:
        for service in self.services:
            self._start(service)

    def _start(self, service: ServiceProcess) -> None:
        output = subprocess.DEVNULL if self.quiet else None
        service.process = subprocess.Popen(
            [sys.executable, "-m", "unclip", *service.args],
            stdout=output,
            stderr=output,
            # Own process group: a terminal's Ctrl-C reaches the launcher, which stops them in order.
            start_new_session=True,
            env=shared_cores_environment(),
        )
        service.started_at = time.monotonic()
        service.restart_at = None

    def supervise(self, report=print) -> None:
        """Start again every service that died, each after a backoff that doubles with each
        death in a row (1 s, 2 s, 4 s ... at most MAX_RESTART_DELAY_SECONDS); the others keep
        serving meanwhile, and the gateway's calls to a missing stage fail with UNAVAILABLE.
        Call it now and then; `report` gets a line for each death and restart."""
        now = time.monotonic()
        for service in self.services:
            if service.restart_at is None and service.exited():
                if now - service.started_at >= STABLE_SECONDS:
                    service.restarts = 0
                delay = min(MAX_RESTART_DELAY_SECONDS, 2.0**service.restarts)
                service.restart_at = now + delay
                report(f"unclip: {service.name} exited with code {service.returncode}; starting it again in {delay:g} s")
            elif service.restart_at is not None and now >= service.restart_at:
                service.restarts += 1
                self._start(service)
                report(f"unclip: {service.name} started again (restart {service.restarts})")

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.services)
        while pending:
            for service in list(pending):
                if service.exited():
                    raise RuntimeError(f"{service.name} exited with code {service.returncode} while starting")
                if check_health(service.address, credentials=service.credentials):
                    pending.remove(service)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {[s.name for s in pending]}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Drain the gateway first, while the stages still answer its requests in flight, then
        the stages; each gets its shutdown grace (and a margin) before it is killed."""
        gateway, stages = self.services[-1], self.services[:-1]
        for group in ([gateway], stages):
            running = [s.process for s in group if s.process is not None and s.process.poll() is None]
            for process in running:
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.shutdown_grace + STOP_MARGIN_SECONDS
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
