"""`unclip edit IMAGE --prompt P`: regenerate the transparent region of an image (inpainting)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unclip.cli.common import add_image_flags, backend, parameters_from_args, reports_errors, write_images

OPERATION = "edit"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("edit", help="regenerate the transparent region of an image for a prompt")
    parser.add_argument("image", type=Path, help="PNG, JPEG or WebP; its alpha is the mask unless --mask is given")
    parser.add_argument("--prompt", required=True, help="describes the whole edited image")
    parser.add_argument("--mask", type=Path, help="PNG of the image's size: fully transparent pixels are regenerated")
    add_image_flags(parser, OPERATION)
    return parser


@reports_errors
def run(args: argparse.Namespace) -> int:
    image, mask = args.image.read_bytes(), None if args.mask is None else args.mask.read_bytes()
    with backend(args) as client:
        images = client.edit(image, args.prompt, mask=mask, **parameters_from_args(args, OPERATION))
    write_images(args.out, [(f"edit-{image.seed}.png", image.png) for image in images])
    return 0
