"""Checkpoint directories: `config.json` (a stage config) plus safetensors weights.

Saving writes into a temporary sibling directory and renames it into place, so a crash never
leaves a half-written checkpoint where a service would load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unclip.config import StageConfig, stage_config_from_dict, to_dict

CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


def read_config(directory: str | os.PathLike) -> StageConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; a checkpoint directory needs a config and weights")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    try:
        return stage_config_from_dict(data)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from error


def weights_path(directory: str | os.PathLike, config: StageConfig) -> Path:
    return Path(directory) / config.weights  # an absolute config.weights wins in the join


def load_weights(directory: str | os.PathLike, config: StageConfig) -> dict[str, torch.Tensor]:
    path = weights_path(directory, config)
    if not path.is_file():
        raise CheckpointError(f"{directory}: weights file {path} not found")
    # Weights may be stored in half precision to keep the package small; compute in float32.
    return {name: t.float() if t.is_floating_point() else t for name, t in load_file(str(path)).items()}


def save_checkpoint(
    directory: str | os.PathLike,
    config: StageConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    storage_dtype: torch.dtype | None = None,
    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write config + weights (+ e.g. EMA or optimizer tensors in `extra_files`) atomically."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tensors = {
            name: (t.to(storage_dtype) if storage_dtype is not None and t.is_floating_point() else t).detach().cpu().contiguous()
            for name, t in state_dict.items()
        }
        save_file(tensors, str(staging / config.weights), metadata={"kind": config.kind})
        for filename, extra in (extra_files or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(staging / filename))
        payload = {"format_version": FORMAT_VERSION, **to_dict(config)}
        (staging / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            target.rename(backup)
            staging.rename(target)
            shutil.rmtree(backup)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def weights_version(directory: str | os.PathLike, config: StageConfig) -> str:
    """Short content hash of the weights file: names the exact model that made an image."""
    digest = hashlib.sha256()
    with open(weights_path(directory, config), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    family = getattr(config, "family", "unclip")
    prefix = config.kind if family == "unclip" else f"{config.kind}-{family}"  # imported weights say so
    return f"{prefix}-{digest.hexdigest()[:12]}"
