"""`unclip generate PROMPT`: images for a prompt, in-process or through a gateway (--server)."""

from __future__ import annotations

import argparse
from typing import Any

from unclip.cli.common import Progress, add_image_flags, backend, parameters_from_args, reports_errors, slug, write_images

OPERATION = "generate_stream"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("generate", help="generate images for a prompt (in-process unless --server)")
    parser.add_argument("prompt")
    add_image_flags(parser, OPERATION)
    return parser


@reports_errors
def run(args: argparse.Namespace) -> int:
    progress = Progress()
    try:
        with backend(args, progress) as client:
            for event in client.generate_stream(args.prompt, **parameters_from_args(args, OPERATION)):
                if isinstance(event, list):
                    write_images(args.out, [(f"{slug(args.prompt)}-{image.seed}.png", image.png) for image in event])
                    return 0
                progress.event(event)
    finally:
        progress.close()
    raise RuntimeError("the stream ended without images")  # both clients raise before this
