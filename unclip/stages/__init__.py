"""Stage engines (numpy in, numpy out) and where their default checkpoints live."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

from unclip import metrics, settings
from unclip.stage import DIFFUSERS, UNCLIP, Stage

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Where each stage's engine class lives for each model family (imported on first use: they
# need torch, and the diffusers family needs diffusers).
ENGINES = {
    (Stage.ENCODER, UNCLIP): "unclip.stages.clip:ClipEncoder",
    (Stage.PRIOR, UNCLIP): "unclip.stages.prior:PriorSampler",
    (Stage.DECODER, UNCLIP): "unclip.stages.decoder:ImageDecoder",
    (Stage.UPSAMPLER, UNCLIP): "unclip.stages.upsampler:ImageUpsampler",
    (Stage.ENCODER, DIFFUSERS): "unclip.stages.clip:ClipEncoder",
    (Stage.PRIOR, DIFFUSERS): "unclip.stages.diffusers_family:DiffusersPrior",
    (Stage.DECODER, DIFFUSERS): "unclip.stages.diffusers_family:DiffusersDecoder",
    (Stage.UPSAMPLER, DIFFUSERS): "unclip.stages.diffusers_family:DiffusersUpsampler",
}


def _stage(stage: Stage | str) -> Stage:
    return stage if isinstance(stage, Stage) else Stage.from_kind(stage)


def default_checkpoint(stage: Stage | str) -> Path:
    """The checkpoint shipped inside the package for a stage (or a checkpoint kind)."""
    return WEIGHTS_DIR / _stage(stage).kind


def engine_class(stage: Stage | str, family: str = UNCLIP) -> Any:
    module, name = ENGINES[_stage(stage), family].split(":")
    return getattr(importlib.import_module(module), name)


def load_engine(stage: Stage | str, directory: str | Path | None = None, *, compute_batch: int = 1) -> Any:
    """Build the engine of a stage (or a checkpoint kind) from a checkpoint directory (default:
    the shipped one), evaluating its network `compute_batch` rows at a time (1: row by row)."""
    from unclip.checkpoint import read_config
    from unclip.stages.compute import on_compute_thread

    stage = _stage(stage)
    path = Path(directory) if directory is not None else default_checkpoint(stage)
    cls = engine_class(stage, read_config(path).family)
    _fix_thread_count()  # for engines called directly on this thread (tests, training evals)
    started = time.perf_counter()
    # Loaded where CPU engines compute, so no other thread starts an OpenMP team (stages/compute.py).
    engine = on_compute_thread(_load, cls, path, compute_batch)
    metrics.MODEL_LOAD_SECONDS.labels(stage.value).set(time.perf_counter() - started)
    metrics.set_build_info(stage.value, engine.version)
    return engine


def _fix_thread_count() -> None:
    import torch

    # CPU kernels split some matrix products differently for different intra-op thread counts,
    # which changes the last bits of a result and, after many diffusion steps, a pixel by a level.
    # Every process that runs an engine (in-process, a stage service, a Ray replica, whatever its
    # CPU allotment) therefore computes with the same thread count, so a seed gives the same image.
    torch.set_num_threads(settings.TORCH_THREADS.get())


def _load(cls: Any, path: Path, compute_batch: int) -> Any:
    _fix_thread_count()
    return cls.from_checkpoint(path, compute_batch=compute_batch)
