"""`unclip interpolate --images A B | --prompts P1 P2`: frames between two images or prompts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unclip.cli.common import add_image_flags, backend, parameters_from_args, reports_errors, write_animation

OPERATION = "interpolate"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("interpolate", help="frames between two images or two prompts")
    ends = parser.add_mutually_exclusive_group(required=True)
    ends.add_argument("--images", type=Path, nargs=2, metavar=("A", "B"), help="the two end images")
    ends.add_argument("--prompts", nargs=2, metavar=("P1", "P2"), help="the two end prompts")
    parser.add_argument("--frames", type=int, default=5, help="frames, both ends included (default: 5)")
    parser.add_argument("--gif", action="store_true", help="also write the frames as an animated GIF")
    add_image_flags(parser, OPERATION)
    return parser


@reports_errors
def run(args: argparse.Namespace) -> int:
    images = None if args.images is None else (args.images[0].read_bytes(), args.images[1].read_bytes())
    with backend(args) as client:
        animation = client.interpolate(
            images=images,
            prompts=None if args.prompts is None else tuple(args.prompts),
            frames=args.frames,
            animated_gif=args.gif,
            **parameters_from_args(args, OPERATION),
        )
    write_animation(args.out, "interpolation", animation)
    return 0
