"""`unclip keys create|list|revoke`: the API keys file a gateway reads (`--api-keys`, docs/security.md).

    unclip keys create team-a --file keys.json [--images-per-minute 60] [--max-concurrent 2]
    unclip keys list --file keys.json
    unclip keys revoke team-a --file keys.json

`create` prints the new key once, on stdout alone (so `KEY=$(unclip keys create ...)` works);
the file keeps only its SHA-256. Gateways read the file again when it changes, so a created key
works and a revoked one is refused from their next request on, without a restart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from unclip import settings
from unclip.cli.common import positive_int


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("keys", help="create, list and revoke the gateway's API keys")
    actions = parser.add_subparsers(dest="action", required=True)

    def with_file(action: argparse.ArgumentParser) -> argparse.ArgumentParser:
        action.add_argument(
            "--file", type=Path, metavar="F", help="the keys file (default: $UNCLIP_API_KEYS_FILE); JSON, hashes only"
        )
        return action

    create = with_file(actions.add_parser("create", help="add a key; prints it once"))
    create.add_argument("name", help="who the key is for (1-64 characters of A-Z a-z 0-9 . _ @ -); unique in the file")
    create.add_argument("--images-per-minute", type=positive_int, metavar="N", help="this key's limit (default: the gateway's)")
    create.add_argument(
        "--max-concurrent", type=positive_int, metavar="N", help="this key's concurrent requests (default: the gateway's)"
    )
    with_file(actions.add_parser("list", help="the keys: name, id, created, limits (never the keys)"))
    revoke = with_file(actions.add_parser("revoke", help="remove a key; gateways refuse it from their next request"))
    revoke.add_argument("name")
    return parser


def run(args: argparse.Namespace) -> int:
    from gateway.auth import KeysFile, KeysFileError
    from gateway.quotas import QuotaLimits

    path = args.file or settings.API_KEYS_FILE.get()
    if path is None:
        print(f"unclip keys {args.action}: give --file F (or set {settings.API_KEYS_FILE.name})", file=sys.stderr)
        return 2
    keys_file = KeysFile(path)
    try:
        if args.action == "create":
            limits = QuotaLimits(args.images_per_minute, args.max_concurrent)
            entry, key = keys_file.create(args.name, limits)
            print(key)
            print(f"unclip: key {entry.name!r} (id {entry.id}) added to {keys_file.path}; this is the only time it is shown",
                  file=sys.stderr)  # fmt: skip
        elif args.action == "list":
            _print_table(keys_file.read())
        else:
            entry = keys_file.revoke(args.name)
            print(f"unclip: revoked {entry.name!r} (id {entry.id}); gateways reading {keys_file.path} refuse it from now on",
                  file=sys.stderr)  # fmt: skip
    except (KeysFileError, ValueError, OSError) as error:
        print(f"unclip keys {args.action}: {error}", file=sys.stderr)
        return 1
    return 0


def _print_table(keys: list[Any]) -> None:
    rows = [("NAME", "ID", "CREATED", "IMAGES/MIN", "MAX CONCURRENT")]
    for key in keys:
        limits = key.limits
        rows.append((key.name, key.id, key.created or "-", str(limits.images_per_minute or "default"),
                     str(limits.max_concurrent or "default")))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
