"""`unclip serve encoder|prior|decoder|upsampler|gateway|all|ray`: run services until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from unclip import logs, tracing
from unclip.cli import auth_flags, limit_flags, tls_flags
from unclip.cli.common import add_compute_batch_flag, batch_settings
from unclip.logs import FORMATS
from unclip.stage import DEFAULT_GATEWAY_PORT, GATEWAY, SERVICE_NAMES, Stage
from unclip.transport import SHUTDOWN_GRACE_SECONDS

TARGETS = (*SERVICE_NAMES, GATEWAY, "all", "ray")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("serve", help="run a stage service, the gateway, or all of them")
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ports = ", ".join(f"{stage.port} {stage.value}" for stage in Stage)
    parser.add_argument("--port", type=int, help=f"port (default: {DEFAULT_GATEWAY_PORT} for gateway/all; {ports})")
    parser.add_argument("--checkpoint", type=Path, help="stage: checkpoint directory (default: the shipped weights)")
    parser.add_argument("--weights", type=Path, help="all: directory with clip/ prior/ decoder/ upsampler/")
    add_compute_batch_flag(parser)
    parser.add_argument("--max-batch-size", type=int, help="stage, all: requests a stage runs together (default 8)")
    parser.add_argument(
        "--batch-wait",
        dest="batch_wait_s",
        type=float,
        help="stage, all: seconds a run's first request waits for company (default 0)",
    )
    parser.add_argument("--max-pending", type=int, help="stage, all: requests accepted before RESOURCE_EXHAUSTED (default 32)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="stage: serve Prometheus metrics at /metrics on this port; all: the stages' on this port + 1 .. + 4 "
        "(the gateway's are at /metrics on its HTTP port)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=SHUTDOWN_GRACE_SECONDS,
        help="on SIGTERM or Ctrl-C: seconds requests in flight get to finish while new ones are refused "
        f"(default {SHUTDOWN_GRACE_SECONDS:g})",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="log lines as text or as one JSON object each; either way every request's line carries its request id, "
        "trace id, method, status and duration (default text)",
    )
    parser.add_argument("--config", type=Path, help="ray: Ray Serve config (default: the one in the package, unclip/serve.yaml)")
    for stage in (Stage.ENCODER, Stage.PRIOR, Stage.DECODER):
        parser.add_argument(f"--{stage.value}", metavar="HOST:PORT", help=f"gateway: the {stage.value} service")
    parser.add_argument(
        f"--{Stage.UPSAMPLER.value}", metavar="HOST:PORT", action="append", help="gateway: an upsampler (repeat, in order)"
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=8080,
        help="gateway/all: port of the OpenAI-compatible HTTP API (default 8080; 0 turns it off)",
    )
    tls_flags.add_serve_flags(parser)
    limit_flags.add_serve_flags(parser)
    auth_flags.add_serve_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.target not in ("all", "ray"):  # those two start processes that log for themselves
        logs.configure(args.log_format, level=logging.INFO)
        try:
            tracing.configure(f"unclip-{args.target}")
        except ValueError as error:
            print(f"unclip serve {args.target}: {error}", file=sys.stderr)
            return 2
    if args.metrics_port is not None and args.target in ("ray", GATEWAY):
        print(f"unclip serve {args.target}: --metrics-port is for the stages and all; the gateway's metrics are at "
              "/metrics on its HTTP port", file=sys.stderr)  # fmt: skip
        return 2
    try:
        tls_flags.check_serve_flags(args)
        tls = tls_flags.server_tls(args)  # this server's own endpoint: a stage's, or the gateway's public one
        credentials = None if tls is None or args.target in ("all", "ray") else tls.server_credentials()
    except (tls_flags.TlsFlagError, OSError) as error:
        print(f"unclip serve {args.target}: {error}", file=sys.stderr)
        return 2
    try:
        auth_flags.check_serve_flags(args)  # no gateway beyond loopback without keys, unless --insecure-no-auth
        access = auth_flags.gateway_access(args) if args.target in (GATEWAY, "all") else None  # the keys file must parse
    except ValueError as error:  # also gateway.auth.KeysFileError
        print(f"unclip serve {args.target}: {error}", file=sys.stderr)
        return 2
    if args.target == "all":
        return _serve_all(args)
    if args.target == "ray":
        return _serve_ray(args)
    if args.target == GATEWAY:
        return _serve_gateway(args, access)
    from unclip.serving import serve_forever, stage_server

    stage = Stage(args.target)
    port = stage.port if args.port is None else args.port
    settings = batch_settings(args)[stage]

    def make_server() -> Any:
        return stage_server(
            stage, args.checkpoint, host=args.host, port=port, settings=settings, metrics_port=args.metrics_port,
            credentials=credentials, default_timeout=args.default_timeout,
        )  # fmt: skip

    asyncio.run(serve_forever(make_server, shutdown_grace=args.shutdown_grace))
    return 0


def _serve_gateway(args: argparse.Namespace, access: Any) -> int:
    missing = [stage.value for stage in Stage if not getattr(args, stage.value)]
    if missing:
        print(f"unclip serve gateway: give the address of: {', '.join('--' + m for m in missing)}", file=sys.stderr)
        return 2
    from gateway.app import build_gateway
    from gateway.remote import GrpcTransport, RemoteStages
    from unclip.serving import serve_forever
    from unclip.storage import StorageConfig

    try:
        storage = StorageConfig.from_env()
    except ValueError as error:
        print(f"unclip serve gateway: {error}", file=sys.stderr)
        return 2
    http_port = None if args.http_port == 0 else args.http_port
    port = DEFAULT_GATEWAY_PORT if args.port is None else args.port
    stage_tls = tls_flags.stage_channel_tls(args)
    try:
        stage_credentials = None if stage_tls is None else stage_tls.channel_credentials()
    except OSError as error:
        print(f"unclip serve gateway: {error}", file=sys.stderr)
        return 2

    def make_server() -> Any:
        transport = functools.partial(GrpcTransport, credentials=stage_credentials)
        backend = RemoteStages(args.encoder, args.prior, args.decoder, args.upsampler, transport=transport)
        tls = tls_flags.server_tls(args)
        limits = limit_flags.gateway_limits(args)
        return build_gateway(
            backend, host=args.host, port=port, http_port=http_port, storage=storage, tls=tls, limits=limits, access=access
        )

    asyncio.run(serve_forever(make_server, shutdown_grace=args.shutdown_grace))
    return 0


def _serve_all(args: argparse.Namespace) -> int:
    import signal
    import time

    from unclip.launcher import LocalCluster, check_health
    from unclip.tls import GATEWAY_CLIENT, GATEWAY_SERVER, CertificateDirectory

    settings = batch_settings(args)
    tls_dir, temporary = args.tls_dir, None
    if args.tls:
        from unclip.certs import init

        tls_dir = temporary = Path(tempfile.mkdtemp(prefix="unclip-tls-"))
        init(temporary, [args.host])
        print(f"unclip: TLS with a new development CA; clients: --tls-ca {temporary / 'ca.crt'}", flush=True)
    elif tls_dir is not None:
        missing = CertificateDirectory(tls_dir).missing([*SERVICE_NAMES, GATEWAY_CLIENT, GATEWAY_SERVER])
        if missing:
            print(f"unclip serve all: not in --tls-dir (unclip certs init {tls_dir} writes them): "
                  f"{', '.join(p.name for p in missing)}", file=sys.stderr)  # fmt: skip
            return 2
    cluster = LocalCluster(
        host=args.host,
        gateway_port=args.port or DEFAULT_GATEWAY_PORT,
        http_port=args.http_port,
        metrics_port=args.metrics_port or 0,
        weights=args.weights,
        log_format=args.log_format,
        shutdown_grace=args.shutdown_grace,
        settings=settings,
        tls_dir=tls_dir,
        limits=limit_flags.gateway_limits(args),
        gateway_flags=auth_flags.gateway_args(args),
    )
    stop_requested = False

    def request_stop(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    cluster.start()
    try:
        ready_reported = False
        while not stop_requested:
            cluster.supervise(lambda line: print(line, file=sys.stderr, flush=True))
            if not ready_reported and all(check_health(s.address, 1.0, s.credentials) for s in cluster.services):
                print(f"unclip: serving; gateway at {cluster.gateway_address}", flush=True)
                ready_reported = True
            time.sleep(0.5)
        print("unclip: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        cluster.stop()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _serve_ray(args: argparse.Namespace) -> int:
    """Every stage and the gateway as Ray Serve applications on a local Ray cluster, until Ctrl-C."""
    import signal
    import threading

    import ray
    from ray import serve

    from unclip.launcher import shared_cores_environment
    from unclip.ray_apps import DEFAULT_CONFIG, deploy, grpc_proxy_address, load_config

    config = load_config(args.config or DEFAULT_CONFIG)
    try:
        auth_flags.configure_ray(config, args)
    except ValueError as error:
        print(f"unclip serve ray: {error}", file=sys.stderr)
        return 2
    if args.tls_cert:
        # Ray 2.60's HTTP proxy takes a certificate; its gRPC proxy binds plaintext only (docs/security.md).
        http_options = config.setdefault("http_options", {})
        http_options |= {"ssl_certfile": str(args.tls_cert.resolve()), "ssl_keyfile": str(args.tls_key.resolve())}
    # Every replica shares this machine's cores; Ray's workers inherit this process's environment.
    os.environ.update(shared_cores_environment())
    # A fresh local cluster (never one already running on this host), without the dashboard.
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        schema = deploy(config)
        if args.tls_cert:
            print("unclip: the HTTP proxy serves HTTPS; the gRPC proxy serves plaintext (Ray's has no TLS)", flush=True)
        print(f"unclip: serving on Ray; gRPC proxy at {grpc_proxy_address(schema)}", flush=True)
        # Stage apps refuse what the proxy routes to them from outside (unless their args open them).
        print(f"unclip: name the app in the 'application' metadata key: {GATEWAY}", flush=True)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        print("unclip: stopping", file=sys.stderr, flush=True)
        return 0
    except (RuntimeError, TimeoutError) as error:
        print(f"unclip serve ray: {error}", file=sys.stderr)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
