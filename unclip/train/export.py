"""Turn a training run's directory into a servable checkpoint: config + served weights only.

A run directory also holds raw weights, optimizer state and RNG states (hundreds of MB for
nothing a service needs). Export keeps `config.json`, the served (EMA) weights cast to a storage
dtype, and `training.json`: where the weights came from (stage, step, examples seen, data,
options), so shipped weights say how they were made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unclip.checkpoint import CheckpointError, load_weights, read_config, save_checkpoint
from unclip.config import StageConfig

TRAINING_RECORD = "training.json"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def training_record(directory: str | Path) -> dict:
    """What is known of how a checkpoint was made: its training state or its exported record."""
    from unclip.train.loop import TRAIN_STATE_JSON, read_train_state

    directory = Path(directory)
    if (directory / TRAIN_STATE_JSON).is_file():
        state = read_train_state(directory)
        recorded = (
            "kind",
            "step",
            "examples",
            "options",
            "data",
            "mention_p",
            "contrast_group",
            "two_object_fraction",
            "extra_vocabulary",
            "drop_text",
            "lock",
            "clip",
            "init",
        )
        return {key: state[key] for key in recorded if key in state}
    if (directory / TRAINING_RECORD).is_file():
        record = json.loads((directory / TRAINING_RECORD).read_text())
        record.pop("stored_as", None)
        return record
    return {}


def write_servable(
    out: str | Path, config: StageConfig, weights: dict[str, torch.Tensor], record: dict, dtype: str, source: str | Path
) -> Path:
    """Save `weights` cast to `dtype` with `record` as the training record, atomically."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    # Storage is rounding only: non-finite values after the cast mean the weights do not fit the dtype.
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor.to(STORAGE_DTYPES[dtype])).all():
            raise ValueError(f"{source}: {name} overflows {dtype}; export as float32 instead")
    target = save_checkpoint(out, config, weights, storage_dtype=STORAGE_DTYPES[dtype])
    (target / TRAINING_RECORD).write_text(json.dumps({"stored_as": dtype, **record}, indent=2) + "\n")
    return target


def export_checkpoint(run: str | Path, out: str | Path, dtype: str = "float16") -> Path:
    """Write `run`'s servable checkpoint to `out` (replacing what is there, atomically)."""
    run, out = Path(run), Path(out)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if run.resolve() == out.resolve():
        raise ValueError(f"{run}: exporting a checkpoint onto itself would delete its training state")
    config = read_config(run)
    record = training_record(run)
    if record and "kind" in record and record["kind"] != config.kind:
        raise CheckpointError(f"{run}: its training record is for stage {record['kind']!r}, config.json for {config.kind!r}")
    return write_servable(out, config, load_weights(run, config), record, dtype, run)
