"""`unclip bench pipeline|throughput|karlo|load`: benchmarks that print figures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unclip.cli import tls_flags
from unclip.cli.common import (
    NOT_SAMPLING,
    add_api_key_flag,
    add_parameter_flags,
    api_key,
    compute_batch_spec,
    parameters_from_args,
)

OPERATION = "generate"


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"every value must be at least 1, got {text!r}")
    return values


def add_parser(commands: Any) -> argparse.ArgumentParser:
    from unclip.throughput import LOADS, MODES

    parser = commands.add_parser(
        "bench",
        help="benchmarks that print figures",
        description="pipeline: latency in-process against the local services. throughput: images per second, "
        "latency and peak memory under concurrent load, row by row against each --compute-batch. karlo: unclip "
        "in-process against diffusers' UnCLIPPipeline on the same diffusers-format weights. load: a bounded load "
        "generator against a running gateway (--server), through the SDK.",
    )
    parser.add_argument("what", choices=("pipeline", "throughput", "karlo", "load"))
    parser.add_argument("--prompts", type=int, default=3, help="pipeline: number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="pipeline: seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--repeats", type=int, default=1, help="pipeline: runs per prompt (the median is reported)")
    throughput = parser.add_argument_group("throughput")
    throughput.add_argument(
        "--mode", action="append", choices=MODES, help=f"where the stages run (repeatable; default: {MODES[0]})"
    )
    throughput.add_argument(
        "--load", action="append", choices=LOADS, help=f"what each request is (repeatable; default: {LOADS[0]})"
    )
    throughput.add_argument(
        "--compute-batch",
        action="append",
        default=[],
        type=compute_batch_spec,
        metavar="N|STAGE=N,...",
        help="a compute batch to measure against row by row, as `8` or `prior=16,decoder=8` (repeatable)",
    )
    throughput.add_argument(
        "--concurrency", type=_ints, default=[1, 2, 4, 8], help="concurrent clients, comma-separated (default: 1,2,4,8)"
    )
    throughput.add_argument("--requests", type=int, default=16, help="requests answered per point (at least the concurrency)")
    throughput.add_argument("--max-batch-size", type=int, default=8, help="requests per joint run")
    throughput.add_argument("--batch-wait", type=float, default=0.0, help="seconds a joint run's first request waits for company")
    throughput.add_argument("--json", type=Path, default=Path("bench-throughput.json"), help="where the figures are written")
    karlo = parser.add_argument_group("karlo (steps: --prior-steps etc., default Karlo's 25, 25, 7)")
    karlo.add_argument("--src", type=Path, help="a diffusers UnCLIPPipeline directory")
    karlo.add_argument("--imported", type=Path, help="its `unclip import diffusers` output (default: imported afresh)")
    karlo.add_argument("--runs", type=int, default=3, help="timed requests per side, after one untimed")
    karlo.add_argument("--images", type=int, default=1, help="karlo, load: images per request")
    load = parser.add_argument_group("load (also --concurrency C, --requests N, --images, --json)")
    load.add_argument("--server", metavar="HOST:PORT", help="the gateway to load")
    load.add_argument("--application", help="the Ray Serve application behind a Ray gRPC proxy (gateway)")
    load.add_argument("--rate", type=float, help="requests started per second (default: each client sends back to back)")
    load.add_argument("--size", type=int, help="image side (default: the server's)")
    load.add_argument(
        "--check-store",
        action="store_true",
        help="afterwards, read every answered request's PNGs and record back from the gateway's object store "
        "(UNCLIP_S3_*) and report any missing or different",
    )
    tls_flags.add_client_flags(load)  # the same as `unclip generate --server` takes
    add_api_key_flag(load)
    add_parameter_flags(parser, OPERATION, skip=NOT_SAMPLING)
    return parser


def run(args: argparse.Namespace) -> int:
    parameters = parameters_from_args(args, OPERATION, skip=NOT_SAMPLING)
    if args.what != "load" and tls_flags.client_credentials_given(args):
        raise SystemExit("unclip bench: --tls, --tls-ca, --tls-cert and --tls-key are for `bench load --server`")
    if args.what == "karlo":
        from unclip.peer_bench import run_peer_benchmark

        if args.src is None:
            raise SystemExit("unclip bench karlo: --src DIR (a diffusers UnCLIPPipeline directory) is required")
        given = (parameters.get("prior_steps"), parameters.get("decoder_steps"), parameters.get("upsampler_steps"))
        steps = (given[0] or 25, given[1] or 25, given[2] or 7)
        out = args.json if args.json != Path("bench-throughput.json") else Path("bench-karlo.json")
        from unclip.stages.batcher import compute_batches

        batches = compute_batches(args.compute_batch[-1]) if args.compute_batch else None  # default: diffusers' batch
        return run_peer_benchmark(
            args.src, args.imported, n=args.images, steps=steps, runs=args.runs, out=out, compute_batches=batches
        )
    if args.what == "load":
        from unclip.load_bench import run_load_benchmark

        if args.server is None:
            raise SystemExit("unclip bench load: --server HOST:PORT (a running gateway) is required")
        if len(args.concurrency) != 1:
            raise SystemExit("unclip bench load: give one --concurrency")
        size = {} if args.size is None else {"size": args.size}
        out = args.json if args.json != Path("bench-throughput.json") else Path("bench-load.json")
        parameters = {**parameters, "n": args.images, **size}
        try:
            credentials = tls_flags.client_credentials(args)
        except (OSError, ValueError) as error:  # a certificate that cannot be read, or half a client pair
            raise SystemExit(f"unclip bench load: {error}") from None
        return run_load_benchmark(
            args.server,
            args.concurrency[0],
            args.requests,
            args.rate,
            parameters,
            out,
            application=args.application,
            check_stored=args.check_store,
            credentials=credentials,
            api_key=api_key(args),
        )
    if args.what == "pipeline":
        from unclip.bench import run_pipeline_benchmark

        return run_pipeline_benchmark(args.prompts, args.seed, args.repeats, parameters)
    from unclip.throughput import LOADS, MODES, run_throughput_benchmark

    grouping = {"max_batch_size": args.max_batch_size, "batch_wait_s": args.batch_wait}
    return run_throughput_benchmark(
        args.mode or [MODES[0]],
        args.load or [LOADS[0]],
        args.compute_batch,
        args.concurrency,
        args.requests,
        parameters,
        grouping,
        args.json,
    )
