"""`unclip textdiff IMAGE --caption C --target T`: frames moving an image toward a target caption."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unclip.cli.common import add_image_flags, backend, parameters_from_args, reports_errors, write_animation

OPERATION = "text_diff"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("textdiff", help="frames moving an image from its caption toward a target caption")
    parser.add_argument("image", type=Path, help="PNG, JPEG or WebP")
    parser.add_argument("--caption", required=True, help="what the image shows now")
    parser.add_argument("--target", required=True, help="what it should show")
    parser.add_argument("--frames", type=int, default=5, help="frames, the unchanged start included (default: 5)")
    parser.add_argument("--max-rotation", type=float, help="how far the last frame moves, in (0, 1] (default: 0.5)")
    parser.add_argument("--gif", action="store_true", help="also write the frames as an animated GIF")
    add_image_flags(parser, OPERATION)
    return parser


@reports_errors
def run(args: argparse.Namespace) -> int:
    image = args.image.read_bytes()  # a missing file fails before any model loads
    with backend(args) as client:
        animation = client.text_diff(
            image,
            args.caption,
            args.target,
            frames=args.frames,
            max_rotation=args.max_rotation,
            animated_gif=args.gif,
            **parameters_from_args(args, OPERATION),
        )
    write_animation(args.out, "textdiff", animation)
    return 0
