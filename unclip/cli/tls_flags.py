"""The TLS flags of `unclip serve` and of the commands that call a gateway (`--server`), and what
they mean for each target (docs/security.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unclip.stage import GATEWAY, SERVICE_NAMES


class TlsFlagError(ValueError):
    """TLS flags that do not go together for the target; the message says why."""


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group("TLS (unclip certs init writes development certificates; docs/security.md)")
    tls.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="this server's certificate (PEM). stage: serve mutual TLS only (with --tls-key and --tls-ca); "
        "gateway: its public gRPC and HTTP endpoints serve TLS only; ray: Ray Serve's HTTP proxy serves HTTPS",
    )
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="the private key of --tls-cert (PEM)")
    tls.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="callers must present a certificate signed by this CA (PEM), or the handshake fails. stage: required "
        "with --tls-cert (the gateway's client certificate); gateway: optional, for its public endpoints",
    )
    for flag, what in (
        ("--stage-tls-cert", "the gateway's client certificate toward the stages (PEM)"),
        ("--stage-tls-key", "the private key of --stage-tls-cert (PEM)"),
        ("--stage-tls-ca", "the CA that signed the stages' certificates (PEM)"),
    ):
        tls.add_argument(flag, type=Path, metavar="FILE", help=f"gateway: {what}; the three go together")
    tls.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="all: the certificates of `unclip certs init DIR`: the stages serve mutual TLS, the gateway calls them "
        "with its client certificate and serves its public endpoints with DIR/gateway.crt",
    )
    tls.add_argument(
        "--tls",
        action="store_true",
        help="all: as --tls-dir, with a new development CA in a temporary directory (printed; removed on exit)",
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(args: argparse.Namespace, *names: str) -> list[str]:
    return [_flag(name) for name in names if getattr(args, name, None)]


def _together(args: argparse.Namespace, names: tuple[str, ...], why: str) -> None:
    """TlsFlagError when some of `names` are given but not all."""
    given = _given(args, *names)
    if given and len(given) < len(names):
        missing = [_flag(name) for name in names if not getattr(args, name, None)]
        raise TlsFlagError(f"{', '.join(given)} also needs {', '.join(missing)}: {why}")


def check_serve_flags(args: argparse.Namespace) -> None:
    """Raise TlsFlagError for TLS flags the target does not take, or that are incomplete."""
    target = args.target
    server_flags = ("tls_cert", "tls_key", "tls_ca")
    stage_flags = ("stage_tls_cert", "stage_tls_key", "stage_tls_ca")
    if target != "all" and (args.tls_dir or args.tls):
        raise TlsFlagError("--tls-dir and --tls are for `serve all`; one service takes --tls-cert, --tls-key (and --tls-ca)")
    if target != GATEWAY and _given(args, *stage_flags):
        raise TlsFlagError("--stage-tls-cert, --stage-tls-key and --stage-tls-ca are the gateway's")
    if target in SERVICE_NAMES:
        _together(args, server_flags, "a stage serves mutual TLS: only callers whose certificate the CA signed get in")
    elif target == GATEWAY:
        _together(args, stage_flags, "the stages accept only the gateway's client certificate")
        if args.tls_ca and not (args.tls_cert and args.tls_key):
            raise TlsFlagError("--tls-ca needs --tls-cert and --tls-key: client certificates are asked over TLS only")
        _together(args, ("tls_cert", "tls_key"), "a TLS server needs its certificate and its key")
    elif target == "all":
        if _given(args, *server_flags):
            raise TlsFlagError("all starts five servers: give --tls-dir DIR (unclip certs init DIR) or --tls")
        if args.tls_dir and args.tls:
            raise TlsFlagError("give --tls-dir or --tls, not both")
    elif target == "ray":
        if args.tls_ca:
            raise TlsFlagError("ray: Ray Serve's HTTP proxy does not require client certificates; --tls-ca is not supported")
        _together(args, ("tls_cert", "tls_key"), "a TLS server needs its certificate and its key")


def server_tls(args: argparse.Namespace) -> Any:
    """The TlsFiles of this server's own endpoint (a stage's or the gateway's), or None for plaintext."""
    from unclip.tls import TlsFiles

    if not args.tls_cert:
        return None
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)


def stage_channel_tls(args: argparse.Namespace) -> Any:
    """The gateway's TlsFiles toward the stages, or None for plaintext channels."""
    from unclip.tls import TlsFiles

    if not args.stage_tls_cert:
        return None
    return TlsFiles(args.stage_tls_cert, args.stage_tls_key, args.stage_tls_ca)


# -- clients of a gateway (--server) -----------------------------------------------------------


def add_client_flags(parser: argparse._ActionsContainer) -> None:  # a parser or one of its groups
    parser.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="with --server: TLS, trusting the CA in FILE (PEM) for the gateway's certificate",
    )
    parser.add_argument("--tls", action="store_true", help="with --server: TLS, trusting the public CAs gRPC ships with")
    parser.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="with --server: a client certificate (PEM) for a gateway that asks for one (its --tls-ca)",
    )
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="the private key of --tls-cert (PEM)")


def client_credentials_given(args: argparse.Namespace) -> bool:
    return bool(args.tls or args.tls_ca or args.tls_cert or args.tls_key)


def client_credentials(args: argparse.Namespace) -> Any:
    """grpc.ChannelCredentials for the --server channel, or None for plaintext."""
    if not client_credentials_given(args):
        return None
    from unclip.tls import channel_credentials

    return channel_credentials(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
