"""The `unclip` command line: one module per command, each with `add_parser` and `run`.

Heavy imports (torch, grpc servers) happen inside the commands that need them, so that
`unclip --help` and `unclip generate --server ...` start quickly.
"""

from __future__ import annotations

import argparse
import logging
import sys

from unclip import __version__
from unclip.cli import (
    bench,
    certs,
    edit,
    export,
    generate,
    import_weights,
    interpolate,
    keys,
    serve,
    textdiff,
    train,
    variations,
    weights,
)
from unclip.cli import eval as evaluate

COMMANDS = (
    generate,
    variations,
    interpolate,
    textdiff,
    edit,
    serve,
    keys,
    certs,
    bench,
    train,
    export,
    import_weights,
    weights,
    evaluate,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unclip", description="DALL-E 2 (unCLIP) text-to-image")
    parser.add_argument("--version", action="version", version=f"unclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands).set_defaults(command_main=command.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        sys.exit(args.command_main(args))
    except KeyboardInterrupt:
        sys.exit(130)
