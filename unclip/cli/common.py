"""What the image commands share: flags derived from the parameter set, where a command runs
(in-process or through a gateway), progress, errors and the files it writes.

Heavy imports (torch, grpc servers) happen inside the commands that need them, so that
`unclip --help` and `unclip generate --server ...` start quickly.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unclip.cli import tls_flags
from unclip.parameters import Group, parameters, spec_of, value_type

STEPS_FLAG = "--steps"


# Parameters that are not sampling settings: benchmarks and evaluations choose them themselves.
NOT_SAMPLING = ("n", "size", "seed")


def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    """argparse type of a number above 0: an int (a count: a quota, a limit per key; digits
    only) or a float (seconds)."""
    noun = "integer" if kind is int else "number"

    def parse(text: str) -> int | float:
        # Digits only for a count: int() would also take "+3", " 3" and "3_000".
        if kind is int and not text.isdigit():
            raise argparse.ArgumentTypeError(f"must be a positive {noun}, got {text!r}")
        value = kind(text)  # a ValueError: argparse says "invalid float value"
        if not value > 0:  # not `<= 0`: NaN is no positive number either
            raise argparse.ArgumentTypeError(f"must be a positive {noun}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


positive_int = positive(int)


def _taken(operation: str, skip: tuple[str, ...]) -> list[Any]:
    return [item for item in parameters(operation) if spec_of(item).group is not Group.PROMPT and item.name not in skip]


def add_parameter_flags(parser: argparse.ArgumentParser, operation: str, skip: tuple[str, ...] = ()) -> None:
    """A flag for each generation parameter `operation` takes, but those in `skip` and the
    prompt (commands take it their own way), named and documented by unclip.parameters; none
    of them has a default here, so what is not given takes the model's (or server's) default."""
    if any(item.name.endswith("_steps") for item in _taken(operation, skip)):
        parser.add_argument(STEPS_FLAG, type=int, help="denoising steps for every diffusion stage (per-stage flags override)")
    for item in _taken(operation, skip):
        spec = spec_of(item)
        default = "" if item.default is None else f" (default: {item.default})"
        flag = spec.flag or "--" + item.name.replace("_", "-")
        parser.add_argument(flag, dest=item.name, type=value_type(item.name), choices=spec.choices, help=f"{spec.help}{default}")


def parameters_from_args(args: argparse.Namespace, operation: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The generation parameters given on the command line (as `add_parameter_flags` added
    them), as keyword arguments."""
    given: dict[str, Any] = {}
    for item in _taken(operation, skip):
        value = getattr(args, item.name, None)
        if value is None and item.name.endswith("_steps"):
            value = getattr(args, "steps", None)
        if value is not None:
            given[item.name] = value
    return given


def compute_batch_spec(text: str) -> str:
    """An argparse type: `text` if it is a valid --compute-batch, else a usage error saying why."""
    from unclip.stages.batcher import compute_batches

    try:
        compute_batches(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_compute_batch_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compute-batch", metavar="N|STAGE=N,...", default="1", type=compute_batch_spec,
        help="rows per network evaluation, for every stage (8) or some (prior=16,decoder=4; the others 1). A row's "
        "result depends on it, never on what it is batched with; 1 evaluates each row alone (default)",
    )  # fmt: skip


def batch_settings(args: argparse.Namespace) -> dict[Any, Any]:
    """Each stage's BatchSettings from --compute-batch (and, where the command has them, the
    batching flags)."""
    from unclip.stages.batcher import BatchSettings, compute_batches

    grouping = {
        name: getattr(args, name)
        for name in ("max_batch_size", "batch_wait_s", "max_pending")
        if getattr(args, name, None) is not None
    }
    return {stage: BatchSettings(compute_batch=n, **grouping) for stage, n in compute_batches(args.compute_batch).items()}


def add_api_key_flag(parser: Any) -> None:
    """--api-key: the key a command sends to a gateway (a parser or an argument group)."""
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="with --server: the gateway's API key (default: $UNCLIP_API_KEY; a flag shows in the process list, the variable does not)",
    )


def api_key(args: argparse.Namespace) -> str | None:
    """The API key given by --api-key, else $UNCLIP_API_KEY; None: send none."""
    from unclip import settings

    return getattr(args, "api_key", None) or settings.API_KEY.get()


def add_image_flags(parser: argparse.ArgumentParser, operation: str) -> None:
    """An image command's flags: where it runs and where its files go, and its parameters."""
    parser.add_argument("--out", type=Path, default=Path("out"), help="directory for the files (default: ./out)")
    parser.add_argument("--server", metavar="HOST:PORT", help="run through a gateway instead of in-process")
    parser.add_argument(
        "--application",
        metavar="NAME",
        help="with --server at a Ray Serve gRPC proxy: the gateway's application (e.g. gateway)",
    )
    tls_flags.add_client_flags(parser)
    add_api_key_flag(parser)
    parser.add_argument("--weights", type=Path, help="in-process: directory with clip/ prior/ decoder/ upsampler/ checkpoints")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    add_compute_batch_flag(parser)
    add_parameter_flags(parser, operation)


class Progress:
    """A progress bar on stderr when it is a terminal: diffusion steps in-process, stages through a gateway."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=None, desc="sampling", disable=not sys.stderr.isatty(), leave=False)
        self.previews = 0

    def step(self, step: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.update(1)

    def event(self, event: Any) -> None:
        """A StageProgress or Preview from a stream."""
        from unclip.client import Preview

        if isinstance(event, Preview):
            self.previews += 1
            self.bar.set_description(f"decode: {self.previews} previews")
        else:
            self.bar.set_description(f"{event.stage} done ({event.completed}/{event.total})")

    def close(self) -> None:
        self.bar.close()


@contextmanager
def backend(args: argparse.Namespace, progress: Progress | None = None) -> Iterator[Any]:
    """The client a command calls: the SDK's `Client` for a gateway (--server), else a
    `LocalClient` with the same methods on the in-process stages."""
    if args.server:
        from unclip.client import Client

        if args.compute_batch != "1":
            raise ValueError(
                "--compute-batch: with --server the stages' own compute batch applies (unclip serve --compute-batch)"
            )
        credentials = tls_flags.client_credentials(args)
        with Client(
            args.server, timeout=args.timeout, application=args.application, credentials=credentials, api_key=api_key(args)
        ) as client:
            yield client
    else:
        if tls_flags.client_credentials_given(args):
            raise ValueError("--tls, --tls-ca, --tls-cert and --tls-key are for a gateway's connection (--server)")
        from unclip.local import LocalStages
        from unclip.local_client import LocalClient

        stages = LocalStages.load(args.weights, settings=batch_settings(args))
        with LocalClient(stages=stages, timeout=args.timeout, progress=progress and progress.step) as client:
            yield client


def reports_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command's `run` whose failed call, argument that cannot be sent or file that cannot be
    read is one line on stderr and exit code 1, not a traceback."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        return _reporting_errors(run, args)

    return wrapper


def _reporting_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from unclip.errors import UnclipError

    try:
        return run(args)
    except OSError as error:
        print(
            f"unclip: cannot read {error.filename}: {error.strerror}" if error.filename else f"unclip: {error}", file=sys.stderr
        )
    except (UnclipError, ValueError, TypeError) as error:  # the SDK checks some arguments itself
        print(f"unclip: {error}", file=sys.stderr)
    return 1


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "image"


def write_images(out: Path, named: list[tuple[str, bytes]]) -> None:
    """Write each (file name, bytes) under `out` and print its path."""
    out.mkdir(parents=True, exist_ok=True)
    for name, data in named:
        path = out / name
        path.write_bytes(data)
        print(path)


def write_animation(out: Path, operation: str, animation: Any) -> None:
    """An interpolation's or text diff's frames (they share one seed), and its GIF if any."""
    seed = animation.frames[0].seed
    named = [(f"{operation}-{frame.seed}-frame{index}.png", frame.png) for index, frame in enumerate(animation.frames)]
    if animation.gif is not None:
        named.append((f"{operation}-{seed}.gif", animation.gif))
    write_images(out, named)
