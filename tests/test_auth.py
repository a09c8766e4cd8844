"""Who may call the gateway: API keys (gateway.auth), per-key quotas (gateway.quotas) and the
`unclip keys` / `unclip serve --api-keys` command line, against a real gateway (gRPC and HTTP)
in front of a stage backend without models (tests/fake_stages.py), and once end to end through
`unclip serve all --api-keys`."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from conftest import FAST_STEPS
from fake_stages import FakeStages
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from servers import BackgroundServer, serve_all_process
from test_e2e import _free_port_block

from gateway.app import build_gateway
from gateway.auth import Access, KeysFile, KeysFileError, check_exposure, hash_key
from gateway.quotas import QuotaLimits, Quotas, charge_current
from unclip.cli import main as cli_main
from unclip.client import Client
from unclip.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from unclip.v1 import images_pb2, images_pb2_grpc


def create_key(path: Path, name: str, *flags: str, capsys: Any) -> str:
    """A key made by `unclip keys create` (what it prints on stdout)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["keys", "create", name, "--file", str(path), *flags])
    assert exit_info.value.code == 0
    return capsys.readouterr().out.strip()


@contextlib.contextmanager
def running_gateway(access: Access, stages: FakeStages | None = None) -> Iterator[tuple[BackgroundServer, str, int]]:
    """(its runner, gRPC address, HTTP port)."""
    stages = stages or FakeStages()
    runner = BackgroundServer(lambda: build_gateway(stages, host="127.0.0.1", port=0, http_port=0, storage=None, access=access))
    with runner as server:
        yield runner, server.address, int(server.metrics_address.rsplit(":", 1)[1])


def generate_request(n: int = 1) -> images_pb2.GenerateRequest:
    return images_pb2.GenerateRequest(parameters=images_pb2.GenerationParameters(prompt="a red circle", n=n, size=32, seed=1))


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def http_request(port: int, method: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, Any, Any]:
    """(status, headers, the JSON body or the text)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        connection.request(method, path, None if body is None else json.dumps(body).encode(), headers)
        response = connection.getresponse()
        data = response.read()
        try:
            return response.status, response.headers, json.loads(data)
        except ValueError:
            return response.status, response.headers, data.decode()
    finally:
        connection.close()


def retry_delay(error: grpc.RpcError) -> float:
    """The RetryInfo detail of a failed call's status, in seconds."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailing metadata"
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    raise AssertionError(f"no RetryInfo in {status}")


# -- the keys file and `unclip keys` -----------------------------------------------------------


def test_keys_cli_prints_a_key_once_and_stores_only_its_hash(tmp_path, capsys):
    path = tmp_path / "keys.json"
    key = create_key(path, "team-a", "--images-per-minute", "30", "--max-concurrent", "2", capsys=capsys)
    other = create_key(path, "team-b", capsys=capsys)
    assert key.startswith("uk_") and key != other
    text = path.read_text()
    assert key not in text and key.split("_", 2)[2] not in text  # neither the key nor its secret part
    assert hash_key(key) in text
    assert path.stat().st_mode & 0o077 == 0  # readable by its owner only
    [a, b] = KeysFile(path).read()
    assert (a.name, a.limits, b.name, b.limits) == ("team-a", QuotaLimits(30, 2), "team-b", QuotaLimits())

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["keys", "list", "--file", str(path)])
    listed = capsys.readouterr().out
    assert exit_info.value.code == 0 and "team-a" in listed and a.id in listed and "30" in listed
    assert key not in listed and hash_key(key) not in listed

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["keys", "create", "team-a", "--file", str(path)])
    assert exit_info.value.code == 1 and "already has a key named 'team-a'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["keys", "revoke", "team-a", "--file", str(path)])
    assert exit_info.value.code == 0
    assert [k.name for k in KeysFile(path).read()] == ["team-b"]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("not json", "not JSON"),
        ('{"keys": {}}', '"keys" list'),
        ('{"keys": [{"id": "0123456789ab", "name": "a", "sha256": "00"}]}', "sha256"),
        ('{"keys": [{"id": "0123456789ab", "name": "a", "sha256": "' + "0" * 64 + '", "images_per_minute": 0}]}', "positive"),
        ('{"keys": [{"id": "0123456789ab", "name": "a", "sha256": "' + "0" * 64 + '", "extra": 1}]}', "unknown fields"),
    ],
)
def test_a_bad_keys_file_is_refused_at_startup(tmp_path, text, problem):
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(KeysFileError, match=problem):
        Access.from_file(path)


def test_a_key_is_checked_against_its_hash(tmp_path, capsys):
    path = tmp_path / "keys.json"
    key = create_key(path, "a", capsys=capsys)
    access = Access.from_file(path)
    caller = access.identify({"authorization": f"bearer {key}"})  # the scheme in any case
    assert caller is not None and caller.name == "a"
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    for headers in ({}, {"authorization": key}, {"authorization": f"Bearer {tampered}"}, {"authorization": "Bearer x"}):
        with pytest.raises(Unauthenticated) as info:
            access.identify(headers)
        assert key not in str(info.value) and tampered not in str(info.value)


# -- gRPC and HTTP ------------------------------------------------------------------------------


def test_grpc_needs_a_key_and_health_stays_open(tmp_path, capsys):
    path = tmp_path / "keys.json"
    key = create_key(path, "a", capsys=capsys)
    wrong = "uk_000000000000_" + "x" * 43
    with running_gateway(Access.from_file(path)) as (_, address, _), grpc.insecure_channel(address) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        for metadata in (None, bearer(wrong), [("authorization", key)]):
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(generate_request(), metadata=metadata, timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert wrong not in info.value.details() and key not in info.value.details()
            assert dict(info.value.trailing_metadata())["x-request-id"]  # observed like any request
        with pytest.raises(grpc.RpcError) as info:  # streams too
            list(stub.GenerateStream(images_pb2.GenerateStreamRequest(parameters=generate_request().parameters), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(stub.Generate(generate_request(), metadata=bearer(key), timeout=30).images) == 1
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # The SDK sends its api_key; without it the call raises the matching unclip error.
        with Client(address, api_key=key, timeout=30) as client:
            assert len(client.generate("a red circle", size=32, seed=3)) == 1
        with Client(address, timeout=30) as client, pytest.raises(Unauthenticated):
            client.generate("a red circle", size=32)


def test_http_needs_a_key_in_openais_error_shape(tmp_path, capsys):
    path = tmp_path / "keys.json"
    key = create_key(path, "a", capsys=capsys)
    with running_gateway(Access.from_file(path)) as (_, _, port):
        body = {"prompt": "a red circle", "size": "32x32", "response_format": "b64_json"}
        for given in (None, "uk_000000000000_" + "y" * 43, "garbage"):
            status, headers, answer = http_request(port, "POST", "/v1/images/generations", body, key=given)
            assert status == 401 and headers["x-request-id"] and headers["WWW-Authenticate"].startswith("Bearer")
            assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["code"] == "invalid_api_key"
            assert given is None or given not in answer["error"]["message"]
        assert http_request(port, "POST", "/v1/unknown", {}, key=None)[0] == 401  # nothing is told without a key
        assert http_request(port, "GET", "/healthz")[0] == 200
        assert http_request(port, "GET", "/metrics")[0] == 200
        # What OpenAI's SDK sends as its api_key.
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert len(client.images.generate(prompt="a red circle", size="32x32", response_format="b64_json").data) == 1
        refused = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            refused.images.generate(prompt="a red circle", size="32x32", response_format="b64_json")
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


def test_keys_rotate_without_a_restart(tmp_path, capsys):
    path = tmp_path / "keys.json"
    first = create_key(path, "first", capsys=capsys)
    with running_gateway(Access.from_file(path)) as (_, address, port), grpc.insecure_channel(address) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        second = create_key(path, "second", capsys=capsys)  # added while it runs
        assert len(stub.Generate(generate_request(), metadata=bearer(second), timeout=30).images) == 1
        with pytest.raises(SystemExit):
            cli_main(["keys", "revoke", "second", "--file", str(path)])
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(generate_request(), metadata=bearer(second), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        body = {"prompt": "a red circle", "size": "32x32", "response_format": "b64_json"}
        assert http_request(port, "POST", "/v1/images/generations", body, key=second)[0] == 401
        # A file that stops parsing keeps the keys in force rather than locking everyone out.
        path.write_text("{ half a file")
        assert len(stub.Generate(generate_request(), metadata=bearer(first), timeout=30).images) == 1


# -- quotas -------------------------------------------------------------------------------------


def test_images_per_minute_refill_and_retry_after():
    now = [0.0]
    quotas = Quotas(clock=lambda: now[0])
    limits = QuotaLimits(images_per_minute=6)

    def generate(key: str, images: int) -> None:
        with quotas.admitted(key, limits, images):
            charge_current()  # what a request that generates does

    generate("a", 4)
    with pytest.raises(ResourceExhausted) as info:
        generate("a", 4)
    assert info.value.retry_after == pytest.approx(20.0)  # 2 images short, at 6 a minute
    with quotas.admitted("a", limits, 4):  # admitted: a request answered from storage never takes its images
        pass
    generate("b", 6)  # another key has its own bucket
    now[0] = 20.0
    generate("a", 4)
    with pytest.raises(InvalidArgument, match="more than this API key may make in a minute"):
        generate("a", 7)


def test_quotas_per_key_over_grpc_and_http(tmp_path, capsys):
    path = tmp_path / "keys.json"
    small = create_key(path, "small", "--images-per-minute", "2", capsys=capsys)
    other = create_key(path, "other", capsys=capsys)  # the gateway's default: 3 a minute
    access = Access.from_file(path, QuotaLimits(images_per_minute=3))
    with running_gateway(access) as (_, address, port), grpc.insecure_channel(address) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        assert len(stub.Generate(generate_request(n=2), metadata=bearer(small), timeout=30).images) == 2
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(generate_request(n=1), metadata=bearer(small), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "images per minute" in info.value.details()
        assert 1 <= retry_delay(info.value) <= 30  # a minute refills 2; one image back takes 30 s
        assert dict(info.value.trailing_metadata())["x-request-id"]  # kept beside the status details
        body = {"prompt": "a red circle", "size": "32x32", "response_format": "b64_json"}
        status, headers, answer = http_request(port, "POST", "/v1/images/generations", body, key=small)
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 30
        assert answer["error"]["code"] == "rate_limit_exceeded"
        # The other key is unaffected, and has the default limit.
        assert len(stub.Generate(generate_request(n=3), metadata=bearer(other), timeout=30).images) == 3
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(generate_request(n=1), metadata=bearer(other), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_concurrent_requests_per_key(tmp_path, capsys):
    path = tmp_path / "keys.json"
    one = create_key(path, "one", "--max-concurrent", "1", capsys=capsys)
    other = create_key(path, "other", capsys=capsys)
    stages = FakeStages()
    with (
        running_gateway(Access.from_file(path, QuotaLimits(max_concurrent=2)), stages) as (runner, address, _),
        grpc.insecure_channel(address) as channel,
    ):
        stub = images_pb2_grpc.ImageServiceStub(channel)
        runner.call_soon(stages.hold)
        first = stub.Generate.future(generate_request(), metadata=bearer(one), timeout=30)
        deadline = time.monotonic() + 10
        while not stages.calls and time.monotonic() < deadline:  # the first is in the stages
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(generate_request(), metadata=bearer(one), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 concurrent" in info.value.details()
        assert retry_delay(info.value) == 1.0
        others = [stub.Generate.future(generate_request(), metadata=bearer(other), timeout=30) for _ in range(2)]
        time.sleep(0.3)
        assert not any(f.done() for f in others)  # admitted, waiting in the stages: not refused
        runner.call_soon(stages.release)
        assert [len(f.result().images) for f in (first, *others)] == [1, 1, 1]


# -- serving beyond loopback ------------------------------------------------------------------


def test_check_exposure():
    check_exposure("127.0.0.1", None, False)
    check_exposure("::1", None, False)
    check_exposure("localhost", None, False)
    check_exposure("0.0.0.0", "keys.json", False)
    check_exposure("0.0.0.0", None, True)
    for host in ("0.0.0.0", "10.1.2.3", "::", "gateway.example.com"):
        with pytest.raises(ValueError, match="without API keys"):
            check_exposure(host, None, False)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without API keys"),
        (["--images-per-minute", "5"], "per API key"),
        (["--api-keys", "/nonexistent/keys.json"], "cannot read the keys file"),
    ],
)
def test_serve_gateway_refuses_with_exit_2(flags, message):
    stages = [arg for stage in ("encoder", "prior", "decoder", "upsampler") for arg in (f"--{stage}", "127.0.0.1:1")]
    result = subprocess.run(
        [sys.executable, "-m", "unclip", "serve", "gateway", *stages, *flags],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_serve_all_and_ray_hand_the_keys_to_their_gateway(tmp_path, capsys):
    """`serve all` starts its gateway with the same keys and quotas; `serve ray` puts them in
    the gateway app's args and refuses proxies beyond loopback without keys."""
    from unclip.cli import auth_flags, build_parser
    from unclip.launcher import LocalCluster
    from unclip.ray_apps import GatewayArgs, load_config

    path = tmp_path / "keys.json"
    create_key(path, "a", capsys=capsys)
    args = build_parser().parse_args(["serve", "all", "--api-keys", str(path), "--images-per-minute", "5"])
    auth_flags.check_serve_flags(args)
    gateway = LocalCluster(gateway_flags=auth_flags.gateway_args(args)).services[-1]
    assert gateway.args[-4:] == ["--api-keys", str(path.resolve()), "--images-per-minute", "5"]
    again = build_parser().parse_args(gateway.args)  # what the gateway process is started with
    assert again.target == "gateway" and auth_flags.keys_file(again) == path.resolve() and again.images_per_minute == 5

    ray_args = build_parser().parse_args(["serve", "ray", "--api-keys", str(path), "--max-concurrent-per-key", "3"])
    config = load_config()
    config["http_options"]["host"] = "0.0.0.0"
    auth_flags.configure_ray(config, ray_args)
    (app,) = [app for app in config["applications"] if app["name"] == "gateway"]
    parsed = GatewayArgs.model_validate(app["args"])
    assert (parsed.api_keys_file, parsed.max_concurrent_per_key) == (str(path.resolve()), 3)
    open_args = build_parser().parse_args(["serve", "ray"])
    with pytest.raises(ValueError, match="without API keys"):
        auth_flags.configure_ray(load_config() | {"http_options": {"host": "0.0.0.0", "port": 8000}}, open_args)
    auth_flags.configure_ray(load_config(), open_args)  # loopback, as shipped: fine


# -- `unclip serve all --api-keys`, end to end -------------------------------------------------


@pytest.mark.slow
def test_serve_all_enforces_its_keys_across_its_processes(tmp_path):
    """One `serve all --api-keys FILE` (five processes), a key made by the CLI: the gateway
    process refuses gRPC and HTTP calls without it before any stage works, answers with it
    through the four stage processes, and keeps health checks open."""
    path = tmp_path / "keys.json"
    made = subprocess.run([sys.executable, "-m", "unclip", "keys", "create", "e2e", "--file", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode == 0, made.stderr
    (key,) = made.stdout.split()
    assert key.startswith("uk_")
    port = _free_port_block(10)
    args = ["--http-port", str(port + 5), "--metrics-port", str(port + 5), "--api-keys", str(path)]
    with serve_all_process(args, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        # Health needs no key (serve_all_process has waited on it without one, too).
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = images_pb2_grpc.ImageServiceStub(channel)
        for metadata in (None, bearer("uk_000000000000_" + "z" * 43)):
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(generate_request(), metadata=metadata, timeout=60)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(f"127.0.0.1:{port}", api_key=key, timeout=120) as client:
            images = client.generate("a red circle", size=32, seed=5, **FAST_STEPS)
        assert len(images) == 1 and images[0].width == 32 and images[0].png.startswith(b"\x89PNG")

        body = {"prompt": "a red circle", "size": "32x32", "response_format": "b64_json", "seed": 5, **FAST_STEPS}
        status, headers, answer = http_request(port + 5, "POST", "/v1/images/generations", body)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["code"] == "invalid_api_key"
        status, _, answer = http_request(port + 5, "POST", "/v1/images/generations", body, key=key)
        assert status == 200, answer
        assert len(answer["data"]) == 1 and base64.b64decode(answer["data"][0]["b64_json"]).startswith(b"\x89PNG")
        assert http_request(port + 5, "GET", "/healthz")[0] == 200

        # The command line: `unclip generate --server` with the key in $UNCLIP_API_KEY, and without it.
        argv = [sys.executable, "-m", "unclip", "generate", "a red circle", "--server", f"127.0.0.1:{port}", "--size", "32",
                "--seed", "5", "--steps", "2", "--out", str(tmp_path / "out")]  # fmt: skip
        refused = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_without_key())
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_without_key() | {"UNCLIP_API_KEY": key})
        assert done.returncode == 0, done.stderr
        assert len(list((tmp_path / "out").glob("*.png"))) == 1


def _without_key() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name != "UNCLIP_API_KEY"}
