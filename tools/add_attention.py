"""Give a trained UNet checkpoint attention at more resolutions without changing what it computes.

    python tools/add_attention.py runs/decoder_v3 runs/decoder_a16_init --rates 2 4
    unclip train decoder --config runs/decoder_a16_init --init runs/decoder_a16_init --out runs/decoder_a16 ...

A new attention block ends in a zero-initialised projection, so the widened network gives the
same output as the one it came from and training starts where that one stopped. Inserting a
block shifts the index of the Upsample that follows it in its stage, so weights are matched by
block order instead of by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from unclip.checkpoint import load_weights, read_config, save_checkpoint
from unclip.models.unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample
from unclip.train.export import TRAINING_RECORD, training_record

BLOCK_TYPES = (ResBlock, AttentionBlock, Upsample, Downsample)


def _blocks(model: UNet) -> list[tuple[str, torch.nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BLOCK_TYPES)]


def _same_geometry(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return type(a) is type(b) and sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def add_attention(source: Path, out: Path, rates: tuple[int, ...], seed: int = 0) -> Path:
    config = read_config(source)
    if config.kind not in ("decoder", "upsampler"):
        raise ValueError(f"{source}: a {config.kind} checkpoint has no UNet")
    missing = set(config.model.attention_downsample_rates) - set(rates)
    if missing:
        raise ValueError(f"--rates must keep the attention the checkpoint has, at {sorted(missing)}")
    old = UNet(config.model)
    old.load_state_dict(load_weights(source, config))
    widened = dataclasses.replace(
        config, model=dataclasses.replace(config.model, attention_downsample_rates=tuple(sorted(rates)))
    )
    torch.manual_seed(seed)
    new = UNet(widened.model)

    # Walk both block lists in order; a block of the new network with no counterpart is new attention.
    renames, old_blocks = {}, _blocks(old)
    for name, block in _blocks(new):
        if len(renames) < len(old_blocks) and _same_geometry(old_blocks[len(renames)][1], block):
            renames[old_blocks[len(renames)][0]] = name
        elif not isinstance(block, AttentionBlock):
            raise ValueError(f"{source}: cannot match block {name} of the widened network")
    if len(renames) != len(old_blocks):
        raise ValueError(f"{source}: matched {len(renames)} of its {len(old_blocks)} blocks")

    state = new.state_dict()
    for key, value in old.state_dict().items():
        owner = max((prefix for prefix in renames if key.startswith(prefix + ".")), key=len, default=None)
        state[key if owner is None else renames[owner] + key[len(owner) :]] = value
    new.load_state_dict(state)
    target = save_checkpoint(out, widened, new.state_dict())
    record = {
        "kind": config.kind,
        "widened": {
            "attention_downsample_rates": list(widened.model.attention_downsample_rates),
            "from": {"path": str(source), **training_record(source)},
        },
    }
    (target / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="decoder or upsampler checkpoint (or training run) directory")
    parser.add_argument("out", type=Path, help="where to write the widened checkpoint")
    parser.add_argument("--rates", type=int, nargs="+", required=True, help="all attention downsample rates, e.g. 2 4")
    parser.add_argument("--seed", type=int, default=0, help="initialisation of the new blocks")
    args = parser.parse_args()
    print(f"wrote {add_attention(args.source, args.out, tuple(args.rates), args.seed)}")


if __name__ == "__main__":
    main()
