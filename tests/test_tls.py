"""TLS: `unclip certs init`, stages that accept only the gateway's client certificate (mutual TLS,
real handshakes on 127.0.0.1), the gateway over TLS toward the stages and on its public gRPC and
HTTP endpoints, health checks, the SDK and the CLI's TLS options, and `serve all --tls-dir`."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import os
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import partial

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from servers import BackgroundServer

from gateway.app import build_gateway
from gateway.remote import GrpcTransport, RemoteStages
from unclip import certs
from unclip.cli import main
from unclip.client import Client
from unclip.errors import Unavailable
from unclip.launcher import LocalCluster, check_health, free_port
from unclip.serving import stage_server
from unclip.stage import GATEWAY, SERVICE_NAMES, Stage
from unclip.tls import GATEWAY_CLIENT, GATEWAY_SERVER, CertificateDirectory, TlsFiles, channel_credentials
from unclip.transport import GRPC_OPTIONS
from unclip.v1 import encoder_pb2, encoder_pb2_grpc

TINY = dict(prior_steps=2, decoder_steps=2, upsampler_steps=1, size=32)


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory) -> CertificateDirectory:
    path = tmp_path_factory.mktemp("tls") / "certs"
    certs.init(path, ["unclip.example", "10.1.2.3"])
    return CertificateDirectory(path)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> CertificateDirectory:
    """A second development CA: its certificates look right but are signed by the wrong CA."""
    path = tmp_path_factory.mktemp("other") / "certs"
    certs.init(path)
    return CertificateDirectory(path)


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# -- unclip certs init -----------------------------------------------------------------------


def test_certs_init_writes_a_ca_and_a_certificate_per_role(tmp_path, capsys):
    directory = tmp_path / "dev"
    assert main_exit(["certs", "init", str(directory), "--host", "gpu-box.internal", "--host", "10.0.0.7"]) == 0
    printed = capsys.readouterr().out
    files = CertificateDirectory(directory)
    names = [*SERVICE_NAMES, GATEWAY_CLIENT, GATEWAY_SERVER]
    assert files.missing(names) == []
    for path in [files.ca, directory / "ca.key", *(p for name in names for p in files.pair(name))]:
        assert str(path) in printed
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644), (path, oct(mode))

    ca = _cert(files.ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.UTC)
    for name in names:
        cert = _cert(files.pair(name)[0])
        cert.verify_directly_issued_by(ca)
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        # Each certificate for one use: a stage's server certificate cannot call another stage.
        assert usages == [ExtendedKeyUsageOID.CLIENT_AUTH if name == GATEWAY_CLIENT else ExtendedKeyUsageOID.SERVER_AUTH]
        if name != GATEWAY_CLIENT:
            names_in = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert names_in.get_values_for_type(x509.DNSName) == ["localhost", "gpu-box.internal"]
            assert names_in.get_values_for_type(x509.IPAddress) == [
                ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.7")
            ]


def test_certs_init_refuses_to_overwrite_unless_forced(tmp_path, capsys):
    directory = tmp_path / "dev"
    assert main_exit(["certs", "init", str(directory)]) == 0
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    capsys.readouterr()
    assert main_exit(["certs", "init", str(directory)]) == 1
    error = capsys.readouterr().err
    assert "--force" in error and "ca.key" in error
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before
    (directory / "prior.key").chmod(0o644)  # a key someone loosened is tightened again when replaced
    assert main_exit(["certs", "init", str(directory), "--force"]) == 0
    assert (directory / "ca.crt").read_bytes() != before["ca.crt"]
    assert stat.S_IMODE((directory / "prior.key").stat().st_mode) == 0o600


def main_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return int(exited.value.code or 0)


# -- a stage serving mutual TLS, over real handshakes ----------------------------------------


@pytest.fixture(scope="module")
def tls_encoder(cert_dir):
    credentials = cert_dir.stage_server("encoder").server_credentials()
    with BackgroundServer(lambda: stage_server(Stage.ENCODER, host="127.0.0.1", port=0, credentials=credentials)) as server:
        yield server.address


def _health_code(address: str, channel: grpc.Channel) -> grpc.StatusCode:
    with channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_a_stage_accepts_only_the_gateways_client_certificate(tls_encoder, cert_dir, other_ca):
    address = tls_encoder
    secure = partial(grpc.secure_channel, address, options=GRPC_OPTIONS)
    encoder_cert, encoder_key = cert_dir.pair("encoder")
    refused = {
        "plaintext": grpc.insecure_channel(address),
        "TLS without a client certificate": secure(channel_credentials(ca=cert_dir.ca)),
        # Signed by the right CA, but for server authentication only.
        "another stage's server certificate": secure(channel_credentials(ca=cert_dir.ca, cert=encoder_cert, key=encoder_key)),
        "a client certificate of another CA": secure(
            channel_credentials(ca=cert_dir.ca, cert=other_ca.pair(GATEWAY_CLIENT)[0], key=other_ca.pair(GATEWAY_CLIENT)[1])
        ),
    }
    # gRPC reports a failed handshake as UNAVAILABLE: the call never reached the service.
    assert {how: _health_code(address, channel) for how, channel in refused.items()} == dict.fromkeys(
        refused, grpc.StatusCode.UNAVAILABLE
    )
    gateway = cert_dir.gateway_client().channel_credentials()
    assert _health_code(address, secure(gateway)) == grpc.StatusCode.OK
    with secure(gateway) as channel:
        reply = encoder_pb2_grpc.ClipEncoderServiceStub(channel).EncodeText(
            encoder_pb2.EncodeTextRequest(texts=["a red circle"]), timeout=30
        )
    assert reply.text_embeddings.shape[0] == 1

    # The health check `serve all` and the tests use, over TLS.
    assert check_health(address, credentials=cert_dir.gateway_client().channel_credentials())
    assert not check_health(address)
    assert not check_health(address, credentials=channel_credentials(ca=cert_dir.ca))


# -- the gateway: TLS toward the stages and on its public endpoints --------------------------


@pytest.fixture(scope="module")
def tls_stages(cert_dir):
    """The four stages, each serving mutual TLS with its own certificate; {stage: address}."""
    contexts, addresses = [], {}
    try:
        for stage in Stage:
            credentials = cert_dir.stage_server(stage.value).server_credentials()
            context = BackgroundServer(lambda s=stage, c=credentials: stage_server(s, host="127.0.0.1", port=0, credentials=c))
            addresses[stage] = context.__enter__().address
            contexts.append(context)
        yield addresses
    finally:
        for context in contexts:
            context.__exit__(None, None, None)


def _gateway(addresses, stage_tls: TlsFiles | None, public_tls: TlsFiles | None, http_port: int | None = None, **options):
    def make():
        credentials = None if stage_tls is None else stage_tls.channel_credentials()
        backend = RemoteStages(
            addresses[Stage.ENCODER], addresses[Stage.PRIOR], addresses[Stage.DECODER], [addresses[Stage.UPSAMPLER]],
            transport=partial(GrpcTransport, credentials=credentials),
        )  # fmt: skip
        return build_gateway(backend, host="127.0.0.1", port=0, http_port=http_port, storage=None, tls=public_tls)

    return BackgroundServer(make, **options)


def test_the_gateway_calls_tls_stages_and_serves_tls(tls_stages, cert_dir, local_stages):
    with _gateway(tls_stages, cert_dir.gateway_client(), cert_dir.gateway_server(), http_port=0) as server:
        # The SDK trusts the development CA for the gateway's certificate; no client certificate.
        with Client(server.address, timeout=120, credentials=channel_credentials(ca=cert_dir.ca)) as client:
            (image,) = client.generate("a red circle", seed=3, **TINY)
        assert image.image.size == (32, 32)
        with Client(server.address, timeout=5, retries=0) as plaintext, pytest.raises(Unavailable):
            plaintext.generate("a red circle", seed=3, **TINY)
        assert check_health(server.address, credentials=channel_credentials(ca=cert_dir.ca))
        assert not check_health(server.address)

        # The HTTP API on the same certificate.
        http = server.metrics_address  # the HTTP API's host:port
        context = ssl.create_default_context(cafile=str(cert_dir.ca))
        with urllib.request.urlopen(f"https://{http}/healthz", context=context, timeout=10) as response:
            assert response.status == 200
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://{http}/healthz", timeout=10)


def test_a_gateway_without_the_client_certificate_cannot_reach_the_stages(tls_stages, cert_dir):
    """Stages refuse the gateway's plaintext channels at the handshake: it never turns SERVING."""
    context = _gateway(tls_stages, None, None, wait_ready=False)
    with context as server:
        with pytest.raises(TimeoutError):
            context.wait_ready(timeout=8)
        assert not check_health(server.address)


def test_the_gateways_public_endpoint_can_require_client_certificates(tls_stages, cert_dir):
    public = TlsFiles(*cert_dir.pair(GATEWAY_SERVER), ca=cert_dir.ca)
    with _gateway(tls_stages, cert_dir.gateway_client(), public) as server:
        assert not check_health(server.address, credentials=channel_credentials(ca=cert_dir.ca))
        client_cert = cert_dir.gateway_client()
        assert check_health(server.address, credentials=client_cert.channel_credentials())


# -- flags of `unclip serve`, `unclip generate` and `serve all`'s wiring ---------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "prior", "--tls-cert", "a.crt", "--tls-key", "a.key"], "--tls-ca"),
        (["serve", GATEWAY, "--stage-tls-cert", "c.crt", "--stage-tls-ca", "ca.crt"], "--stage-tls-key"),
        (["serve", GATEWAY, "--tls-ca", "ca.crt"], "--tls-cert"),
        (["serve", "prior", "--stage-tls-cert", "c.crt"], "gateway's"),
        (["serve", "prior", "--tls-dir", "certs"], "serve all"),
        (["serve", "all", "--tls-cert", "a.crt", "--tls-key", "a.key"], "--tls-dir"),
        (["serve", "ray", "--tls-cert", "a.crt", "--tls-key", "a.key", "--tls-ca", "ca.crt"], "client certificates"),
    ],
)
def test_serve_refuses_tls_flags_that_do_not_go_together(argv, message, capsys):
    assert main_exit(argv) == 2
    assert message in capsys.readouterr().err


def test_serve_all_wires_every_process_from_a_certificate_directory(cert_dir):
    cluster = LocalCluster(host="0.0.0.0", gateway_port=free_port(), tls_dir=cert_dir.path)
    *stages, gateway = cluster.services
    for service in stages:
        cert, key = cert_dir.pair(service.name)
        assert (
            _flags(service.args).items() >= {"--tls-cert": str(cert), "--tls-key": str(key), "--tls-ca": str(cert_dir.ca)}.items()
        )
        assert service.address.startswith("127.0.0.1:")  # a certificate names no wildcard address
        assert service.credentials is not None
    client_cert, client_key = cert_dir.pair(GATEWAY_CLIENT)
    public_cert, public_key = cert_dir.pair(GATEWAY_SERVER)
    assert _flags(gateway.args).items() >= {
        "--stage-tls-cert": str(client_cert), "--stage-tls-key": str(client_key), "--stage-tls-ca": str(cert_dir.ca),
        "--tls-cert": str(public_cert), "--tls-key": str(public_key), "--encoder": stages[0].address,
    }.items()  # fmt: skip
    assert gateway.credentials is not None
    plain = LocalCluster(gateway_port=free_port())
    assert all(service.credentials is None and "--tls-cert" not in service.args for service in plain.services)


def _flags(args: list[str]) -> dict[str, str]:
    """Each --flag of a command line with the value after it."""
    return {flag: value for flag, value in itertools.pairwise(args) if flag.startswith("--")}


def test_generate_takes_tls_options_for_its_gateway(tls_stages, cert_dir, tmp_path, capsys):
    with _gateway(tls_stages, cert_dir.gateway_client(), cert_dir.gateway_server()) as server:
        out = tmp_path / "out"
        argv = ["generate", "a blue square", "--server", server.address, "--tls-ca", str(cert_dir.ca), "--out", str(out)]
        assert main_exit([*argv, "--seed", "4", "--steps", "2", "--size", "32"]) == 0
        (png,) = out.glob("*.png")
        assert Image.open(png).size == (32, 32)
        capsys.readouterr()
        # Without --tls-ca the client speaks plaintext to a TLS endpoint: the call fails, one line.
        assert main_exit([*argv[:4], "--out", str(out), "--timeout", "5", "--steps", "2", "--size", "32"]) == 1
        assert "unclip:" in capsys.readouterr().err
    assert main_exit(["generate", "x", "--tls-ca", str(cert_dir.ca), "--steps", "1"]) == 1
    assert "--server" in capsys.readouterr().err


# -- `unclip serve all --tls-dir` end to end ----------------------------------------------------


@pytest.mark.slow
def test_serve_all_over_tls_end_to_end(cert_dir, tmp_path):
    """Five processes on mutual TLS: healthy over TLS, an image through the SDK and the CLI, and
    each stage's port refuses a caller without the gateway's certificate."""
    port = free_port()
    with LocalCluster(
        gateway_port=port, stage_ports={s: free_port() for s in Stage}, tls_dir=cert_dir.path, quiet=True
    ) as cluster:
        with Client(cluster.gateway_address, timeout=120, credentials=channel_credentials(ca=cert_dir.ca)) as client:
            (image,) = client.generate("a red circle", seed=1, **TINY)
        assert image.image.size == (32, 32)
        for service in cluster.services[:-1]:
            assert check_health(service.address, credentials=cert_dir.gateway_client().channel_credentials())
            assert not check_health(service.address, credentials=channel_credentials(ca=cert_dir.ca))
        result = subprocess.run(
            [sys.executable, "-m", "unclip", "generate", "a red circle", "--server", cluster.gateway_address,
             "--tls-ca", str(cert_dir.ca), "--out", str(tmp_path), "--steps", "2", "--size", "32", "--seed", "1"],
            capture_output=True, text=True, timeout=180, env=os.environ,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert len(list(tmp_path.glob("*.png"))) == 1


@pytest.mark.slow
def test_serve_all_tls_generates_a_ca_and_removes_it(tmp_path):
    port, http_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "unclip", "serve", "all", "--tls", "--port", str(port), "--http-port", str(http_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert "--tls-ca " in first, first
        ca = first.rsplit("--tls-ca ", 1)[1].strip()
        deadline = time.monotonic() + 240
        while not check_health(f"127.0.0.1:{port}", 1.0, channel_credentials(ca=ca)):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        context = ssl.create_default_context(cafile=ca)
        with urllib.request.urlopen(f"https://127.0.0.1:{http_port}/healthz", context=context, timeout=10) as response:
            assert json.loads(response.read()) == {"status": "ok"}
    finally:
        process.terminate()
        process.wait(timeout=90)
    assert process.returncode == 0
    assert not os.path.exists(ca)
