"""`unclip export RUN OUT`: a training run's servable checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("export", help="write a training run's servable checkpoint (config + served weights)")
    parser.add_argument("run", type=Path, help="a directory written by `unclip train`")
    parser.add_argument("out", type=Path, help="checkpoint directory to write, e.g. unclip/weights/decoder")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="storage dtype")
    return parser


def run(args: argparse.Namespace) -> int:
    from unclip.checkpoint import CheckpointError
    from unclip.train.export import export_checkpoint

    try:
        target = export_checkpoint(args.run, args.out, args.dtype)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"unclip export: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.run} -> {target}")
    return 0
