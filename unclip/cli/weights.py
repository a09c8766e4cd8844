"""`unclip weights push|pull`: a weights directory to and from S3 (the store UNCLIP_S3_* name)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "weights",
        help="copy a weights directory to or from S3 (endpoint and keys from UNCLIP_S3_*)",
        description="push uploads DIR's files under --prefix; pull downloads them into DIR, which a pod can start "
        "from (the Helm chart's weights.s3). A pull that already holds the same objects downloads nothing.",
    )
    parser.add_argument("action", choices=("push", "pull"))
    parser.add_argument("directory", type=Path, help="the weights directory (clip/ prior/ decoder/ upsampler/)")
    parser.add_argument("--prefix", required=True, help="folder in the bucket, e.g. weights/karlo")
    parser.add_argument("--bucket", help="bucket (default: UNCLIP_S3_BUCKET)")
    return parser


def run(args: argparse.Namespace) -> int:
    from unclip import settings
    from unclip.storage import StorageConfig
    from unclip.weights_store import WeightsStoreError, pull, push

    try:
        found = settings.s3_settings()
        if found is None:
            raise ValueError("set UNCLIP_S3_ENDPOINT, UNCLIP_S3_ACCESS_KEY and UNCLIP_S3_SECRET_KEY")
        config = StorageConfig(**{**found, **({"bucket": args.bucket} if args.bucket else {})})
        if args.action == "push":
            print(f"uploaded {push(args.directory, config, args.prefix)} files to s3://{config.bucket}/{args.prefix}")
        else:
            changed = pull(config, args.prefix, args.directory)
            print(f"{args.directory}: {'pulled' if changed else 'already holds'} s3://{config.bucket}/{args.prefix}")
    except (ValueError, WeightsStoreError) as error:
        print(f"unclip weights: {error}", file=sys.stderr)
        return 1
    return 0
