"""`unclip bench pipeline`: benchmarks that print figures."""

from __future__ import annotations

import argparse
from typing import Any

from unclip.cli.common import NOT_SAMPLING, add_parameter_flags, parameters_from_args

OPERATION = "generate"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("bench", help="benchmarks that print figures")
    parser.add_argument("what", choices=("pipeline",))
    parser.add_argument("--prompts", type=int, default=3, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--repeats", type=int, default=1, help="runs per prompt (the median is reported)")
    add_parameter_flags(parser, OPERATION, skip=NOT_SAMPLING)
    return parser


def run(args: argparse.Namespace) -> int:
    from unclip.bench import run_pipeline_benchmark

    return run_pipeline_benchmark(args.prompts, args.seed, args.repeats, parameters_from_args(args, OPERATION, skip=NOT_SAMPLING))
