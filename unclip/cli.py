"""The `unclip` command line: generate images, serve the stages, benchmark.

Heavy imports (torch, grpc servers) happen inside the commands that need them, so that
`unclip --help` and `unclip generate --server ...` start quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from pathlib import Path

from unclip import __version__

SERVE_TARGETS = ("encoder", "prior", "decoder", "upsampler", "gateway", "all")
DEFAULT_PROMPT = "a red circle in the top left corner"


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="denoising steps for every diffusion stage (per-stage flags override)")
    parser.add_argument("--prior-steps", type=int)
    parser.add_argument("--decoder-steps", type=int)
    parser.add_argument("--upsampler-steps", type=int)
    parser.add_argument("--sampler", choices=("ddim", "ddpm"))
    parser.add_argument("--prior-guidance", type=float, help="prior classifier-free guidance scale")
    parser.add_argument("--decoder-guidance", type=float, help="decoder classifier-free guidance scale")
    parser.add_argument("--candidates", type=int, default=1, help="prior samples per image; the closest to the text is kept")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    def pick(specific):
        return specific if specific is not None else args.steps

    return dict(
        prior_steps=pick(args.prior_steps), decoder_steps=pick(args.decoder_steps),
        upsampler_steps=pick(args.upsampler_steps), sampler=args.sampler,
        prior_guidance_scale=args.prior_guidance, decoder_guidance_scale=args.decoder_guidance,
        prior_candidates=args.candidates,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unclip", description="DALL-E 2 (unCLIP) text-to-image")
    parser.add_argument("--version", action="version", version=f"unclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images for a prompt (in-process unless --server)")
    gen.add_argument("prompt")
    gen.add_argument("-n", type=int, default=1, help="number of images (image i uses seed + i)")
    gen.add_argument("--seed", type=int, help="default: random")
    gen.add_argument("--size", type=int, help="output side in pixels (default: the largest available)")
    gen.add_argument("--out", type=Path, default=Path("out"), help="directory for the PNGs (default: ./out)")
    gen.add_argument("--server", metavar="HOST:PORT", help="generate through a gateway instead of in-process")
    gen.add_argument("--weights", type=Path, help="in-process: directory with clip/ prior/ decoder/ upsampler/ checkpoints")
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    _add_sampling_flags(gen)

    serve = commands.add_parser("serve", help="run a stage service, the gateway, or all of them")
    serve.add_argument("target", choices=SERVE_TARGETS)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, help="port (default: 50051 for gateway/all, 50052-50055 for the stages)")
    serve.add_argument("--checkpoint", type=Path, help="stage: checkpoint directory (default: the shipped weights)")
    serve.add_argument("--weights", type=Path, help="all: directory with clip/ prior/ decoder/ upsampler/")
    serve.add_argument("--max-pending", type=int, default=32, help="stage: queued requests before RESOURCE_EXHAUSTED")
    for stage in ("encoder", "prior", "decoder"):
        serve.add_argument(f"--{stage}", metavar="HOST:PORT", help=f"gateway: the {stage} service")
    serve.add_argument("--upsampler", metavar="HOST:PORT", action="append", help="gateway: an upsampler (repeat, in order)")

    bench = commands.add_parser("bench", help="benchmarks that print figures")
    bench.add_argument("what", choices=("pipeline",))
    bench.add_argument("--prompts", type=int, default=3, help="number of prompts")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--repeats", type=int, default=1, help="runs per prompt (the median is reported)")
    _add_sampling_flags(bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "serve" and args.target != "all":
        logging.getLogger("unclip").setLevel(logging.INFO)
    try:
        if args.command == "generate":
            sys.exit(_generate(args))
        if args.command == "serve":
            sys.exit(_serve(args))
        if args.command == "bench":
            from unclip.bench import run_pipeline_benchmark

            sys.exit(run_pipeline_benchmark(args.prompts, args.seed, args.repeats, _sampling_kwargs(args)))
    except KeyboardInterrupt:
        sys.exit(130)


def _output_path(out: Path, prompt: str, seed: int) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "image"
    return out / f"{slug}-{seed}.png"


def _generate(args: argparse.Namespace) -> int:
    kwargs = dict(n=args.n, size=args.size, seed=args.seed, **_sampling_kwargs(args))
    if args.server:
        images = _generate_remote(args, kwargs)
    else:
        images = _generate_local(args, kwargs)
    if images is None:
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for png, seed in images:
        path = _output_path(args.out, args.prompt, seed)
        path.write_bytes(png)
        print(path)
    return 0


def _progress_bar(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False)


def _generate_local(args: argparse.Namespace, kwargs: dict) -> list[tuple[bytes, int]] | None:
    import time

    from unclip.errors import UnclipError
    from unclip.local import LocalStages
    from unclip.pipeline import GenerationParameters, generate

    weights = args.weights
    stages = LocalStages.load(
        *(None if weights is None else weights / kind for kind in ("clip", "prior", "decoder")),
        upsamplers=None if weights is None else [weights / "upsampler"],
    )
    bar = _progress_bar(None, "sampling")

    def on_step(step: int, total: int, x0) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.update(1)

    stages.progress = on_step

    def on_stage(event) -> None:
        bar.set_description(f"{event.stage} done ({event.completed}/{event.total})")

    params = GenerationParameters(prompt=args.prompt, **{k: v for k, v in kwargs.items() if v is not None})
    try:
        images = asyncio.run(generate(stages, params, deadline=time.monotonic() + args.timeout, on_stage=on_stage))
    except UnclipError as error:
        print(f"unclip: {error}", file=sys.stderr)
        return None
    finally:
        bar.close()
    return [(image.png, image.seed) for image in images]


def _generate_remote(args: argparse.Namespace, kwargs: dict) -> list[tuple[bytes, int]] | None:
    from unclip.client import Client, UnclipError

    with Client(args.server, timeout=args.timeout) as client:
        bar = _progress_bar(None, "stages")
        try:
            for event in client.generate_stream(args.prompt, **kwargs):
                if isinstance(event, list):
                    return [(image.png, image.seed) for image in event]
                bar.total = event.total
                bar.set_description(f"{event.stage} done")
                bar.update(1)
        except UnclipError as error:
            print(f"unclip: {error}", file=sys.stderr)
            return None
        finally:
            bar.close()
    print("unclip: the server closed the stream without sending images", file=sys.stderr)
    return None


def _serve(args: argparse.Namespace) -> int:
    if args.target == "all":
        return _serve_all(args)
    from unclip.serving import Server, serve_forever

    default_ports = {"gateway": 50051, "encoder": 50052, "prior": 50053, "decoder": 50054, "upsampler": 50055}
    port = default_ports[args.target] if args.port is None else args.port
    if args.target == "gateway":
        missing = [name for name in ("encoder", "prior", "decoder", "upsampler") if not getattr(args, name)]
        if missing:
            print(f"unclip serve gateway: give the address of: {', '.join('--' + m for m in missing)}", file=sys.stderr)
            return 2
        from gateway.remote import RemoteStages
        from gateway.servicer import SERVICES, ImageServicer

        def make_servicer():
            return ImageServicer(RemoteStages(args.encoder, args.prior, args.decoder, args.upsampler))

        services = SERVICES
    else:
        def make_servicer():
            return _stage_servicer(args.target, args.checkpoint, args.max_pending)

        services = _stage_services(args.target)
    asyncio.run(serve_forever(lambda: Server(make_servicer(), services, host=args.host, port=port)))
    return 0


def _stage_classes(target: str):
    if target == "encoder":
        from encoder_svc.servicer import SERVICES, ClipEncoderServicer

        return ClipEncoderServicer, SERVICES
    if target == "prior":
        from prior_svc.servicer import SERVICES, PriorServicer

        return PriorServicer, SERVICES
    from decoder_svc import servicer

    if target == "decoder":
        return servicer.DecoderServicer, servicer.DECODER_SERVICES
    return servicer.UpsamplerServicer, servicer.UPSAMPLER_SERVICES


def _stage_servicer(target: str, checkpoint: Path | None, max_pending: int):
    return _stage_classes(target)[0](checkpoint, max_pending=max_pending)


def _stage_services(target: str):
    return _stage_classes(target)[1]


def _serve_all(args: argparse.Namespace) -> int:
    import signal
    import time

    from unclip.launcher import DEFAULT_GATEWAY_PORT, LocalCluster, check_health

    cluster = LocalCluster(host=args.host, gateway_port=args.port or DEFAULT_GATEWAY_PORT, weights=args.weights)
    stop_requested = False

    def request_stop(signum, frame) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    cluster.start()
    try:
        ready_reported = False
        while not stop_requested:
            failed = cluster.failed()
            if failed is not None:
                print(f"unclip: {failed.name} exited with code {failed.process.returncode}; stopping", file=sys.stderr)
                return 1
            if not ready_reported and all(check_health(s.address, timeout=1.0) for s in cluster.services):
                print(f"unclip: serving; gateway at {cluster.gateway_address}", flush=True)
                ready_reported = True
            time.sleep(0.5)
        print("unclip: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        cluster.stop()

