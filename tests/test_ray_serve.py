"""unclip on Ray Serve: the shipped Serve config (unclip/serve.yaml) on a real local Ray cluster, called through the
Serve gRPC proxy exactly as an external client would, compared with the in-process pipeline."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import shutil
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import openai
import pytest
import ray
from parameter_cases import BATCHED, PARAMETER_NAMES, as_keyword_arguments, generate_in_process, pixels, varied
from PIL import Image
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.schema import ServeDeploySchema
from scrape import scrape

from gateway.remote import RayTransport, RemoteStages, error_from_ray
from unclip import codec
from unclip.calls import EncodeTextCall, SampleCall
from unclip.client import Client, Preview
from unclip.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from unclip.launcher import free_port
from unclip.options import SamplingOptions
from unclip.parameters import GenerationParameters
from unclip.pipeline import generate
from unclip.ray_apps import APP_NAMES, deploy, load_config
from unclip.stage import GATEWAY, Stage
from unclip.stages.batcher import compute_batches
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    prior_pb2,
    prior_pb2_grpc,
    sampling_pb2,
    upsampler_pb2,
    upsampler_pb2_grpc,
)

# Starts a local Ray cluster.
pytestmark = pytest.mark.slow

TINY_STEPS = dict(prior_steps=2, decoder_steps=2, upsampler_steps=1)
PROMPTS = ("a red circle in the top left corner", "a blue square")


def metadata(app: str) -> tuple[tuple[str, str], ...]:
    return (("application", app),)


# -- the config and the error mapping, without a cluster -------------------------------------


def test_serve_config_is_valid_for_ray():
    config = load_config()
    schema = ServeDeploySchema.model_validate(config)
    assert [app.name for app in schema.applications] == list(APP_NAMES)
    assert schema.grpc_options.port == 9000
    assert len(schema.grpc_options.grpc_servicer_functions) == 5
    for app in config["applications"]:
        # Without a route prefix the gRPC proxy would not route to an app. The gateway owns "/",
        # so OpenAI clients use base_url http://HOST:8000/v1; every stage its own prefix.
        assert app["route_prefix"] == ("/" if app["name"] == GATEWAY else f"/{app['name']}")
        for deployment in app["deployments"]:
            assert deployment["autoscaling_config"]["min_replicas"] >= 1
            # A replica must be able to hold a full batch.
            assert deployment["max_ongoing_requests"] >= app["args"].get("max_batch_size", 1)


def test_ray_errors_map_to_status_codes():
    assert isinstance(error_from_ray("prior", BackPressureError(num_queued_requests=9, max_queued_requests=8)), ResourceExhausted)
    assert isinstance(error_from_ray("prior", TimeoutError()), DeadlineExceeded)
    stage_error = RayTaskError("Sample", "traceback", InvalidArgument("steps: must be between 1 and 1000")).as_instanceof_cause()
    mapped = error_from_ray("prior app 'prior'", stage_error)
    assert type(mapped) is InvalidArgument and str(mapped) == "prior app 'prior': steps: must be between 1 and 1000"
    assert isinstance(error_from_ray("prior", ray.exceptions.RayActorError()), Unavailable)


# -- a real local cluster --------------------------------------------------------------------


SUFFIX = "-batched"  # of a second set of applications, at the compute batches of BATCHED
COMPUTE_BATCHES = compute_batches(BATCHED)


def renamed_apps(config: dict, suffix: str, stage_args) -> list[dict]:
    """Every application again under the name + suffix, each stage's args updated with
    `stage_args(stage)`; the gateway calls the renamed stages."""
    apps = []
    for app in copy.deepcopy(config["applications"]):
        app["name"] += suffix
        app["route_prefix"] = "/" + app["name"]  # the shipped gateway has "/"
        if app["name"] == GATEWAY + suffix:
            app["args"] = {**app["args"], **{stage: app["args"][stage] + suffix for stage in ("encoder", "prior", "decoder")}}
            app["args"]["upsamplers"] = [name + suffix for name in app["args"]["upsamplers"]]
        else:
            app["args"] |= stage_args(Stage(app["name"].removesuffix(suffix)))
        apps.append(app)
    return apps


def batched_apps(config: dict) -> list[dict]:
    """At the compute batches of BATCHED, waiting long enough for concurrent test requests to
    surely meet in a joint run; open to calls from outside (`allow_external_calls`), which the
    tests of one stage make through the proxy (the shipped stage apps refuse them)."""
    return renamed_apps(
        config,
        SUFFIX,
        lambda stage: {"compute_batch": COMPUTE_BATCHES[stage], "batch_wait_timeout_s": 0.5, "allow_external_calls": True},
    )


KARLO = "-karlo"  # of a third set of applications, serving the imported tiny Karlo weights


def imported_apps(config: dict, weights) -> list[dict]:
    """Each stage on its imported checkpoint."""
    return renamed_apps(config, KARLO, lambda stage: {"checkpoint": str(weights / stage.kind)})


@dataclass(frozen=True)
class ServeCluster:
    grpc_address: str  # Serve's gRPC proxy
    http_port: int  # Serve's HTTP proxy, on 127.0.0.1
    metrics_port: int  # the node's Prometheus endpoint (Ray's metrics agent)


KEYED = GATEWAY + "-keys"  # a gateway application that wants API keys (gateway.auth)


@pytest.fixture(scope="module")
def ray_api_keys(tmp_path_factory):
    """(keys file, a key in it, its name) for the KEYED gateway app."""
    from gateway.auth import KeysFile

    keys_file = KeysFile(tmp_path_factory.mktemp("keys") / "keys.json")
    _, key = keys_file.create("ray-caller")
    return keys_file.path, key


def keyed_gateway_app(config: dict, keys_file) -> dict:
    """The shipped gateway app again, as KEYED, reading `keys_file`."""
    app = copy.deepcopy(next(app for app in config["applications"] if app["name"] == GATEWAY))
    app["name"], app["route_prefix"] = KEYED, "/" + KEYED
    app["args"]["api_keys_file"] = str(keys_file)
    return app


@pytest.fixture(scope="module")
def serve_cluster(karlo, ray_api_keys):
    """The shipped Serve config on a 2-CPU local Ray cluster, the same applications at compute
    batches of BATCHED (names ending in SUFFIX) and on imported Karlo weights (KARLO); yields
    where its proxies listen."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    config = load_config()
    for app in config["applications"]:
        for deployment in app["deployments"]:
            deployment["autoscaling_config"]["max_replicas"] = 1
            deployment["ray_actor_options"]["num_cpus"] = 0.1
    config["applications"] += batched_apps(config) + imported_apps(config, karlo["weights"])
    config["applications"].append(keyed_gateway_app(config, ray_api_keys[0]))
    metrics_port = free_port()
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False, _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 2000},  # replicas report every 2 s, not every 10
    )  # fmt: skip
    try:
        # A free port can be taken again before Serve's proxy binds it (Ray's own processes pick
        # ports too): on that one error, shut Serve down and try other ports.
        for attempt in range(3):
            grpc_port = config["grpc_options"]["port"] = free_port()
            http_port = config["http_options"]["port"] = free_port()  # host: 127.0.0.1, as shipped
            try:
                deploy(config, timeout_s=240)
                break
            except Exception as error:
                if "Failed to bind" not in str(error) or attempt == 2:
                    raise
                serve.shutdown()
        yield ServeCluster(f"127.0.0.1:{grpc_port}", http_port, metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_serve(serve_cluster):
    """The gRPC proxy's address."""
    return serve_cluster.grpc_address


@pytest.fixture(scope="module")
def channel(ray_serve):
    with grpc.insecure_channel(ray_serve, options=GRPC_OPTIONS) as channel:
        yield channel


def test_generate_through_the_proxy_equals_in_process(ray_serve, local_stages):
    params = GenerationParameters(prompt=PROMPTS[0], n=2, seed=7, size=128, **TINY_STEPS)
    expected = asyncio.run(generate(local_stages, params))
    with Client(ray_serve, application="gateway", timeout=120) as client:
        images = client.generate(PROMPTS[0], n=2, seed=7, size=128, **TINY_STEPS)
    assert [image.seed for image in images] == [7, 8]
    assert [image.png for image in images] == [image.png for image in expected]  # pixels and metadata


def test_api_keys_under_ray_serve(serve_cluster, ray_api_keys):
    """The gateway deployment reads its keys file from its args: both proxies pass the caller's
    Authorization on, so gRPC and HTTP are checked alike; the health route stays open."""
    _, key = ray_api_keys
    request = images_pb2.GenerateRequest(
        parameters=images_pb2.GenerationParameters(prompt=PROMPTS[0], seed=2, size=32, **TINY_STEPS)
    )
    with grpc.insecure_channel(serve_cluster.grpc_address, options=GRPC_OPTIONS) as channel:
        for wrong in ((), (("authorization", "Bearer uk_000000000000_" + "z" * 43),)):
            with pytest.raises(grpc.RpcError) as info:
                images_pb2_grpc.ImageServiceStub(channel).Generate(request, metadata=(*metadata(KEYED), *wrong), timeout=120)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(serve_cluster.grpc_address, application=KEYED, api_key=key, timeout=120) as client:
        assert len(client.generate(PROMPTS[0], seed=2, size=32, **TINY_STEPS)) == 1
    base = f"http://127.0.0.1:{serve_cluster.http_port}/{KEYED}"
    refused = openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as http_info:
        refused.images.generate(prompt=PROMPTS[0], size="32x32", response_format="b64_json")
    assert http_info.value.code == "invalid_api_key"
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    answer = client.images.generate(prompt=PROMPTS[0], size="32x32", response_format="b64_json", extra_body=TINY_STEPS)
    assert len(answer.data) == 1
    with urllib.request.urlopen(base + "/healthz", timeout=30) as health:
        assert health.status == 200


def test_request_ids_come_back_through_the_grpc_proxy(channel):
    """The gateway app answers the caller's x-request-id in the trailing metadata. Ray 2.60's
    proxy sends a replica's trailing metadata only with a successful answer, so an error
    through it carries the status and details but not the id (docs/operations.md)."""
    stub = images_pb2_grpc.ImageServiceStub(channel)
    parameters = images_pb2.GenerationParameters(prompt=PROMPTS[0], seed=2, size=32, **TINY_STEPS)
    _, call = stub.Generate.with_call(
        images_pb2.GenerateRequest(parameters=parameters), metadata=(*metadata(GATEWAY), ("x-request-id", "ray-grpc-1")),
        timeout=120,
    )  # fmt: skip
    assert ("x-request-id", "ray-grpc-1") in tuple(call.trailing_metadata())


def test_unclip_metrics_reach_rays_prometheus_endpoint(serve_cluster):
    """Replicas record unclip's metrics through ray.serve.metrics: on the node's Prometheus
    endpoint as ray_unclip_*, tagged with the application and deployment."""
    with Client(serve_cluster.grpc_address, application=GATEWAY, timeout=120) as client:
        client.generate(PROMPTS[1], seed=3, size=128, **TINY_STEPS)
    address = f"127.0.0.1:{serve_cluster.metrics_port}"

    def count(samples, name, **labels):
        """The sum over the samples of `name` with these labels (and any others: replica, ...)."""
        return sum(v for (n, sample_labels), v in samples.items() if n == name and labels.items() <= sample_labels)

    stages = (("encoder", "EncodeText"), ("prior", "Sample"), ("decoder", "Decode"), ("upsampler", "Upsample"))

    def missing(samples) -> list[str]:
        wanted = {
            "Generate": count(samples, "ray_unclip_requests_total", application=GATEWAY, method="Generate", code="OK"),
            "images": count(samples, "ray_unclip_images_generated_total", application=GATEWAY),
            "stage time": count(samples, "ray_unclip_stage_duration_seconds_count", application=GATEWAY, stage="decoder"),
        }
        for app, method in stages:
            wanted[method] = count(samples, "ray_unclip_requests_total", application=app, method=method, code="OK")
            wanted[f"{app} load"] = count(samples, "ray_unclip_model_load_seconds", application=app, stage=app)
            if app != "encoder":  # CLIP's calls are not diffusion network evaluations
                wanted[f"{app} rows"] = count(samples, "ray_unclip_network_call_rows_count", application=app)
        return [name for name, found in wanted.items() if not found > 0]

    # The agent exports what replicas reported lately; 15 replicas on 2 cores report late at times.
    deadline = time.monotonic() + 90
    while absent := missing(samples := scrape(address)):
        assert time.monotonic() < deadline, f"not on Ray's endpoint after 90 s: {absent}"
        time.sleep(1)
    # Counters are exported once, not also as Ray's deprecated gauge of the same name.
    assert not any(name == "ray_unclip_requests" for name, _ in samples)


def test_openai_client_through_the_http_proxy_equals_in_process(serve_cluster, local_stages):
    """The gateway app's OpenAI-compatible HTTP API through Serve's HTTP proxy, at the root as
    OpenAI SDKs expect it: the official client gets the PNGs the in-process pipeline gives, and
    bad input is OpenAI's 400 naming the field, from the same replica that answers gRPC."""
    expected, _ = generate_in_process(local_stages, dict(prompt=PROMPTS[0], n=2, seed=7, size=128, **TINY_STEPS))
    base_url = f"http://127.0.0.1:{serve_cluster.http_port}/v1"
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as client:
        response = client.images.generate(
            prompt=PROMPTS[0],
            n=2,
            size="128x128",
            response_format="b64_json",
            extra_body={"seed": 7, **TINY_STEPS},
            extra_headers={"x-request-id": "ray-http-1"},
        )
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(prompt=PROMPTS[0], response_format="b64_json", extra_body={"decoder_steps": 0})
    pngs = [base64.b64decode(item.b64_json) for item in response.data]
    assert len(pngs) == 2
    assert response._request_id == "ray-http-1"  # once: Ray's proxy answers it, the app does not repeat it
    for png, image in zip(pngs, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels(image))
    assert pngs == [image.png for image in expected]  # pixels and metadata
    error = refused.value.body
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", "decoder_steps")
    assert refused.value.param == "decoder_steps" and "decoder_steps" in refused.value.message


def test_the_playground_and_streaming_through_the_http_proxy(serve_cluster, local_stages):
    """The gateway app also serves the playground at / and OpenAI's streamed images through
    Serve's HTTP proxy: partial images as they come, then the in-process image."""
    expected, _ = generate_in_process(local_stages, dict(prompt=PROMPTS[0], n=1, seed=9, size=128, **TINY_STEPS))
    root = f"http://127.0.0.1:{serve_cluster.http_port}"
    with urllib.request.urlopen(root + "/", timeout=30) as page:
        assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
        assert "Content-Security-Policy" in page.headers and b"playground.js" in page.read()
    with urllib.request.urlopen(root + "/playground/playground.js", timeout=30) as script:
        assert script.status == 200
    with openai.OpenAI(base_url=root + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        events = list(
            client.images.generate(
                prompt=PROMPTS[0], size="128x128", stream=True, partial_images=1, extra_body={"seed": 9, **TINY_STEPS}
            )
        )
    assert [event.type for event in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert base64.b64decode(events[-1].b64_json) == expected[0].png


def test_imported_weights_give_the_in_process_images_through_ray_serve(ray_serve, karlo):
    """Karlo-family applications (`checkpoint:` an imported directory) answer with the PNGs the
    same weights give in-process, and refuse nothing they can do."""
    steps = dict(prior_steps=3, decoder_steps=3, upsampler_steps=2)
    expected = asyncio.run(generate(karlo["stages"], GenerationParameters(prompt=PROMPTS[1], n=2, seed=5, **steps)))
    with Client(ray_serve, application=GATEWAY + KARLO, timeout=120) as client:
        images = client.generate(PROMPTS[1], n=2, seed=5, **steps)
    assert [image.png for image in images] == [image.png for image in expected]
    assert images[0].metadata["models"]["prior"].startswith("prior-diffusers-")


@pytest.mark.parametrize("name", PARAMETER_NAMES)
def test_each_parameter_gives_the_in_process_images_through_ray_serve(ray_serve, local_stages, name):
    """Each parameter at a value other than its default (which changes the images in-process,
    test_parameters) gives the same PNGs through the proxy, the gateway app and the stage apps."""
    expected, previews = generate_in_process(local_stages, varied(name))
    prompt, parameters = as_keyword_arguments(varied(name))
    with Client(ray_serve, application="gateway", timeout=120) as client:
        events = list(client.generate_stream(prompt, **parameters))
    assert [image.png for image in events[-1]] == [image.png for image in expected]
    assert sum(isinstance(event, Preview) for event in events) == previews


def _stats(app: str) -> dict:
    return serve.get_app_handle(app).stats.remote().result(timeout_s=30)


def concurrently(call, requests):
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(call, requests))


def test_a_mixed_batch_shares_network_calls_without_changing_results(channel, local_stages_batched):
    """Concurrent requests with other prompts, seeds, row counts, step counts and guidance meet
    in joint runs at a compute batch with room for them; each result equals the in-process engine's alone."""
    texts = local_stages_batched.encoder.encode_text(list(PROMPTS))
    # (prompt, seeds, steps, guidance scale): the step counts and scales differ, so only shared
    # network calls, not shared settings, can batch them.
    jobs = [(0, [1], 2, None), (1, [2], 3, 4.0), (0, [3, 4], 2, 1.0), (1, [5], 4, None)]

    def prior_request(prompt, seeds, steps, scale) -> prior_pb2.SampleRequest:
        rows = [prompt] * len(seeds)
        return prior_pb2.SampleRequest(
            text_embeddings=codec.from_numpy(texts.embeddings[rows]),
            text_encodings=codec.from_numpy(texts.encodings[rows]),
            text_mask=codec.from_numpy(texts.mask[rows]),
            seeds=seeds,
            sampling=sampling_pb2.SamplingOptions(steps=steps),
            guidance_scale=scale,
        )

    prior = prior_pb2_grpc.PriorServiceStub(channel)
    before = _stats("prior" + SUFFIX)
    replies = concurrently(
        lambda r: prior.Sample(r, metadata=metadata("prior" + SUFFIX), timeout=60), [prior_request(*job) for job in jobs]
    )
    after = _stats("prior" + SUFFIX)
    embeddings = [codec.to_numpy(reply.image_embeddings) for reply in replies]
    for (prompt, seeds, steps, scale), result in zip(jobs, embeddings, strict=True):
        rows = [prompt] * len(seeds)
        alone = local_stages_batched.prior.sample(
            texts.embeddings[rows], texts.encodings[rows], texts.mask[rows], seeds, sampling=SamplingOptions(steps),
            guidance_scale=scale,
        )  # fmt: skip
        np.testing.assert_array_equal(result, alone)
    runs = after["runs"][len(before["runs"]) :]
    assert sum(runs) == len(jobs) and max(runs) > 1
    calls = after["network_calls"] - before["network_calls"]
    rows = after["network_rows"] - before["network_rows"]
    assert after["compute_batch"] == COMPUTE_BATCHES[Stage.PRIOR] and rows / calls > 1  # a count, not a timing

    decoder = decoder_pb2_grpc.DecoderServiceStub(channel)
    decode_requests = [
        decoder_pb2.DecodeRequest(
            image_embeddings=codec.from_numpy(e),
            seeds=seeds,
            sampling=sampling_pb2.SamplingOptions(steps=steps),
            guidance_scale=scale,
        )
        for e, (_, seeds, steps, scale) in zip(embeddings, jobs, strict=True)
    ]
    before = _stats("decoder" + SUFFIX)
    replies = concurrently(lambda r: decoder.Decode(r, metadata=metadata("decoder" + SUFFIX), timeout=60), decode_requests)
    runs = _stats("decoder" + SUFFIX)["runs"][len(before["runs"]) :]
    assert sum(runs) == len(jobs) and max(runs) > 1
    for e, (_, seeds, steps, scale), reply in zip(embeddings, jobs, replies, strict=True):
        alone = local_stages_batched.decoder.decode(e, seeds, sampling=SamplingOptions(steps), guidance_scale=scale)
        np.testing.assert_array_equal(codec.to_numpy(reply.images), alone)


def test_mixed_generations_through_the_gateway_equal_in_process_ones(ray_serve, local_stages_batched):
    """Whole generations at the compute batches of BATCHED: concurrent requests with other prompts, seeds,
    counts and settings give the PNGs each gives alone in-process (metadata included)."""
    requests = [
        dict(prompt=PROMPTS[0], seed=3, n=2, **TINY_STEPS),
        dict(prompt=PROMPTS[1], seed=9, prior_guidance_scale=5.0, **TINY_STEPS),
        dict(prompt=PROMPTS[1], seed=4, decoder_steps=3, prior_steps=2, upsampler_steps=1, size=32),
    ]
    before = _stats("decoder" + SUFFIX)["runs"]

    def remote(request: dict) -> list:
        prompt, parameters = as_keyword_arguments(request)
        with Client(ray_serve, application=GATEWAY + SUFFIX, timeout=120) as client:
            return client.generate(prompt, **parameters)

    results = concurrently(remote, requests)
    assert max(_stats("decoder" + SUFFIX)["runs"][len(before) :]) > 1
    for request, images in zip(requests, results, strict=True):
        expected, _ = generate_in_process(local_stages_batched, request)
        assert [image.png for image in images] == [image.png for image in expected]
        assert images[0].metadata["compute_batch"]["decoder"] == COMPUTE_BATCHES[Stage.DECODER]


def test_a_stage_error_keeps_its_status_code(channel):
    bad = prior_pb2.SampleRequest(
        text_embeddings=codec.from_numpy(np.zeros((1, 3), np.float32)),
        text_encodings=codec.from_numpy(np.zeros((1, 1, 1), np.float32)),
        text_mask=codec.from_numpy(np.ones((1, 1), bool)),
        seeds=[1],
    )
    with pytest.raises(grpc.RpcError) as raised:  # a stage app open to outside calls (allow_external_calls)
        prior_pb2_grpc.PriorServiceStub(channel).Sample(bad, metadata=metadata("prior" + SUFFIX), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text_embeddings" in raised.value.details()

    # The prior rejects more steps than its 1000 timesteps (the gateway cannot know the bound); its
    # INVALID_ARGUMENT travels through the gateway's handle to the caller.
    request = images_pb2.GenerateRequest(parameters=images_pb2.GenerationParameters(prompt=PROMPTS[0], seed=1, prior_steps=5000))
    with pytest.raises(grpc.RpcError) as raised:
        images_pb2_grpc.ImageServiceStub(channel).Generate(request, metadata=metadata("gateway"), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prior app 'prior'" in raised.value.details() and "steps" in raised.value.details()


def test_handle_calls_respect_the_deadline(ray_serve, local_stages):
    async def run():
        stages = RemoteStages("encoder", "prior", "decoder", ["upsampler"], transport=RayTransport)
        text = await stages.run(EncodeTextCall([PROMPTS[0]]), deadline=time.monotonic() + 30)
        started = time.monotonic()
        call = SampleCall(text.embeddings, text.encodings, text.mask, seeds=[1], sampling=SamplingOptions(1000))
        with pytest.raises(DeadlineExceeded):  # 1000 prior steps take far longer than this
            await stages.run(call, deadline=started + 0.2)
        assert time.monotonic() - started < 5
        await stages.close()

    asyncio.run(run())


STAGE_PROTOS = {
    "encoder": (encoder_pb2, encoder_pb2_grpc, "ClipEncoderService"),
    "prior": (prior_pb2, prior_pb2_grpc, "PriorService"),
    "decoder": (decoder_pb2, decoder_pb2_grpc, "DecoderService"),
    "upsampler": (upsampler_pb2, upsampler_pb2_grpc, "UpsamplerService"),
}


def test_stage_apps_refuse_calls_from_outside_the_release(channel, ray_serve):
    """Every RPC of every shipped stage app, routed by the gRPC proxy (a caller outside the
    release), gets PERMISSION_DENIED before its request is even read; the gateway still reaches
    the same apps through its Serve handles."""
    refused = {}
    for app, (messages, services, service) in STAGE_PROTOS.items():
        stub = getattr(services, f"{service}Stub")(channel)
        for method in messages.DESCRIPTOR.services_by_name[service].methods:
            request = getattr(messages, f"{method.name}Request")()
            try:
                reply = getattr(stub, method.name)(request, metadata=metadata(app), timeout=30)
                if method.server_streaming:
                    list(reply)
            except grpc.RpcError as error:
                refused[f"{app}.{method.name}"] = (error.code(), "answers the gateway only" in (error.details() or ""))
            else:
                refused[f"{app}.{method.name}"] = (grpc.StatusCode.OK, False)
    assert len(refused) == 10
    assert refused == dict.fromkeys(refused, (grpc.StatusCode.PERMISSION_DENIED, True))
    with Client(ray_serve, application=GATEWAY, timeout=120) as client:
        (image,) = client.generate(PROMPTS[0], seed=11, size=32, **TINY_STEPS)
    assert image.seed == 11
