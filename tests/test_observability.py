"""Request ids, traces and logs across real gRPC hops: the four stage services and the gateway,
each a grpc.aio server on 127.0.0.1 in this process (on loops of their own, so nothing but the
metadata carries a request from one to the next), and one stage as its own process for the
command line's JSON logs."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import grpc
import pytest
from conftest import FAST_STEPS
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from servers import BackgroundServer

from gateway.app import build_gateway
from gateway.remote import RemoteStages
from unclip import observe, tracing
from unclip.launcher import check_health, free_port
from unclip.serving import stage_server
from unclip.stage import Stage
from unclip.v1 import images_pb2, images_pb2_grpc, prior_pb2, prior_pb2_grpc

pytestmark = pytest.mark.slow

PROMPT = "a red circle in the top left corner"
HEX_ID = re.compile(r"[0-9a-f]{32}")
# The RPC each stage answers in a 128 px generation, by the stage's instance name.
STAGE_METHODS = {"encoder": "EncodeText", "prior": "Sample", "decoder": "Decode", "upsampler0": "Upsample"}


@pytest.fixture(scope="module")
def gateway_address():
    with ExitStack() as stack:
        stages = {stage: stack.enter_context(BackgroundServer(lambda s=stage: stage_server(s))) for stage in Stage}

        def make_gateway():
            backend = RemoteStages(*(stages[s].address for s in (Stage.ENCODER, Stage.PRIOR, Stage.DECODER)),
                                   [stages[Stage.UPSAMPLER].address])  # fmt: skip
            return build_gateway(backend, host="127.0.0.1", port=0, http_port=None, storage=None)

        yield stack.enter_context(BackgroundServer(make_gateway)).address


@pytest.fixture
def spans():
    """Tracing on for one test, into memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider, set_global=False)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)


def _request(**fields) -> images_pb2.GenerateRequest:
    parameters = dict(prompt=PROMPT, seed=4, size=128, **FAST_STEPS) | fields
    return images_pb2.GenerateRequest(parameters=images_pb2.GenerationParameters(**parameters))


def _finished(exporter: InMemorySpanExporter, count: int) -> list:
    """The finished spans once there are `count`: a server ends its span just after answering."""
    deadline = time.monotonic() + 10
    while len(finished := exporter.get_finished_spans()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(finished)


def _trailing_request_id(metadata) -> str:
    return dict(metadata)[observe.REQUEST_ID_HEADER]


def test_every_answer_carries_the_request_id(gateway_address):
    with grpc.insecure_channel(gateway_address) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        _, call = stub.Generate.with_call(_request(), metadata=[("x-request-id", "order-17/a")], timeout=120)
        assert _trailing_request_id(call.trailing_metadata()) == "order-17/a"
        _, call = stub.Generate.with_call(_request(), timeout=120)  # none given: one is made up
        assert HEX_ID.fullmatch(_trailing_request_id(call.trailing_metadata()))
        with pytest.raises(grpc.RpcError) as refused:  # errors carry it too
            stub.Generate(_request(n=9), metadata=[("x-request-id", "bad-n")], timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _trailing_request_id(refused.value.trailing_metadata()) == "bad-n"
        # An id that would corrupt log lines is replaced, not echoed.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(_request(n=9), metadata=[("x-request-id", "two words")], timeout=60)
        assert HEX_ID.fullmatch(_trailing_request_id(refused.value.trailing_metadata()))


def test_the_sdk_names_the_request_id_of_a_failed_call(gateway_address):
    from unclip.client import Client, UnclipError

    with Client(gateway_address, timeout=60, retries=0) as client, pytest.raises(UnclipError) as failed:
        client.generate(PROMPT, n=9)
    assert failed.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert HEX_ID.fullmatch(failed.value.request_id) and f"[request id {failed.value.request_id}]" in str(failed.value)


def test_the_request_id_reaches_every_stage_and_ends_each_log_line(gateway_address, caplog):
    caplog.set_level(logging.INFO, logger="unclip.requests")
    with grpc.insecure_channel(gateway_address) as channel:
        images_pb2_grpc.ImageServiceStub(channel).Generate(_request(), metadata=[("x-request-id", "follow-me")], timeout=120)
    lines = [r for r in caplog.records if r.name == "unclip.requests" and r.request_id == "follow-me"]
    assert sorted(r.method for r in lines) == sorted(["Generate", *STAGE_METHODS.values()])
    for record in lines:
        assert record.status == "OK" and record.protocol == "grpc" and record.duration_ms > 0


def test_one_generation_is_one_trace_parented_across_the_hops(gateway_address, spans):
    caller = tracing.tracer().start_span("caller")  # the client's own span, as an instrumented client has
    carrier: dict[str, str] = {}
    from opentelemetry import trace

    propagate.inject(carrier, context=trace.set_span_in_context(caller))
    with grpc.insecure_channel(gateway_address) as channel:
        images_pb2_grpc.ImageServiceStub(channel).Generate(_request(), metadata=list(carrier.items()), timeout=120)
    caller.end()
    finished = _finished(spans, 2 + 2 * len(STAGE_METHODS))
    trace_id = caller.get_span_context().trace_id
    assert {s.context.trace_id for s in finished} == {trace_id}
    by_name = {s.name: s for s in finished}
    gateway = by_name["Generate"]
    assert gateway.kind == SpanKind.SERVER and gateway.parent.span_id == caller.get_span_context().span_id
    for stage, method in STAGE_METHODS.items():
        hop, served = by_name[f"{stage}/{method}"], by_name[method]
        assert hop.kind == SpanKind.CLIENT and hop.parent.span_id == gateway.context.span_id, stage
        assert served.kind == SpanKind.SERVER and served.parent.span_id == hop.context.span_id, stage
        assert served.attributes["rpc.grpc.status_code"] == "OK"
    assert len(finished) == 2 + 2 * len(STAGE_METHODS)  # the caller, the gateway, each hop and stage: nothing twice


def test_a_failed_hop_marks_its_spans(gateway_address, spans):
    with grpc.insecure_channel(gateway_address) as channel, pytest.raises(grpc.RpcError) as refused:
        images_pb2_grpc.ImageServiceStub(channel).Generate(_request(decoder_steps=5000), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Gateway and decoder server spans, the decoder hop; the encoder and prior ran before it.
    by_name = {s.name: s for s in _finished(spans, 7)}
    # The caller's mistake: recorded on the server spans, not a server error.
    assert by_name["Generate"].attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    assert by_name["Generate"].status.status_code != StatusCode.ERROR
    assert by_name["Decode"].attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    # The gateway's hop saw its call fail.
    assert by_name["decoder/Decode"].status.status_code == StatusCode.ERROR


def test_without_tracing_only_the_request_id_is_forwarded():
    assert not tracing.enabled()
    with observe.observed_request("grpc", "Probe", {"x-request-id": "r1"}):
        assert observe.forwarded() == [("x-request-id", "r1")]
    assert observe.current_request_id() is None


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
    ],
)
def test_the_otel_variables_turn_tracing_on(environ, exporters):
    assert tracing.requested(environ) == exporters


def test_tracing_settings_it_cannot_honour_stop_the_process():
    env = os.environ | {"OTEL_TRACES_EXPORTER": "jaeger"}
    done = subprocess.run([sys.executable, "-m", "unclip", "serve", "prior"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "OTEL_TRACES_EXPORTER: unsupported exporter jaeger" in done.stderr
    env = os.environ | {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    done = subprocess.run([sys.executable, "-m", "unclip", "serve", "prior"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unsupported protocol 'http/json'" in done.stderr


def test_a_stage_process_logs_json_lines_with_request_and_trace_ids(tmp_path):
    port = free_port()
    # The console exporter prints spans on stdout; the logs go to stderr.
    env = os.environ | {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "prior-under-test"}
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "unclip", "serve", "prior", "--port", str(port), "--log-format", "json"],
            stdout=out, stderr=err, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not check_health(f"127.0.0.1:{port}", timeout=1.0):
                assert process.poll() is None, (tmp_path / "err").read_text()
                assert time.monotonic() < deadline, "the prior service did not become healthy in 120 s"
                time.sleep(0.3)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                prior_pb2_grpc.PriorServiceStub(channel).GetPriorInfo(
                    prior_pb2.GetPriorInfoRequest(), metadata=[("x-request-id", "json-line-1")], timeout=30
                )
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    lines = [json.loads(line) for line in (tmp_path / "err").read_text().splitlines() if line.strip()]  # every line is JSON
    (request,) = [line for line in lines if line.get("request_id") == "json-line-1"]
    assert request["logger"] == "unclip.requests" and request["level"] == "INFO"
    assert request["method"] == "GetPriorInfo" and request["status"] == "OK" and request["duration_ms"] >= 0
    assert HEX_ID.fullmatch(request["trace_id"])
    spans_printed = (tmp_path / "out").read_text()
    assert f'"trace_id": "0x{request["trace_id"]}"' in spans_printed and "prior-under-test" in spans_printed
