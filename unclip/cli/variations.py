"""`unclip variations IMAGE`: new images sharing an image's CLIP embedding."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unclip.cli.common import add_image_flags, backend, parameters_from_args, reports_errors, write_images

OPERATION = "variations"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("variations", help="variations of an image (its CLIP embedding decoded again)")
    parser.add_argument("image", type=Path, help="PNG, JPEG or WebP")
    add_image_flags(parser, OPERATION)
    return parser


@reports_errors
def run(args: argparse.Namespace) -> int:
    upload = args.image.read_bytes()  # a missing file fails before any model loads
    with backend(args) as client:
        images = client.variations(upload, **parameters_from_args(args, OPERATION))
    write_images(args.out, [(f"variation-{image.seed}.png", image.png) for image in images])
    return 0
