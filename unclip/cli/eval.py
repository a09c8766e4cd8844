"""`unclip eval`: judge generated Shapes images against their prompts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unclip.cli.common import NOT_SAMPLING, add_compute_batch_flag, add_parameter_flags, batch_settings, parameters_from_args

OPERATION = "generate"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("eval", help="judge generated Shapes images against their prompts")
    parser.add_argument("--prompts", type=int, default=200, help="number of canonical prompts")
    parser.add_argument("--seed", type=int, default=0, help="prompts and the first image's seed; image i uses seed + i")
    parser.add_argument("--split", choices=("all", "train", "heldout"), default="all", help="seen or held-out colour-shape pairs")
    parser.add_argument("--weights", type=Path, help="directory with clip/ prior/ decoder/ upsampler/ (default: shipped)")
    parser.add_argument("--json", type=Path, default=Path("out/eval.json"), help="where to write the full report")
    parser.add_argument("--images", type=Path, help="also write every judged image here, its verdict in its name")
    parser.add_argument("--retrieval-captions", type=int, default=200, help="held-out captions for CLIP retrieval")
    add_compute_batch_flag(parser)
    add_parameter_flags(parser, OPERATION, skip=NOT_SAMPLING)
    return parser


def run(args: argparse.Namespace) -> int:
    from unclip.eval.report import format_table, run_eval, write_report
    from unclip.local import LocalStages

    sampling = parameters_from_args(args, OPERATION, skip=NOT_SAMPLING)
    report = run_eval(
        LocalStages.load(args.weights, settings=batch_settings(args)),
        prompts=args.prompts,
        seed=args.seed,
        split=args.split,
        sampling=sampling,
        retrieval_captions=args.retrieval_captions,
        images_dir=args.images,
    )
    write_report(report, args.json)
    print(format_table(report))
    print(f"full report: {args.json}")
    return 0
