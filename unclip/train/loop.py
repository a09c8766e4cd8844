"""The training loop shared by all four stages.

AdamW with gradient clipping, an EMA of the weights for the diffusion models, bf16 autocast on
CUDA and plain float32 on the CPU, periodic checkpoints, and exact resumption.

The output directory is an ordinary checkpoint (`config.json` + `model.safetensors`, holding the
EMA weights where there are any: what the services load) plus the state needed to go on training:

    train_weights.safetensors   the raw weights
    train_state.safetensors     optimizer tensors, RNG states, step
    train_state.json            step, examples seen, optimizer hyper-parameters, options
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from unclip.checkpoint import CONFIG_FILE, CheckpointError, load_weights, read_config, save_checkpoint, to_dict
from unclip.train.data import BatchStream, Source
from unclip.train.stages import Objective

TRAIN_WEIGHTS = "train_weights.safetensors"
TRAIN_STATE = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"
OPTIMIZER_PREFIX = "optimizer."


@dataclass
class TrainOptions:
    steps: int = 10_000  # total steps, counting those of the run being resumed
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.01  # matrices only, not biases, norms or embeddings of size 1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 0
    resume: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    step: int  # the step counter at the end
    steps_run: int  # steps taken by this run
    seconds: float
    losses: list[float] = field(default_factory=list)  # one per step of this run

    @property
    def steps_per_second(self) -> float:
        return self.steps_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


class EMA:
    """Exponential moving average of a model's weights; buffers are copied as they are.

    The decay ramps up as (1 + n) / (10 + n) over the first updates, so early, random weights
    are forgotten quickly.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, updates_so_far: int) -> None:
        decay = min(self.decay, (1 + updates_so_far) / (10 + updates_so_far))
        parameters = dict(model.named_parameters())
        for name, tensor in model.state_dict().items():
            if name in parameters:
                self.weights[name].lerp_(tensor, 1.0 - decay)
            else:
                self.weights[name].copy_(tensor)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def make_optimizer(model: nn.Module, options: TrainOptions) -> torch.optim.AdamW:
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": options.weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.999))


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer state dict as (named tensors for safetensors, JSON-able param groups)."""
    tensors = {
        f"{OPTIMIZER_PREFIX}{index}.{key}": value for index, state in state_dict["state"].items() for key, value in state.items()
    }
    return tensors, state_dict["param_groups"]


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(OPTIMIZER_PREFIX):
            index, key = name[len(OPTIMIZER_PREFIX) :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": param_groups}


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def read_train_state(out: Path) -> dict[str, Any]:
    """The JSON part of a run's training state: step, examples, optimizer groups, options, metadata."""
    path = Path(out) / TRAIN_STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"{out}: no {TRAIN_STATE_JSON}, so no training run to resume")
    return json.loads(path.read_text())


class Trainer:
    """Everything that a checkpoint captures, and one optimisation step."""

    def __init__(self, objective: Objective, options: TrainOptions):
        self.options = options
        self.device = resolve_device(options.device)
        self.objective = objective.to(self.device).train()
        self.model = objective.model
        self.optimizer = make_optimizer(self.model, options)
        self.ema = EMA(self.model, options.ema_decay) if objective.use_ema else None
        self.generator = torch.Generator().manual_seed(options.seed)  # the objective's noise, on the CPU
        self.step = 0
        self.examples = 0  # how far into the data stream we are

    def train_step(self, batch: dict[str, Any]) -> float:
        # bf16 autocast on CUDA; on the CPU this is a no-op and everything stays float32.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.objective(batch, self.generator)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"step {self.step + 1}: the loss is {value}; stopping before it reaches the weights")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        self.step += 1
        self.examples += len(batch["captions"])
        return value

    def save(self, out: Path, metadata: dict[str, Any]) -> None:
        raw = self.model.state_dict()
        served = self.ema.weights if self.ema is not None else raw
        optimizer_tensors, param_groups = flatten_optimizer_state(self.optimizer.state_dict())
        state = {
            **optimizer_tensors,
            "step": torch.tensor(self.step),
            "rng.torch": torch.get_rng_state(),
            "rng.generator": self.generator.get_state(),
        }
        if self.device.type == "cuda":
            state["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(out, self.objective.config, served, extra_files={TRAIN_WEIGHTS: raw, TRAIN_STATE: state})
        # Written after the tensors; `load` refuses a pair whose steps disagree (a save cut short).
        write_json_atomically(
            out / TRAIN_STATE_JSON,
            {
                "kind": self.objective.kind,
                "step": self.step,
                "examples": self.examples,
                "param_groups": param_groups,
                "options": dataclasses.asdict(self.options),
                **metadata,
            },
        )

    def load(self, out: Path) -> None:
        config = read_config(out)
        if to_dict(config) != to_dict(self.objective.config):
            raise CheckpointError(f"{out}: its config.json differs from the configuration being trained")
        info = read_train_state(out)
        if not (out / TRAIN_STATE).is_file():
            raise CheckpointError(f"{out}: no {TRAIN_STATE}, so no training run to resume")
        state = load_file(str(out / TRAIN_STATE))
        if int(state["step"]) != info["step"]:
            raise CheckpointError(f"{out}: {TRAIN_STATE_JSON} is at step {info['step']} but the tensors at {int(state['step'])}")

        self.model.load_state_dict(load_file(str(out / TRAIN_WEIGHTS)))
        if self.ema is not None:
            self.ema.weights = {name: tensor.to(self.device) for name, tensor in load_weights(out, config).items()}
        self.optimizer.load_state_dict(unflatten_optimizer_state(state, info["param_groups"]))
        # The saved groups carry the rate the run had; a resumed run trains at the one it is given now.
        for group in self.optimizer.param_groups:
            group["lr"] = self.options.lr
        torch.set_rng_state(state["rng.torch"])
        self.generator.set_state(state["rng.generator"])
        if "rng.cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng.cuda"], self.device)
        self.step, self.examples = info["step"], info["examples"]


def train(
    objective: Objective, source: Source, out: str | Path, options: TrainOptions, metadata: dict[str, Any] | None = None
) -> TrainResult:
    """Train `objective` on `source` until step `options.steps`, checkpointing into `out`.

    With `options.resume`, continue the run saved in `out`: weights, EMA, optimizer, RNG states and
    the data position are restored, so the result equals one uninterrupted run (on the CPU, with
    deterministic data). Without it, `out` must not hold a checkpoint yet.
    """
    out = Path(out)
    if not options.resume and (out / CONFIG_FILE).exists():
        raise FileExistsError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if options.steps < 1 or options.batch_size < 1 or options.checkpoint_every < 1:
        raise ValueError("steps, batch size and checkpoint interval must be positive")
    torch.manual_seed(options.seed)  # dropout, if a model has any
    trainer = Trainer(objective, options)
    if options.resume:
        trainer.load(out)

    stream = BatchStream(source, options.batch_size, start=trainer.examples)
    # The loader's own generator: seeding its workers must not draw from the restored global RNG.
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=options.workers,
        pin_memory=trainer.device.type == "cuda",
        generator=torch.Generator().manual_seed(options.seed),
    )
    batches = iter(loader)
    losses: list[float] = []
    bar = tqdm(total=options.steps, initial=trainer.step, unit="step", desc=objective.kind, disable=not options.progress)
    start = time.perf_counter()
    while trainer.step < options.steps:
        losses.append(trainer.train_step(next(batches)))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if trainer.step % options.checkpoint_every == 0 or trainer.step == options.steps:
            trainer.save(out, metadata or {})
            # A line per checkpoint, so a run in the background (no progress bar) leaves a log.
            recent = losses[-options.checkpoint_every :]
            rate = len(losses) / (time.perf_counter() - start)
            bar.write(
                f"{objective.kind}: step {trainer.step}/{options.steps}, loss {sum(recent) / len(recent):.4f} "
                f"(mean of the last {len(recent)}), {rate:.2f} steps/s, checkpoint {out}",
                file=sys.stderr,
            )
    seconds = time.perf_counter() - start
    bar.close()
    return TrainResult(step=trainer.step, steps_run=len(losses), seconds=seconds, losses=losses)
