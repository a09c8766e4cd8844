"""Stage engines (numpy in, numpy out) and where their default checkpoints live."""

from __future__ import annotations

from pathlib import Path

STAGE_KINDS = ("clip", "prior", "decoder", "upsampler")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def default_checkpoint(kind: str) -> Path:
    """The checkpoint shipped inside the package for `kind`."""
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage {kind!r}; expected one of {STAGE_KINDS}")
    return WEIGHTS_DIR / kind


def load_engine(kind: str, directory: str | Path | None = None):
    """Build the engine for `kind` from a checkpoint directory (default: the shipped one)."""
    directory = Path(directory) if directory is not None else default_checkpoint(kind)
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
