"""`unclip certs init DIR`: a development CA and the certificates for mutual TLS between the
gateway and the stages (`unclip serve ... --tls-dir DIR`; docs/security.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "certs",
        help="write a development CA and TLS certificates for the services",
        description="init: a development CA, a server certificate per stage, the gateway's client certificate toward "
        "the stages and the gateway's public server certificate, under DIR (keys mode 0600)",
    )
    parser.add_argument("action", choices=("init",))
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or IP address the server certificates also name, besides localhost, 127.0.0.1 and ::1 (repeat)",
    )
    parser.add_argument("--force", action="store_true", help="replace certificates and keys already in DIR")
    return parser


def run(args: argparse.Namespace) -> int:
    from unclip.certs import init

    try:
        issued = init(args.directory, args.hosts, force=args.force)
    except FileExistsError as error:
        print(f"unclip certs init: {error}", file=sys.stderr)
        return 1
    for item in issued:
        print(f"{item.path}  {item.role}")
    return 0
