"""`unclip import diffusers SRC OUT`: convert a local diffusers-format unCLIP (Karlo) into an
unclip weights directory that `--weights` accepts everywhere."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("import", help="convert weights from another format into an unclip weights directory")
    formats = parser.add_subparsers(dest="format", required=True)
    diffusers = formats.add_parser(
        "diffusers",
        help="a diffusers UnCLIPPipeline directory (e.g. kakaobrain/karlo-v1-alpha on disk); nothing is downloaded",
    )
    diffusers.add_argument("src", type=Path, help="the UnCLIPPipeline directory (model_index.json and its components)")
    diffusers.add_argument("out", type=Path, help="the unclip weights directory to create (must not exist)")
    diffusers.add_argument(
        "--variations",
        type=Path,
        help="an UnCLIPImageVariationPipeline directory (karlo-v1-alpha-image-variations) whose image encoder "
        "enables variations, image interpolations and edits",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        from unclip.importers.diffusers_format import WeightsImportError, import_pipeline
    except ImportError as error:
        print(f"unclip import: {error}", file=sys.stderr)
        return 1
    try:
        out = import_pipeline(args.src, args.out, variations=args.variations, log=lambda line: print(line, file=sys.stderr))
    except WeightsImportError as error:
        print(f"unclip import: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}; use it with --weights {out}")
    return 0
