"""Stage engines (numpy in, numpy out) and where their default checkpoints live."""

from __future__ import annotations

import os
from pathlib import Path

STAGE_KINDS = ("clip", "prior", "decoder", "upsampler")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# CPU kernels split some matrix products differently for different intra-op thread counts, which
# changes the last bits of a result and, after many diffusion steps, a pixel by a level. Every
# process that runs an engine (in-process, a stage service, a Ray replica, whatever its CPU
# allotment) therefore computes with the same thread count, so a seed gives the same image.
COMPUTE_THREADS_ENV = "UNCLIP_TORCH_THREADS"
DEFAULT_COMPUTE_THREADS = 2


def compute_threads() -> int:
    value = os.environ.get(COMPUTE_THREADS_ENV, str(DEFAULT_COMPUTE_THREADS))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{COMPUTE_THREADS_ENV} must be a positive integer, got {value!r}")
    return int(value)


def default_checkpoint(kind: str) -> Path:
    """The checkpoint shipped inside the package for `kind`."""
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage {kind!r}; expected one of {STAGE_KINDS}")
    return WEIGHTS_DIR / kind


def load_engine(kind: str, directory: str | Path | None = None):
    """Build the engine for `kind` from a checkpoint directory (default: the shipped one)."""
    directory = Path(directory) if directory is not None else default_checkpoint(kind)
    import torch

    torch.set_num_threads(compute_threads())
    if kind == "clip":
        from unclip.stages.clip import ClipEncoder as engine
    elif kind == "prior":
        from unclip.stages.prior import PriorSampler as engine
    elif kind == "decoder":
        from unclip.stages.decoder import ImageDecoder as engine
    elif kind == "upsampler":
        from unclip.stages.upsampler import ImageUpsampler as engine
    else:
        raise ValueError(f"unknown stage {kind!r}; expected one of {STAGE_KINDS}")
    return engine.from_checkpoint(directory)
