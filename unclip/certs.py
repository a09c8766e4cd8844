"""A development certificate authority and the certificates a local unclip needs, written with
`cryptography` (`unclip certs init DIR`): one server certificate per stage, the gateway's client
certificate toward the stages, and a server certificate for the gateway's public endpoint. The
file names are `unclip.tls.CertificateDirectory`'s.

For development and tests: in production, issue the certificates from your own CA (cert-manager,
Vault, ...) with the same roles (docs/security.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from unclip.stage import SERVICE_NAMES
from unclip.tls import CA_KEY, GATEWAY_CLIENT, GATEWAY_SERVER, CertificateDirectory

LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")  # bind addresses, not names a certificate can carry
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity browsers and most TLS stacks still accept for a leaf
CLIENT_NAME = "unclip-gateway"  # the subject of the gateway's client certificate


@dataclass(frozen=True)
class Issued:
    """One file written, and what it is for."""

    path: Path
    role: str


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # P-256: every TLS stack, fast to generate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "unclip development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])  # fmt: skip


def _subject_alternative_names(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # in order, once each
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """A KeyUsage extension allowing only `allowed` (KeyUsage's keyword names)."""
    flags = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**{flag: flag in allowed for flag in flags})


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew between hosts
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _leaf(
    common_name: str,
    usage: x509.ObjectIdentifier,
    hosts: Iterable[str] | None,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for one use only (server or client authentication): a stage's server
    certificate cannot be used to call another stage."""
    key = _key()
    builder = (
        _builder(_name(common_name), ca_cert.subject, key, LEAF_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage("digital_signature"), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts is not None:
        builder = builder.add_extension(_subject_alternative_names(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    name = _name("unclip development CA")
    cert = (
        _builder(name, name, key, CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage("key_cert_sign", "crl_sign"), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` with `mode` from the first byte on: a key is never readable by others, not even briefly."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.chmod(path, mode)  # a file that existed (--force) keeps its old mode through os.open


def init(directory: str | Path, hosts: Iterable[str] = (), *, force: bool = False) -> list[Issued]:
    """Write a new CA and every certificate under `directory` (created if missing); server
    certificates name localhost, 127.0.0.1, ::1 and `hosts` (wildcard bind addresses are left
    out). Keys are 0600. Raises FileExistsError, naming the files, if any is there already
    and `force` is false. Returns what was written."""
    files = CertificateDirectory(Path(directory))
    names = [*SERVICE_NAMES, GATEWAY_CLIENT, GATEWAY_SERVER]
    targets = [files.ca, files.path / CA_KEY, *(path for name in names for path in files.pair(name))]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not force:
        raise FileExistsError(f"already there (give --force to replace them): {', '.join(existing)}")
    files.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    server_hosts = [*LOOPBACK, *(host for host in hosts if host not in WILDCARDS)]

    ca_cert, ca_key = _ca()
    issued: list[Issued] = []

    def emit(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, role: str) -> None:
        cert_path, key_path = (files.ca, files.path / CA_KEY) if name == "ca" else files.pair(name)
        _write(cert_path, _pem(cert), 0o644)
        _write(key_path, _key_pem(key), 0o600)
        issued.extend([Issued(cert_path, role), Issued(key_path, f"{role}: private key")])

    emit("ca", ca_cert, ca_key, "development CA (trusted by the stages and by clients of the gateway)")
    for stage in SERVICE_NAMES:
        cert, key = _leaf(stage, ExtendedKeyUsageOID.SERVER_AUTH, server_hosts, ca_cert, ca_key)
        emit(stage, cert, key, f"{stage} service: server certificate")
    cert, key = _leaf(CLIENT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH, None, ca_cert, ca_key)
    emit(GATEWAY_CLIENT, cert, key, "gateway: client certificate toward the stages")
    cert, key = _leaf(GATEWAY_SERVER, ExtendedKeyUsageOID.SERVER_AUTH, server_hosts, ca_cert, ca_key)
    emit(GATEWAY_SERVER, cert, key, "gateway: server certificate of its public gRPC and HTTP endpoints")
    return issued
