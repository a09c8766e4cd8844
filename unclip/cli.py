"""The `unclip` command line: generate and manipulate images, serve the stages, benchmark.

Heavy imports (torch, grpc servers) happen inside the commands that need them, so that
`unclip --help` and `unclip generate --server ...` start quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from unclip import __version__

SERVE_TARGETS = ("encoder", "prior", "decoder", "upsampler", "gateway", "all", "ray")
DEFAULT_PROMPT = "a red circle in the top left corner"
# Subcommands that manipulate images, and the operation each names its files after.
MANIPULATIONS = {"variations": "variation", "interpolate": "interpolation", "textdiff": "textdiff", "edit": "edit"}


def _add_sampling_flags(parser: argparse.ArgumentParser, prior: bool = True) -> None:
    """The stage settings; `prior=False` for operations that start from an image, not a prompt."""
    parser.add_argument("--steps", type=int, help="denoising steps for every diffusion stage (per-stage flags override)")
    if prior:
        parser.add_argument("--prior-steps", type=int)
    parser.add_argument("--decoder-steps", type=int)
    parser.add_argument("--upsampler-steps", type=int)
    parser.add_argument("--sampler", choices=("ddim", "ddpm"))
    if prior:
        parser.add_argument("--prior-guidance", type=float, help="prior classifier-free guidance scale")
    parser.add_argument("--decoder-guidance", type=float, help="decoder classifier-free guidance scale")
    parser.add_argument(
        "--decoder-text-guidance", type=float,
        help="the caption's decoder guidance scale, on top of --decoder-guidance (the image embedding's)",
    )
    if prior:
        from unclip.pipeline import DEFAULT_PRIOR_CANDIDATES

        parser.add_argument(
            "--candidates", type=int, default=DEFAULT_PRIOR_CANDIDATES,
            help=f"prior samples per image; the closest to the text is kept (default {DEFAULT_PRIOR_CANDIDATES})",
        )


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    def pick(specific):
        return specific if specific is not None else args.steps

    kwargs = dict(
        decoder_steps=pick(args.decoder_steps), upsampler_steps=pick(args.upsampler_steps), sampler=args.sampler,
        decoder_guidance_scale=args.decoder_guidance, decoder_text_guidance_scale=args.decoder_text_guidance,
    )
    if "prior_steps" in args:
        kwargs |= dict(
            prior_steps=pick(args.prior_steps), prior_guidance_scale=args.prior_guidance, prior_candidates=args.candidates
        )
    return kwargs


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Where an image operation runs and where its files go (as for `generate`)."""
    parser.add_argument("--seed", type=int, help="default: random")
    parser.add_argument("--size", type=int, help="output side in pixels (default: the largest available)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="directory for the PNGs (default: ./out)")
    parser.add_argument("--server", metavar="HOST:PORT", help="run through a gateway instead of in-process")
    parser.add_argument("--weights", type=Path, help="in-process: directory with clip/ prior/ decoder/ upsampler/ checkpoints")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")


def _add_manipulation_commands(commands) -> None:
    variations = commands.add_parser("variations", help="variations of an image (its CLIP embedding decoded again)")
    variations.add_argument("image", type=Path, help="PNG, JPEG or WebP")
    variations.add_argument("-n", type=int, default=1, help="number of variations (variation i uses seed + i)")
    _add_run_flags(variations)
    _add_sampling_flags(variations, prior=False)

    interpolate = commands.add_parser("interpolate", help="frames between two images or two prompts")
    ends = interpolate.add_mutually_exclusive_group(required=True)
    ends.add_argument("--images", type=Path, nargs=2, metavar=("A", "B"), help="the two end images")
    ends.add_argument("--prompts", nargs=2, metavar=("P1", "P2"), help="the two end prompts")
    interpolate.add_argument("--frames", type=int, default=5, help="frames, both ends included (default: 5)")
    interpolate.add_argument("--gif", action="store_true", help="also write the frames as an animated GIF")
    _add_run_flags(interpolate)
    _add_sampling_flags(interpolate)

    textdiff = commands.add_parser("textdiff", help="frames moving an image from its caption toward a target caption")
    textdiff.add_argument("image", type=Path, help="PNG, JPEG or WebP")
    textdiff.add_argument("--caption", required=True, help="what the image shows now")
    textdiff.add_argument("--target", required=True, help="what it should show")
    textdiff.add_argument("--frames", type=int, default=5, help="frames, the unchanged start included (default: 5)")
    textdiff.add_argument("--max-rotation", type=float, help="how far the last frame moves, in (0, 1] (default: 0.5)")
    textdiff.add_argument("--gif", action="store_true", help="also write the frames as an animated GIF")
    _add_run_flags(textdiff)
    _add_sampling_flags(textdiff, prior=False)

    edit = commands.add_parser("edit", help="regenerate the transparent region of an image for a prompt")
    edit.add_argument("image", type=Path, help="PNG, JPEG or WebP; its alpha is the mask unless --mask is given")
    edit.add_argument("--prompt", required=True, help="describes the whole edited image")
    edit.add_argument("--mask", type=Path, help="PNG of the image's size: fully transparent pixels are regenerated")
    edit.add_argument("-n", type=int, default=1, help="number of edits (edit i uses seed + i)")
    _add_run_flags(edit)
    _add_sampling_flags(edit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unclip", description="DALL-E 2 (unCLIP) text-to-image")
    parser.add_argument("--version", action="version", version=f"unclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images for a prompt (in-process unless --server)")
    gen.add_argument("prompt")
    gen.add_argument("-n", type=int, default=1, help="number of images (image i uses seed + i)")
    _add_run_flags(gen)
    gen.add_argument(
        "--preview-every", type=int, default=0, metavar="N", help="a decoder preview every N steps (counted in the progress bar)"
    )
    _add_sampling_flags(gen)
    _add_manipulation_commands(commands)

    serve = commands.add_parser("serve", help="run a stage service, the gateway, or all of them")
    serve.add_argument("target", choices=SERVE_TARGETS)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, help="port (default: 50051 for gateway/all, 50052-50055 for the stages)")
    serve.add_argument("--checkpoint", type=Path, help="stage: checkpoint directory (default: the shipped weights)")
    serve.add_argument("--weights", type=Path, help="all: directory with clip/ prior/ decoder/ upsampler/")
    serve.add_argument("--max-pending", type=int, default=32, help="stage: queued requests before RESOURCE_EXHAUSTED")
    serve.add_argument("--config", type=Path, help="ray: Ray Serve config (default: deploy/ray/serve.yaml)")
    for stage in ("encoder", "prior", "decoder"):
        serve.add_argument(f"--{stage}", metavar="HOST:PORT", help=f"gateway: the {stage} service")
    serve.add_argument("--upsampler", metavar="HOST:PORT", action="append", help="gateway: an upsampler (repeat, in order)")
    serve.add_argument(
        "--http-port", type=int, default=8080,
        help="gateway/all: port of the OpenAI-compatible HTTP API (default 8080; 0 turns it off)",
    )

    bench = commands.add_parser("bench", help="benchmarks that print figures")
    bench.add_argument("what", choices=("pipeline",))
    bench.add_argument("--prompts", type=int, default=3, help="number of prompts")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--repeats", type=int, default=1, help="runs per prompt (the median is reported)")
    _add_sampling_flags(bench)

    from unclip.train.cli import add_export_parser, add_train_parser

    add_train_parser(commands)
    add_export_parser(commands)

    evaluate = commands.add_parser("eval", help="judge generated Shapes images against their prompts")
    evaluate.add_argument("--prompts", type=int, default=200, help="number of canonical prompts")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--split", choices=("all", "train", "heldout"), default="all", help="seen or held-out colour-shape pairs")
    evaluate.add_argument("--weights", type=Path, help="directory with clip/ prior/ decoder/ upsampler/ (default: shipped)")
    evaluate.add_argument("--json", type=Path, default=Path("out/eval.json"), help="where to write the full report")
    evaluate.add_argument("--images", type=Path, help="also write every judged image here, its verdict in its name")
    evaluate.add_argument("--retrieval-captions", type=int, default=200, help="held-out captions for CLIP retrieval")
    _add_sampling_flags(evaluate, prior=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "serve" and args.target != "all":
        logging.getLogger("unclip").setLevel(logging.INFO)
    try:
        if args.command == "generate":
            sys.exit(_generate(args))
        if args.command in MANIPULATIONS:
            sys.exit(_manipulate(args))
        if args.command == "serve":
            sys.exit(_serve(args))
        if args.command == "bench":
            from unclip.bench import run_pipeline_benchmark

            sys.exit(run_pipeline_benchmark(args.prompts, args.seed, args.repeats, _sampling_kwargs(args)))
        if args.command == "train":
            from unclip.train.cli import run_train

            sys.exit(run_train(args))
        if args.command == "export":
            from unclip.train.cli import run_export

            sys.exit(run_export(args))
        if args.command == "eval":
            sys.exit(_evaluate(args))
    except KeyboardInterrupt:
        sys.exit(130)


def _evaluate(args: argparse.Namespace) -> int:
    from unclip.eval.report import format_table, run_eval, write_report

    stages = _load_local_stages(args.weights)
    sampling = {key: value for key, value in _sampling_kwargs(args).items() if value is not None}
    report = run_eval(
        stages, prompts=args.prompts, seed=args.seed, split=args.split, sampling=sampling,
        retrieval_captions=args.retrieval_captions, images_dir=args.images,
    )
    write_report(report, args.json)
    print(format_table(report))
    print(f"full report: {args.json}")
    return 0


def _output_path(out: Path, prompt: str, seed: int) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "image"
    return out / f"{slug}-{seed}.png"


def _generate(args: argparse.Namespace) -> int:
    kwargs = dict(n=args.n, size=args.size, seed=args.seed, preview_every=args.preview_every, **_sampling_kwargs(args))
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
    from unclip.pipeline import GenerationParameters, generate

    stages = _load_local_stages(args.weights)
    bar, on_stage = _local_progress(stages)
    previews = 0

    def on_preview(step: int, total: int, images) -> None:
        nonlocal previews
        previews += 1
        bar.set_description(f"decode: {previews} previews")

    params = GenerationParameters(prompt=args.prompt, **{k: v for k, v in kwargs.items() if v is not None})
    try:
        images = asyncio.run(
            generate(stages, params, deadline=time.monotonic() + args.timeout, on_stage=on_stage, on_preview=on_preview)
        )
    except UnclipError as error:
        print(f"unclip: {error}", file=sys.stderr)
        return None
    finally:
        bar.close()
    return [(image.png, image.seed) for image in images]


def _load_local_stages(weights: Path | None):
    """The in-process stages: the shipped weights, or the checkpoints under `weights`."""
    from unclip.local import LocalStages

    return LocalStages.load(
        *(None if weights is None else weights / kind for kind in ("clip", "prior", "decoder")),
        upsamplers=None if weights is None else [weights / "upsampler"],
    )


def _local_progress(stages):
    """A progress bar fed by the in-process stages' steps, and the on_stage callback naming the stage."""
    bar = _progress_bar(None, "sampling")

    def on_step(step: int, total: int, x0) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.update(1)

    stages.progress = on_step

    def on_stage(event) -> None:
        bar.set_description(f"{event.stage} done ({event.completed}/{event.total})")

    return bar, on_stage


def _generate_remote(args: argparse.Namespace, kwargs: dict) -> list[tuple[bytes, int]] | None:
    from unclip.client import Client, Preview, UnclipError

    with Client(args.server, timeout=args.timeout) as client:
        bar = _progress_bar(None, "stages")
        previews = 0
        try:
            for event in client.generate_stream(args.prompt, **kwargs):
                if isinstance(event, list):
                    return [(image.png, image.seed) for image in event]
                if isinstance(event, Preview):
                    previews += 1
                    bar.set_description(f"decode: {previews} previews")
                    continue
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


@dataclass
class _Outcome:
    """What an image operation produced: (PNG, seed) per image in order, and the GIF if asked for."""

    images: list[tuple[bytes, int]]
    gif: bytes | None = None


def _manipulate(args: argparse.Namespace) -> int:
    """variations, interpolate, textdiff, edit: in-process, or through a gateway with --server."""
    try:
        uploads = _read_uploads(args)
    except OSError as error:
        print(f"unclip: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    outcome = _manipulate_remote(args, uploads) if args.server else _manipulate_local(args, uploads)
    if outcome is None:
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    operation = MANIPULATIONS[args.command]
    frames = args.command in ("interpolate", "textdiff")  # every frame has the same seed
    for index, (png, seed) in enumerate(outcome.images):
        path = args.out / (f"{operation}-{seed}-frame{index}.png" if frames else f"{operation}-{seed}.png")
        path.write_bytes(png)
        print(path)
    if outcome.gif is not None:
        path = args.out / f"{operation}-{outcome.images[0][1]}.gif"
        path.write_bytes(outcome.gif)
        print(path)
    return 0


def _read_uploads(args: argparse.Namespace) -> dict:
    """The image files the command names, read: "image", "mask" and "images" (each None if not given)."""
    image = getattr(args, "image", None)
    mask = getattr(args, "mask", None)
    images = getattr(args, "images", None)
    return {
        "image": None if image is None else image.read_bytes(),
        "mask": None if mask is None else mask.read_bytes(),
        "images": None if images is None else (images[0].read_bytes(), images[1].read_bytes()),
    }


def _manipulate_local(args: argparse.Namespace, uploads: dict) -> _Outcome | None:
    import time

    from gateway.api import ImageAPI
    from unclip.errors import UnclipError
    from unclip.pipeline import GenerationParameters

    settings = {k: v for k, v in _sampling_kwargs(args).items() if v is not None}
    params = GenerationParameters(
        prompt=getattr(args, "prompt", ""), n=getattr(args, "n", 1), size=args.size, seed=args.seed, **settings
    )
    stages = _load_local_stages(args.weights)
    bar, on_stage = _local_progress(stages)
    api = ImageAPI(stages)
    run = dict(deadline=time.monotonic() + args.timeout, on_stage=on_stage)
    if args.command == "variations":
        operation = api.variations(uploads["image"], params, **run)
    elif args.command == "edit":
        operation = api.edit(uploads["image"], uploads["mask"], params, **run)
    elif args.command == "interpolate":
        ends = {"images": uploads["images"]} if args.images else {"prompts": tuple(args.prompts)}
        operation = api.interpolate(params, args.frames, animated_gif=args.gif, **ends, **run)
    else:
        max_rotation = {} if args.max_rotation is None else {"max_rotation": args.max_rotation}
        operation = api.text_diff(
            uploads["image"], args.caption, args.target, params, args.frames, animated_gif=args.gif, **max_rotation, **run
        )
    try:
        result = asyncio.run(operation)
    except UnclipError as error:
        print(f"unclip: {error}", file=sys.stderr)
        return None
    finally:
        bar.close()
    return _Outcome([(image.png, image.seed) for image in result.images], result.gif)


def _manipulate_remote(args: argparse.Namespace, uploads: dict) -> _Outcome | None:
    from unclip.client import Animation, Client, UnclipError

    settings = dict(size=args.size, seed=args.seed, **_sampling_kwargs(args))
    with Client(args.server, timeout=args.timeout) as client:
        try:
            if args.command == "variations":
                result = client.variations(uploads["image"], n=args.n, **settings)
            elif args.command == "edit":
                result = client.edit(uploads["image"], args.prompt, mask=uploads["mask"], n=args.n, **settings)
            elif args.command == "interpolate":
                prompts = None if args.prompts is None else tuple(args.prompts)
                result = client.interpolate(
                    images=uploads["images"], prompts=prompts, frames=args.frames, animated_gif=args.gif, **settings
                )
            else:
                result = client.text_diff(
                    uploads["image"], args.caption, args.target, frames=args.frames, max_rotation=args.max_rotation,
                    animated_gif=args.gif, **settings,
                )
        except (UnclipError, ValueError, TypeError) as error:  # the SDK checks some arguments itself
            print(f"unclip: {error}", file=sys.stderr)
            return None
    if isinstance(result, Animation):
        return _Outcome([(frame.png, frame.seed) for frame in result.frames], result.gif)
    return _Outcome([(image.png, image.seed) for image in result])


def _serve(args: argparse.Namespace) -> int:
    if args.target == "all":
        return _serve_all(args)
    if args.target == "ray":
        return _serve_ray(args)
    from unclip.serving import Server, serve_forever

    default_ports = {"gateway": 50051, "encoder": 50052, "prior": 50053, "decoder": 50054, "upsampler": 50055}
    port = default_ports[args.target] if args.port is None else args.port
    if args.target == "gateway":
        missing = [name for name in ("encoder", "prior", "decoder", "upsampler") if not getattr(args, name)]
        if missing:
            print(f"unclip serve gateway: give the address of: {', '.join('--' + m for m in missing)}", file=sys.stderr)
            return 2
        from gateway.app import build_gateway
        from gateway.remote import RemoteStages
        from unclip.storage import StorageConfig

        try:
            storage = StorageConfig.from_env()
        except ValueError as error:
            print(f"unclip serve gateway: {error}", file=sys.stderr)
            return 2
        http_port = None if args.http_port == 0 else args.http_port

        def make_server():
            backend = RemoteStages(args.encoder, args.prior, args.decoder, args.upsampler)
            return build_gateway(backend, host=args.host, port=port, http_port=http_port, storage=storage)
    else:
        services = _stage_services(args.target)

        def make_server():
            return Server(_stage_servicer(args.target, args.checkpoint, args.max_pending), services, host=args.host, port=port)

    asyncio.run(serve_forever(make_server))
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

    cluster = LocalCluster(
        host=args.host, gateway_port=args.port or DEFAULT_GATEWAY_PORT, http_port=args.http_port, weights=args.weights
    )
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


def _serve_ray(args: argparse.Namespace) -> int:
    """Every stage and the gateway as Ray Serve applications on a local Ray cluster, until Ctrl-C."""
    import signal
    import threading

    import ray
    from ray import serve

    from unclip.ray_apps import APP_NAMES, DEFAULT_CONFIG, deploy, grpc_proxy_address, load_config

    config = load_config(args.config or DEFAULT_CONFIG)
    # A fresh local cluster (never one already running on this host), without the dashboard.
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        schema = deploy(config)
        print(f"unclip: serving on Ray; gRPC proxy at {grpc_proxy_address(schema)}", flush=True)
        print(f"unclip: name the app in the 'application' metadata key: {', '.join(APP_NAMES)}", flush=True)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        print("unclip: stopping", file=sys.stderr, flush=True)
        return 0
    except (RuntimeError, TimeoutError) as error:
        print(f"unclip serve ray: {error}", file=sys.stderr)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
