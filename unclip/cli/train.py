"""`unclip train clip|prior|decoder|upsampler`: train one stage with its shipped default config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from unclip.stage import KINDS

DATA_SIZE = 128  # the side training images are loaded at: the upsampler's output size


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("train", help="train one stage and write a checkpoint directory")
    parser.add_argument("stage", choices=KINDS)
    parser.add_argument(
        "--data",
        required=True,
        help="'shapes', a directory of images + .txt captions, a .tar shard, a directory of shards, or a glob of shards",
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (and to resume from)")
    parser.add_argument("--steps", type=int, default=10_000, help="total steps, counting resumed ones (default: 10000)")
    parser.add_argument("--batch-size", type=int, help="rows per step (default: 64; a resumed run keeps its own)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default: per stage)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--clip", type=Path, help="prior, decoder: frozen CLIP (default: the shipped one or the resumed run's)")
    parser.add_argument(
        "--init",
        type=Path,
        help="start from this checkpoint's weights (same stage and geometry as the run's config), e.g. to fine-tune with another "
        "parameterization or data; the optimizer and EMA start fresh",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="train with this stage config (a checkpoint directory or its config.json) instead of the stage's "
        "default, e.g. another geometry; a resumed run keeps its own",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        help="steps between checkpoints, and one at the end (default: 1000; a resumed run keeps its own)",
    )
    parser.add_argument("--seed", type=int, help="initialisation, data and noise (default: 0; a resumed run keeps its own)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--workers", type=int, default=0, help="data loading processes (default: load in the training process)")
    parser.add_argument(
        "--mention-p",
        type=float,
        help="shapes: probability that a caption states each optional attribute (size, position, background) "
        "(default: 0.5; a resumed run keeps its own)",
    )
    parser.add_argument(
        "--contrast-group",
        type=int,
        help="shapes: follow each scene with N-1 variants whose captions differ from it in one fact (position, "
        "colour, shape, size, relation or which colour goes with which shape): hard negatives for CLIP; "
        "--batch-size must be a multiple of N (default: 1, off; a resumed run keeps its own)",
    )
    parser.add_argument(
        "--two-object-fraction",
        type=float,
        help="shapes: share of scenes with two objects in a relation (default: 0.3; a resumed run keeps its own)",
    )
    parser.add_argument(
        "--extra-vocabulary",
        type=float,
        help="shapes: share of scenes drawn with more colours and shapes than the domain has (held-out pairs still "
        "excepted), so that colour and shape are learnt as separate facts (default: 0, off; a resumed run keeps its own)",
    )
    parser.add_argument(
        "--drop-text",
        type=float,
        help="prior, decoder: share of rows trained without the caption, for classifier-free guidance "
        "(default: 0.1 prior, 0.5 decoder, as DALL-E 2; a resumed run keeps its own)",
    )
    parser.add_argument(
        "--lock",
        choices=("image", "text"),
        help="clip: freeze this tower and train only the other (LiT); a resumed run keeps its lock, "
        "and a run started with --init from a locked one trains both",
    )
    parser.add_argument("--image-size", type=int, default=DATA_SIZE, help=f"side of the training images (default: {DATA_SIZE})")
    return parser


def initialise_from(objective, directory: Path) -> None:
    """Load `directory`'s served weights into the network being trained; geometry must match."""
    from unclip.checkpoint import CheckpointError, load_weights, read_config

    source = read_config(directory)
    if source.kind != objective.kind:
        raise CheckpointError(f"--init {directory}: a {source.kind!r} checkpoint cannot start a {objective.kind!r} run")
    try:
        # Parameters new to this configuration (e.g. position embeddings) keep their initialisation.
        result = objective.model.load_state_dict(load_weights(directory, source), strict=False)
    except RuntimeError as error:  # differently shaped tensors
        raise CheckpointError(f"--init {directory}: its weights do not fit this configuration: {error}") from None
    if result.unexpected_keys:
        raise CheckpointError(
            f"--init {directory}: its weights do not fit this configuration: unexpected {result.unexpected_keys}"
        )
    if result.missing_keys:
        print(f"--init {directory}: new parameters start from their initialisation: {result.missing_keys}", file=sys.stderr)


def lock_tower(objective, tower: str) -> None:
    """Freeze one CLIP tower (open_clip's LiT locking) so that only the other one trains."""
    if objective.kind != "clip":
        raise ValueError(f"--lock freezes a CLIP tower; the {objective.kind} stage has none")
    if tower == "image":
        objective.model.lock_image_tower()
    else:
        objective.model.lock_text_tower()


# Options a run records, with their defaults; a resumed run takes the recorded value of each one
# not given again, so that `--resume` alone continues the same run (same data stream, batch size,
# seed, learning rate, caption dropout and CLIP). Training options are recorded under "options".
RESUMABLE_TRAINING_OPTIONS = {"batch_size": 64, "checkpoint_every": 1000, "seed": 0, "lr": None}  # lr None: the stage's
RESUMABLE_RUN_OPTIONS = {
    "mention_p": 0.5,
    "contrast_group": 1,
    "two_object_fraction": 0.3,
    "extra_vocabulary": 0.0,
    "drop_text": None,
    "clip": None,
}


def resolve_resumable(args: argparse.Namespace, previous: dict) -> None:
    """Fill in every resumable option left unset: the run's recorded value, else the default."""
    for recorded, defaults in ((previous.get("options", {}), RESUMABLE_TRAINING_OPTIONS), (previous, RESUMABLE_RUN_OPTIONS)):
        for name, default in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, recorded.get(name, default))


def run(args: argparse.Namespace) -> int:
    """Exit code 0 on success; 1, with a message and no traceback, for bad data or checkpoints."""
    import torch

    from unclip.checkpoint import CONFIG_FILE, CheckpointError, read_config
    from unclip.config import STAGE_CONFIGS
    from unclip.stage import UNCLIP
    from unclip.train.data import DataError, open_source
    from unclip.train.loop import TrainOptions, read_train_state, train
    from unclip.train.stages import DEFAULT_LR, make_objective

    try:
        # A resumed run keeps the configuration it was started with.
        if args.resume:
            if args.config is not None:
                raise CheckpointError(f"--config starts a new run; {args.out} resumes with the config saved there")
            config = read_config(args.out)
        elif args.config is not None:
            config = read_config(args.config.parent if args.config.name == CONFIG_FILE else args.config)
        else:
            config = STAGE_CONFIGS[args.stage, UNCLIP]()
        if getattr(config, "family", UNCLIP) != UNCLIP:
            raise CheckpointError(f"training builds unclip's own networks; this is a {config.family!r} checkpoint")
        if config.kind != args.stage:
            raise CheckpointError(f"{args.out}: holds a checkpoint of stage {config.kind!r}, not {args.stage!r}")
        # A resumed run goes on with what it recorded (the prior and decoder with the CLIP they started with).
        previous = read_train_state(args.out) if args.resume else {}
        resolve_resumable(args, previous)
        options = TrainOptions(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr if args.lr is not None else DEFAULT_LR[args.stage],
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            device=args.device,
            workers=args.workers,
            resume=args.resume,
            progress=sys.stderr.isatty(),
        )
        if not 1 <= args.contrast_group <= args.batch_size:
            raise ValueError(f"--contrast-group must lie in [1, --batch-size {args.batch_size}], got {args.contrast_group}")
        if args.batch_size % args.contrast_group:
            raise ValueError(
                f"--batch-size {args.batch_size} is not a multiple of --contrast-group {args.contrast_group}: "
                "a group split across batches loses its hard negatives"
            )
        shapes_options = {
            "mention_p": args.mention_p,
            "contrast_group": args.contrast_group,
            "two_object_fraction": args.two_object_fraction,
            "extra_vocabulary": args.extra_vocabulary,
        }
        source = open_source(args.data, args.image_size, args.seed, **shapes_options)
        torch.manual_seed(args.seed)  # the freshly initialised network
        objective = make_objective(config, args.clip, args.drop_text)
        if args.init is not None and not args.resume:
            initialise_from(objective, args.init)
        lock = previous.get("lock") if args.resume else args.lock
        if args.resume and args.lock not in (None, lock):
            raise CheckpointError(f"{args.out}: the run was started with --lock {lock}; it resumes with that lock only")
        if lock is not None:
            lock_tower(objective, lock)
        # A resumed run keeps recording the checkpoint it was initialised from.
        init = previous.get("init") if args.resume else args.init and str(args.init)
        metadata = {"data": args.data, "clip": None if args.clip is None else str(args.clip), "init": init, "lock": lock}
        if hasattr(objective, "drop_text"):
            metadata["drop_text"] = objective.drop_text
        if args.data == "shapes":
            metadata |= shapes_options
        result = train(objective, source, args.out, options, metadata)
    except (DataError, CheckpointError, FileExistsError, FloatingPointError, ValueError) as error:
        print(f"unclip train: {error}", file=sys.stderr)
        return 1
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(
        f"{args.stage}: step {result.step} ({result.steps_run} this run) in {result.seconds:.1f} s, "
        f"{result.steps_per_second:.2f} steps/s, final loss {loss}; checkpoint {args.out}"
    )
    return 0
