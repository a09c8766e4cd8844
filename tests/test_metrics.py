"""Prometheus metrics: scraped over HTTP from a stage service's metrics port and from the
gateway's /metrics, parsed with prometheus_client's parser, compared before and after calls.
Metrics are per process and other tests share this one, so every check is a delta on labels
only this test touches, or a value it sets."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from scrape import scrape, value
from servers import BackgroundServer

from gateway.app import build_gateway
from unclip import __version__, codec
from unclip.launcher import free_port
from unclip.serving import stage_server
from unclip.stage import Stage
from unclip.v1 import decoder_pb2, decoder_pb2_grpc, sampling_pb2

pytestmark = pytest.mark.slow


def test_a_stage_service_serves_its_metrics():
    with BackgroundServer(lambda: stage_server(Stage.DECODER, metrics_port=0)) as server:
        assert server.metrics_address is not None
        before = scrape(server.metrics_address)
        with grpc.insecure_channel(server.address) as channel:
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            embedding = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
            request = decoder_pb2.DecodeRequest(
                image_embeddings=codec.from_numpy(embedding), seeds=[1], guidance_scale=1.0,
                sampling=sampling_pb2.SamplingOptions(steps=3),
            )  # fmt: skip
            stub.Decode(request, timeout=60)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Decode(decoder_pb2.DecodeRequest(image_embeddings=codec.from_numpy(embedding), seeds=[]), timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after = scrape(server.metrics_address)
        version = server.servicer.engine.version

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("unclip_requests_total", protocol="grpc", method="Decode", code="OK") == 1
    assert delta("unclip_requests_total", protocol="grpc", method="Decode", code="INVALID_ARGUMENT") == 1
    assert delta("unclip_request_duration_seconds_count", protocol="grpc", method="Decode") == 2
    # One image, unguided: three steps of one row each.
    assert delta("unclip_network_call_rows_count", stage="decoder") == 3
    assert delta("unclip_network_call_rows_sum", stage="decoder") == 3
    assert value(after, "unclip_stage_queue_depth", stage="decoder") == 0
    assert value(after, "unclip_model_load_seconds", stage="decoder") > 0
    assert value(after, "unclip_build_info", version=__version__, stage="decoder", weights=version) == 1


def test_the_gateway_counts_http_requests_images_and_stages(local_stages):
    http_port = free_port()
    with BackgroundServer(lambda: build_gateway(local_stages, host="127.0.0.1", port=0, http_port=http_port, storage=None)):
        address = f"127.0.0.1:{http_port}"
        before = scrape(address)
        body = {"prompt": "a red circle", "n": 2, "size": "32x32", "seed": 3, "response_format": "b64_json",
                "prior_steps": 2, "decoder_steps": 2}  # fmt: skip
        post = urllib.request.Request(
            f"http://{address}/v1/images/generations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(post, timeout=120) as response:
            assert len(json.loads(response.read())["data"]) == 2
        for path, data, status in (("/v1/images/generations", b'{"prompt": "x", "n": 0}', 400), ("/nowhere", None, 404)):
            request = urllib.request.Request(f"http://{address}{path}", data, {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(request, timeout=30)
            assert error.value.code == status
        after = scrape(address)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "POST /v1/images/generations"
    assert delta("unclip_requests_total", protocol="http", method=route, code="200") == 1
    assert delta("unclip_requests_total", protocol="http", method=route, code="400") == 1
    assert delta("unclip_requests_total", protocol="http", method="unmatched", code="404") == 1
    assert delta("unclip_request_duration_seconds_count", protocol="http", method=route) == 2
    assert delta("unclip_images_generated_total", operation="generate") == 2
    for stage in ("encoder", "prior", "decoder"):  # 32 px is the decoder's size: no upsampler
        assert delta("unclip_stage_duration_seconds_count", stage=stage) == 1, stage
    assert value(after, "unclip_requests_in_flight", protocol="http") == 1  # the scrape itself


def test_metrics_port_is_refused_where_it_would_be_ignored():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "unclip", "serve", "gateway", "--metrics-port", "9100"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "/metrics on its HTTP port" in done.stderr


def test_processes_sharing_cores_spin_briefly(monkeypatch):
    from unclip.launcher import shared_cores_environment

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert shared_cores_environment()["GOMP_SPINCOUNT"] == "1000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "50")
    assert shared_cores_environment()["GOMP_SPINCOUNT"] == "50"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert "GOMP_SPINCOUNT" not in shared_cores_environment()
