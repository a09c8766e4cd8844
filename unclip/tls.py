"""TLS for unclip's gRPC servers and channels: credentials from PEM files, and the layout of a
certificate directory written by `unclip certs init` (`unclip.certs`).

Stages serve mutual TLS: a stage started with a certificate, a key and a CA accepts only callers
that present a certificate signed by that CA, the gateway's client certificate; anyone else is
refused during the handshake, before any RPC. The gateway serves its public endpoint with its own
certificate, server-side only unless it is given a CA too.

Only grpc and the standard library: the SDK uses `channel_credentials` (no torch, no server
dependencies).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

# Names in a `unclip certs init` directory. The stages' names are unclip.stage.SERVICE_NAMES.
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
GATEWAY_CLIENT = "gateway-client"  # the gateway's certificate toward the stages (client auth)
GATEWAY_SERVER = "gateway"  # the gateway's public endpoint (server auth)


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: this side's certificate chain and private key, and the CA it trusts (for a
    server: the CA callers' certificates must be signed by; for a channel: the CA of the server's
    certificate). Any of them may be None where the side needs none."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for `add_secure_port`: with a CA, callers must present a certificate it
        signed (mutual TLS); without one, server-side TLS only."""
        if self.cert is None or self.key is None:
            raise ValueError("a TLS server needs a certificate and its key")
        key, cert = _read(self.key), _read(self.cert)
        assert key is not None and cert is not None
        ca = _read(self.ca)
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(ca=self.ca, cert=self.cert, key=self.key)


def channel_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for a channel (`Client(target, credentials=...)`): `ca` is the PEM file of
    the CA that signed the server's certificate (None: gRPC's bundled public roots); `cert` and
    `key` are a client certificate and its key, for servers that ask for one."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert))


@dataclass(frozen=True)
class CertificateDirectory:
    """The files `unclip certs init DIR` writes, by role."""

    path: Path

    @property
    def ca(self) -> Path:
        return self.path / CA_CERT

    def pair(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of `name`: a stage ("encoder", ...), GATEWAY_CLIENT or GATEWAY_SERVER."""
        return self.path / f"{name}.crt", self.path / f"{name}.key"

    def stage_server(self, stage: str) -> TlsFiles:
        """A stage's server side: its certificate, and the CA its callers' certificates must be signed by."""
        cert, key = self.pair(stage)
        return TlsFiles(cert, key, self.ca)

    def gateway_client(self) -> TlsFiles:
        """The gateway toward the stages: its client certificate, and the CA of the stages' certificates."""
        cert, key = self.pair(GATEWAY_CLIENT)
        return TlsFiles(cert, key, self.ca)

    def gateway_server(self) -> TlsFiles:
        """The gateway's public endpoint: server-side TLS, no client certificates asked."""
        cert, key = self.pair(GATEWAY_SERVER)
        return TlsFiles(cert, key)

    def missing(self, names: list[str]) -> list[Path]:
        """The files of the CA and of these names' pairs that are not there."""
        paths = [self.ca, *(path for name in names for path in self.pair(name))]
        return [path for path in paths if not path.is_file()]
