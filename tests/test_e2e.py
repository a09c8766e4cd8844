"""The gateway end to end: `unclip serve all` started by the test, driven through the SDK,
compared pixel for pixel with the in-process pipeline, then stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from browser import browser_page, playground_flow
from conftest import FAST_STEPS
from otlp_receiver import OTLPReceiver
from parameter_cases import BASE, BATCHED, PARAMETER_NAMES, SENDS_PREVIEWS, as_keyword_arguments, generate_in_process, varied
from s3server import S3Server, running_s3_server
from scrape import scrape, value
from servers import serve_all_process

from unclip.client import AsyncClient, Client, Preview, StageProgress, UnclipError
from unclip.parameters import GenerationParameters
from unclip.pipeline import generate
from unclip.stage import Stage

# Starts `unclip serve all`: five processes.
pytestmark = pytest.mark.slow

PROMPT = "a green triangle at the bottom"


def _ports_free(ports) -> bool:
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _free_port_block(size: int = 5) -> int:
    for _ in range(200):
        base = random.randint(20000, 60000)
        if _ports_free(range(base, base + size)):
            return base
    raise RuntimeError("no block of free ports on 127.0.0.1")


@dataclass
class ServeAll:
    """`unclip serve all` as the tests see it; unpacks as (process, address, port)."""

    process: subprocess.Popen
    address: str
    port: int
    traces: OTLPReceiver  # where every process exports its spans
    s3: S3Server  # the gateway's object store
    output: list[str] = field(default_factory=list)  # every line the five processes printed, as it came

    def __iter__(self):
        return iter((self.process, self.address, self.port))

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in list(self.output) if line.startswith("{")]


@pytest.fixture(scope="module")
def serve_all():
    # The gateway, four stages, the gateway's HTTP API, and the stages' metrics ports (+6 .. +9).
    port = _free_port_block(10)
    with ExitStack() as stack:
        traces = stack.enter_context(OTLPReceiver())
        s3 = stack.enter_context(running_s3_server())
        env = os.environ | {
            "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": traces.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "UNCLIP_S3_ENDPOINT": s3.endpoint, "UNCLIP_S3_ACCESS_KEY": s3.access_key, "UNCLIP_S3_SECRET_KEY": s3.secret_key,
        }  # fmt: skip
        # Batched here (Ray Serve's tests use 1 as well): in-process equality must hold at both.
        args = ["--http-port", str(port + 5), "--compute-batch", BATCHED, "--metrics-port", str(port + 5),
                "--log-format", "json"]  # fmt: skip
        process, output = stack.enter_context(serve_all_process(args, port, env=env))
        yield ServeAll(process, f"127.0.0.1:{port}", port, traces, s3, output)


def test_distributed_images_equal_in_process_images(serve_all, local_stages_batched):
    _, address, _ = serve_all
    # A caption guidance scale of its own shows that it travels through the services too.
    with Client(address, timeout=120) as client:
        remote = client.generate(PROMPT, n=2, seed=123, decoder_text_guidance_scale=3.0, **FAST_STEPS)
    local = asyncio.run(
        generate(
            local_stages_batched,
            GenerationParameters(prompt=PROMPT, n=2, seed=123, decoder_text_guidance_scale=3.0, **FAST_STEPS),
        )
    )
    assert [image.seed for image in remote] == [123, 124]
    for remote_image, local_image in zip(remote, local, strict=True):
        assert (remote_image.width, remote_image.height) == (128, 128)
        np.testing.assert_array_equal(np.asarray(remote_image.image), local_image.pixels)
        assert remote_image.png == local_image.png  # metadata included
    assert remote[0].metadata["prompt"] == PROMPT and remote[0].metadata["seed"] == 123


@pytest.mark.parametrize("name", PARAMETER_NAMES)
def test_each_parameter_gives_the_in_process_images_through_the_services(serve_all, local_stages_batched, name):
    """Each parameter at a value other than its default (which changes the images in-process,
    test_parameters) gives the same PNGs through `serve all`: no hop drops or alters it."""
    _, address, _ = serve_all
    expected, previews = generate_in_process(local_stages_batched, varied(name))
    prompt, parameters = as_keyword_arguments(varied(name))
    with Client(address, timeout=120) as client:
        events = list(client.generate_stream(prompt, **parameters))
    assert [image.png for image in events[-1]] == [image.png for image in expected]
    assert (
        sum(isinstance(event, Preview) for event in events)
        == previews
        == (BASE["decoder_steps"] if name == SENDS_PREVIEWS else 0)
    )


def test_batch_image_reproducible_alone_through_services(serve_all):
    _, address, _ = serve_all
    with Client(address, timeout=120) as client:
        batch = client.generate(PROMPT, n=3, seed=900, size=32, **FAST_STEPS)
        alone = client.generate(PROMPT, n=1, seed=902, size=32, **FAST_STEPS)
    np.testing.assert_array_equal(np.asarray(batch[2].image), np.asarray(alone[0].image))


def test_stream_reports_each_stage_then_images(serve_all):
    _, address, _ = serve_all

    async def collect():
        async with AsyncClient(address, timeout=120) as client:
            return [event async for event in client.generate_stream(PROMPT, seed=4, **FAST_STEPS)]

    events = asyncio.run(collect())
    progress = [event for event in events if isinstance(event, StageProgress)]
    assert [event.stage for event in progress] == ["encode", "prior", "decode", "upsample"]
    assert [event.completed for event in progress] == [1, 2, 3, 4] and progress[-1].total == 4
    assert isinstance(events[-1], list) and events[-1][0].seed == 4


def test_gateway_errors_carry_the_right_status(serve_all):
    _, address, _ = serve_all
    with Client(address, timeout=60, retries=0) as client:
        with pytest.raises(UnclipError) as info:
            client.generate(PROMPT, n=9)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(UnclipError) as info:
            client.generate(PROMPT, decoder_steps=5000)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "decoder service" in info.value.details
        with pytest.raises(UnclipError) as info:
            client.generate(PROMPT, size=48)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "[32, 128]" in info.value.details
        with pytest.raises(UnclipError) as info:  # an explicit 0 is refused, not taken for "unset"
            client.generate(PROMPT, prior_candidates=0)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "prior_candidates" in info.value.details
        with pytest.raises(UnclipError) as info:
            client.generate(PROMPT, decoder_text_guidance_scale=-1.0)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "text_guidance_scale" in info.value.details
        with pytest.raises(UnclipError) as info:
            client.generate(PROMPT, prior_steps=1000, decoder_steps=1000, timeout=1.0)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # A failed request leaves the chain usable.
        assert client.generate(PROMPT, seed=1, size=32, **FAST_STEPS)[0].width == 32


def test_http_api_is_served_next_to_grpc(serve_all):
    _, _, port = serve_all
    with urllib.request.urlopen(f"http://127.0.0.1:{port + 5}/healthz", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    body = json.dumps({"prompt": PROMPT, "size": "32x32", "response_format": "b64_json", "seed": 3}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port + 5}/v1/images/generations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        data = json.loads(response.read())["data"]
    assert len(data) == 1 and base64.b64decode(data[0]["b64_json"]).startswith(b"\x89PNG")


def test_every_process_counts_its_part_of_a_generation(serve_all):
    """One generation through serve all, seen in each process's metrics: the gateway's (at
    /metrics on its HTTP port) and each stage's (on its metrics port)."""
    _, address, port = serve_all
    processes = {"gateway": f"127.0.0.1:{port + 5}"}
    processes |= {stage.value: f"127.0.0.1:{stage.port_next_to(port + 5)}" for stage in Stage}
    before = {name: scrape(where) for name, where in processes.items()}
    with Client(address, timeout=120) as client:
        client.generate(PROMPT, seed=5, **FAST_STEPS)
    after = {name: scrape(where) for name, where in processes.items()}
    methods = {"gateway": "Generate", "encoder": "EncodeText", "prior": "Sample", "decoder": "Decode", "upsampler": "Upsample"}
    for name, method in methods.items():
        labels = dict(protocol="grpc", method=method, code="OK")
        assert value(after[name], "unclip_requests_total", **labels) - value(before[name], "unclip_requests_total", **labels) == 1
    for stage in Stage:
        samples = after[stage.value]
        assert value(samples, "unclip_model_load_seconds", stage=stage.value) > 0
        assert any(name == "unclip_build_info" and ("stage", stage.value) in labels for name, labels in samples)
    assert (
        value(after["gateway"], "unclip_images_generated_total", operation="generate")
        - value(before["gateway"], "unclip_images_generated_total", operation="generate")
        == 1
    )


def test_one_generation_is_one_trace_and_one_request_id_across_the_processes(serve_all):
    """Each of the five processes exports its spans over OTLP to the test's receiver and logs
    JSON lines; one generation is one trace, parented hop by hop, and one request id."""
    from unclip.v1 import images_pb2, images_pb2_grpc

    request = images_pb2.GenerateRequest(
        parameters=images_pb2.GenerationParameters(prompt=PROMPT, seed=9, size=128, **FAST_STEPS)
    )
    with grpc.insecure_channel(serve_all.address) as channel:
        _, call = images_pb2_grpc.ImageServiceStub(channel).Generate.with_call(
            request, metadata=[("x-request-id", "e2e-one-trace")], timeout=120
        )
    assert dict(call.trailing_metadata())["x-request-id"] == "e2e-one-trace"
    stages = {"encoder": "EncodeText", "prior": "Sample", "decoder": "Decode", "upsampler0": "Upsample"}

    def roots(spans):
        return [s for s in spans if s.name == "Generate" and s.attributes.get("unclip.request_id") == "e2e-one-trace"]

    def complete(spans):
        found = roots(spans)
        return bool(found) and sum(s.trace_id == found[0].trace_id for s in spans) >= 2 + 2 * len(stages)

    spans = serve_all.traces.wait_for(complete)
    (root,) = roots(spans)
    trace = [s for s in spans if s.trace_id == root.trace_id]
    assert root.parent_span_id == "" and root.service == "unclip-gateway"
    by_name = {s.name: s for s in trace}
    assert by_name["storage.save"].parent_span_id == root.span_id
    for stage, method in stages.items():
        hop, served = by_name[f"{stage}/{method}"], by_name[method]
        assert hop.parent_span_id == root.span_id and hop.service == "unclip-gateway", stage
        assert served.parent_span_id == hop.span_id, stage
        assert served.service == f"unclip-{stage.rstrip('0')}", stage
    # Every process's log line of this request carries its id and the trace's.
    lines = [line for line in serve_all.json_lines() if line.get("request_id") == "e2e-one-trace"]
    assert sorted(line["method"] for line in lines) == sorted(["Generate", *stages.values()])
    assert {line["trace_id"] for line in lines} == {root.trace_id}


def test_under_load_every_answered_request_is_stored(serve_all):
    """`unclip bench load`'s store check: every answered request has its record and the very
    PNGs the client got in S3; and the check notices a result that is not there."""
    from unclip.load_bench import check_store, run_load
    from unclip.storage import ResultStore, StorageConfig

    report = asyncio.run(run_load(serve_all.address, concurrency=4, requests=8, n=2, size=32, **FAST_STEPS))
    assert report.answered == 8 and not report.errors
    s3 = serve_all.s3
    store = ResultStore(StorageConfig(s3.endpoint, s3.access_key, s3.secret_key))
    asyncio.run(check_store(report, store))
    assert report.stored is not None
    assert report.stored["checked"] == 8 and report.stored["complete"] == 8, report.stored
    lost = next(iter(report.answers))
    s3.client().remove_object("unclip", store.key(lost, "record.json"))
    asyncio.run(check_store(report, store))
    assert report.stored["missing"] == [lost] and report.stored["complete"] == 7


def test_the_playground_in_a_browser(serve_all, tmp_path):
    """The page the gateway serves, in Debian's Chromium against `serve all`: generate with live
    previews, a variation, the interpolation slider, an edit with a painted mask, an error.
    Screenshots of each state are left under the test's temporary directory."""
    screenshots = tmp_path / "screenshots"
    with browser_page(screenshots) as page:
        playground_flow(page, f"http://127.0.0.1:{serve_all.port + 5}", screenshots)


def test_ctrl_c_stops_every_service(serve_all):
    process, _, port = serve_all
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("unclip serve all did not stop within 60 s of SIGINT")
    time.sleep(0.5)  # the reader thread takes the last lines
    output = "".join(serve_all.output)
    assert process.returncode == 0, output
    assert "stopping" in output
    # Nothing listens on any of the five ports any more.
    for service_port in range(port, port + 6):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", service_port)) != 0, f"port {service_port} still accepts connections"
