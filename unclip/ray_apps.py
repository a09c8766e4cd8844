"""Ray Serve applications: each stage service and the gateway as its own Serve application.

The stages implement the same gRPC services as in local mode and the gateway reaches them
through Serve handles with the same protobuf messages (`gateway.remote.RayTransport`). Ray's gRPC
proxy routes any `application` metadata, but a stage app answers calls it routes from outside
with PERMISSION_DENIED (unless its args say `allow_external_calls: true`): callers outside the
release reach only the gateway, the way stages served locally accept only the gateway's client
certificate (`unclip.tls`). The gateway also serves the
OpenAI-compatible HTTP API (`gateway.http_api`) through Serve's HTTP proxy, at route prefix `/`.
Everything model-related is the local-mode servicers' and engines' (batching included: each
replica's `Batcher` groups concurrent calls into joint runs at the stage's compute batch); this
module adapts them to Serve. `unclip/serve.yaml` (also at deploy/ray/serve.yaml) deploys all five.

No `from __future__ import annotations` here: Serve reads the builders' pydantic annotations
at runtime to validate a config's `args`.
"""

import importlib
import logging
import os
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.message import Message
from pydantic import BaseModel
from ray import serve
from ray.serve import Application

from decoder_svc.servicer import DecoderServicer, UpsamplerServicer
from encoder_svc.servicer import ClipEncoderServicer
from gateway.admission import DEFAULT_BODY_TIMEOUT_SECONDS, DEFAULT_MAX_CONCURRENT_REQUESTS, GatewayLimits
from gateway.api import ImageAPI
from gateway.auth import Access
from gateway.http_api import create_http_app
from gateway.quotas import QuotaLimits
from gateway.remote import RayTransport, RemoteStages
from gateway.servicer import ImageServicer
from prior_svc.servicer import PriorServicer
from unclip import metrics, settings, tracing
from unclip.cost import DEFAULT_MAX_REQUEST_COST
from unclip.errors import error_for_status
from unclip.serving import HopContext, StageServicer
from unclip.stage import GATEWAY, SERVICE_NAMES
from unclip.stages.batcher import BatchSettings
from unclip.storage import ResultStore, StorageConfig

APP_NAMES = (*SERVICE_NAMES, GATEWAY)
log = logging.getLogger("unclip.ray")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "serve.yaml"
# Ray bounds each replica's queue (max_ongoing_requests, max_queued_requests); the servicers'
# own limit must never be the one that answers RESOURCE_EXHAUSTED.
UNBOUNDED_PENDING = sys.maxsize


def _rpc_method(name: str):
    """A deployment method answering RPC `name` with the servicer's method of that name."""

    async def method(
        self, request: Message, grpc_context: Any = None, timeout_s: float | None = None, metadata: dict[str, str] | None = None
    ) -> Message:
        return await getattr(self.servicer, name)(request, self.context(grpc_context, timeout_s, metadata))

    method.__name__ = method.__qualname__ = name
    return method


def _streaming_rpc_method(name: str):
    """Like `_rpc_method`, for a server-streaming RPC."""

    async def method(
        self, request: Message, grpc_context: Any = None, timeout_s: float | None = None, metadata: dict[str, str] | None = None
    ):
        async for reply in getattr(self.servicer, name)(request, self.context(grpc_context, timeout_s, metadata)):
            yield reply

    method.__name__ = method.__qualname__ = name
    return method


def _observe_replica(name: str) -> None:
    """Metrics through Ray's exporter, and traces when the replica's OTEL_* variables ask."""
    metrics.use_ray_serve()
    tracing.configure(f"unclip-{name}")


# -- stage deployments -----------------------------------------------------------------------


class _Stage:
    """A local-mode stage servicer inside a replica; the engine loads in the constructor, so a
    replica only counts as running (and gets traffic) once its model is there. Concurrent
    requests batch in the servicer's batcher, as they do in a stage service."""

    SERVICER: type[StageServicer]

    def __init__(
        self,
        checkpoint: str | None,
        compute_batch: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        allow_external_calls: bool = False,
    ):
        self.allow_external_calls = allow_external_calls
        # Ray bounds each replica's queue (max_ongoing_requests, max_queued_requests); the
        # batcher's own limit must never be the one that answers RESOURCE_EXHAUSTED.
        settings = BatchSettings(compute_batch, max_batch_size, batch_wait_timeout_s, max_pending=UNBOUNDED_PENDING)
        _observe_replica(self.SERVICER.STAGE.value)  # before the engine loads: it records its load time
        self.servicer = self.SERVICER(checkpoint, settings=settings)
        self.servicer.load()

    def context(self, grpc_context: Any, timeout_s: float | None, metadata: dict[str, str] | None) -> HopContext:
        if grpc_context is not None and not self.allow_external_calls:
            # Only Ray's gRPC proxy passes a grpc_context, for a caller outside the release; the
            # gateway's handle calls pass none. The proxy answers with the code set here.
            details = f"the {self.SERVICER.STAGE.value} application answers the gateway only; call the gateway application"
            log.warning("refused a call routed by the gRPC proxy to the %s application", self.SERVICER.STAGE.value)
            grpc_context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            grpc_context.set_details(details)
            raise error_for_status(grpc.StatusCode.PERMISSION_DENIED.name, details)
        return HopContext(grpc_context, timeout_s, metadata=metadata)

    async def stats(self) -> dict[str, Any]:
        """How this replica batched: the calls each joint run served, network calls and rows."""
        assert self.servicer.batcher is not None
        engine_stats = self.servicer.engine.stats
        return {
            "runs": list(self.servicer.batcher.runs),
            "network_calls": engine_stats.network_calls,
            "network_rows": engine_stats.network_rows,
            "network_seconds": engine_stats.network_seconds,
            "compute_batch": self.servicer.engine.compute_batch,
            "pid": os.getpid(),  # benchmarks watch this replica's memory
        }


@serve.deployment(name="Encoder", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.25})
class EncoderDeployment(_Stage):
    SERVICER = ClipEncoderServicer

    GetEncoderInfo = _rpc_method("GetEncoderInfo")
    EncodeText = _rpc_method("EncodeText")
    EncodeImage = _rpc_method("EncodeImage")


@serve.deployment(name="Prior", max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})
class PriorDeployment(_Stage):
    SERVICER = PriorServicer

    GetPriorInfo = _rpc_method("GetPriorInfo")
    Sample = _rpc_method("Sample")


@serve.deployment(name="Decoder", max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})
class DecoderDeployment(_Stage):
    SERVICER = DecoderServicer

    GetDecoderInfo = _rpc_method("GetDecoderInfo")
    Decode = _rpc_method("Decode")
    DecodeStream = _streaming_rpc_method("DecodeStream")


@serve.deployment(name="Upsampler", max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})
class UpsamplerDeployment(_Stage):
    SERVICER = UpsamplerServicer

    GetUpsamplerInfo = _rpc_method("GetUpsamplerInfo")
    Upsample = _rpc_method("Upsample")


@serve.deployment(name="Gateway", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()  # the ASGI app comes from __serve_build_asgi_app__, once the replica is constructed
class GatewayDeployment:
    """The gateway over the stage apps' handles: its ImageService through Serve's gRPC proxy (the
    methods below) and its OpenAI-compatible HTTP API through Serve's HTTP proxy, both over
    one ImageAPI, as in `unclip serve gateway`."""

    def __init__(
        self,
        encoder: str,
        prior: str,
        decoder: str,
        upsamplers: list[str],
        request_timeout_s: float,
        limits: GatewayLimits = GatewayLimits(),
        api_keys_file: str | None = None,
        quota_defaults: QuotaLimits = QuotaLimits(),
    ):
        _observe_replica(GATEWAY)
        storage = StorageConfig.from_env()  # UNCLIP_S3_* in the app's runtime_env
        backend = RemoteStages(encoder, prior, decoder, upsamplers, transport=RayTransport)
        # Each replica admits its own max_concurrent_requests; Ray's max_ongoing_requests bounds
        # what reaches it, so keep it at least as high or Ray queues what this would refuse.
        self.limits = limits
        # The keys file is read on the replica's node (a Secret mounted on every node under Helm);
        # both proxies pass the caller's Authorization on, so gRPC and HTTP are checked here alike.
        access = Access.from_file(api_keys_file or settings.API_KEYS_FILE.get(), quota_defaults)
        self.api = ImageAPI(backend, None if storage is None else ResultStore(storage), limits, access)
        self.servicer = ImageServicer(self.api)
        self.request_timeout_s = request_timeout_s

    def __serve_build_asgi_app__(self) -> Any:
        # No GET /metrics: this replica's metrics go out through Ray's exporter (metrics.use_ray_serve),
        # on each Ray node's metrics port.
        return create_http_app(
            self.api, request_timeout=self.request_timeout_s, body_timeout=self.limits.body_timeout, metrics_route=False,
            answer_request_id=False,
        )  # fmt: skip

    def context(self, grpc_context: Any, timeout_s: float | None, metadata: dict[str, str] | None) -> HopContext:
        # The proxy does not pass the caller's gRPC deadline on: the request timeout (the same
        # as grpc_options.request_timeout_s) is the budget the stage hops share.
        return HopContext(grpc_context, self.request_timeout_s if timeout_s is None else timeout_s, metadata=metadata)

    Generate = _rpc_method("Generate")
    GenerateStream = _streaming_rpc_method("GenerateStream")
    CreateVariations = _rpc_method("CreateVariations")
    Interpolate = _rpc_method("Interpolate")
    TextDiff = _rpc_method("TextDiff")
    Edit = _rpc_method("Edit")


# -- application builders (import paths of unclip/serve.yaml) --------------------------------


class StageArgs(BaseModel):
    checkpoint: str | None = None  # None: the weights shipped in the package
    compute_batch: int = 1  # rows per network evaluation; images depend on it (1: row by row)
    max_batch_size: int = 8  # requests per joint run; keep the deployment's max_ongoing_requests at least this
    batch_wait_timeout_s: float = 0.01  # how long a run's first request waits for company
    # false: calls routed to the app by the gRPC proxy (from outside the release) get
    # PERMISSION_DENIED, only the gateway's handle calls are answered; true opens it, for debugging.
    allow_external_calls: bool = False


class GatewayArgs(BaseModel):
    encoder: str = "encoder"  # the stage application names
    prior: str = "prior"
    decoder: str = "decoder"
    upsamplers: list[str] = ["upsampler"]
    request_timeout_s: float = 600.0  # also the deadline of gRPC calls: the proxy does not pass the caller's on
    # Admission control (gateway.admission), per replica; null: no limit.
    max_concurrent_requests: int | None = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_request_cost: int | None = DEFAULT_MAX_REQUEST_COST
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_SECONDS  # an HTTP body that takes longer gets 408
    # API keys (gateway.auth): the keys file's path on every node (null: UNCLIP_API_KEYS_FILE in
    # the app's runtime_env, or no keys); per-key quota defaults, counted per replica (null: none).
    api_keys_file: str | None = None
    images_per_minute: int | None = None
    max_concurrent_per_key: int | None = None


def _bind(deployment: Any, *init: Any) -> Application:
    """The deployment bound to its constructor arguments, with the options `deploy` is applying."""
    options = _DEPLOYMENT_OPTIONS.get(deployment.name)
    return (deployment.options(**options) if options else deployment).bind(*init)


def _stage_app(deployment: Any, args: StageArgs) -> Application:
    return _bind(
        deployment, args.checkpoint, args.compute_batch, args.max_batch_size, args.batch_wait_timeout_s,
        args.allow_external_calls,
    )  # fmt: skip


def encoder_app(args: StageArgs) -> Application:
    return _stage_app(EncoderDeployment, args)


def prior_app(args: StageArgs) -> Application:
    return _stage_app(PriorDeployment, args)


def decoder_app(args: StageArgs) -> Application:
    return _stage_app(DecoderDeployment, args)


def upsampler_app(args: StageArgs) -> Application:
    return _stage_app(UpsamplerDeployment, args)


def gateway_app(args: GatewayArgs) -> Application:
    limits = GatewayLimits(
        max_concurrent_requests=args.max_concurrent_requests,
        max_request_cost=args.max_request_cost,
        default_timeout=args.request_timeout_s,
        body_timeout=args.body_timeout_s,
    )
    quotas = QuotaLimits(args.images_per_minute, args.max_concurrent_per_key)
    return _bind(
        GatewayDeployment, args.encoder, args.prior, args.decoder, args.upsamplers, args.request_timeout_s, limits,
        args.api_keys_file, quotas,
    )  # fmt: skip


# -- deploying a config ----------------------------------------------------------------------

# Per-deployment options of the application `deploy` is building (a Serve config's
# `deployments` list); empty when Serve itself calls a builder, since it applies them itself.
_DEPLOYMENT_OPTIONS: dict[str, dict[str, Any]] = {}


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def grpc_proxy_address(schema: Any) -> str:
    """host:port of the gRPC proxy a ServeDeploySchema starts (on this node)."""
    host = schema.http_options.host  # the proxies bind the HTTP host for gRPC too
    return f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{schema.grpc_options.port}"


def build_application(app: Any) -> Application:
    """The Serve application of one validated config entry (ServeApplicationSchema): its builder
    called with its args, every deployment with the entry's options (and runtime_env)."""
    module, name = app.import_path.split(":")
    builder: Callable[[Any], Application] = getattr(importlib.import_module(module), name)
    args_type = next(iter(typing.get_type_hints(builder).values()))  # the builder's one parameter
    _DEPLOYMENT_OPTIONS.clear()
    for deployment in app.deployments:
        options = deployment.model_dump(exclude_unset=True, exclude={"name"})
        if app.runtime_env:
            actor = options.setdefault("ray_actor_options", {})
            actor["runtime_env"] = {**app.runtime_env, **actor.get("runtime_env", {})}
        _DEPLOYMENT_OPTIONS[deployment.name] = options
    try:
        return builder(args_type.model_validate(app.args or {}))
    finally:
        _DEPLOYMENT_OPTIONS.clear()


def deploy(config: dict[str, Any], *, timeout_s: float = 600.0) -> Any:
    """Deploy a Serve config on the connected Ray cluster, as `serve run config.yaml` does, and
    wait until every application runs and the gRPC proxy routes to it. Returns the validated
    ServeDeploySchema."""
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    serve.start(
        proxy_location=schema.proxy_location,
        http_options=schema.http_options.model_dump(),
        grpc_options=schema.grpc_options.model_dump(),
    )
    for app in schema.applications:
        serve.run(build_application(app), name=app.name, route_prefix=app.route_prefix, blocking=False)
    names = {app.name for app in schema.applications}
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = serve.status().applications
        failed = {
            n: statuses[n].message for n in names & statuses.keys() if statuses[n].status == ApplicationStatus.DEPLOY_FAILED
        }
        if failed:
            raise RuntimeError(f"deploying failed: {failed}")
        running = {n for n in names & statuses.keys() if statuses[n].status == ApplicationStatus.RUNNING}
        # The proxy learns about running apps a moment later; until then it answers NOT_FOUND.
        if running == names and names <= _proxy_applications(grpc_proxy_address(schema)):
            return schema
        if time.monotonic() > deadline:
            raise TimeoutError(f"not running and routed after {timeout_s:.0f}s: {sorted(names - running)}")
        time.sleep(0.5)


def _proxy_applications(address: str) -> set[str]:
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            request: Any = serve_pb2.ListApplicationsRequest()  # type: ignore[attr-defined]  # generated without stubs
            reply = serve_pb2_grpc.RayServeAPIServiceStub(channel).ListApplications(request, timeout=2)
        except grpc.RpcError:
            return set()
    return set(reply.application_names)
