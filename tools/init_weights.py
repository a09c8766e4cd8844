"""Write randomly initialised checkpoints (fixed seed) for every stage.

    python tools/init_weights.py --out unclip/weights

Used to bootstrap the package before trained weights exist and by tests that need a
checkpoint directory of a given geometry; `unclip train` writes the same format.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from unclip.checkpoint import save_checkpoint
from unclip.config import ClipStageConfig, DecoderStageConfig, PriorStageConfig, UpsamplerStageConfig
from unclip.models.clip import create_clip
from unclip.models.prior import DiffusionPrior
from unclip.models.unet import UNet
from unclip.stage import KINDS as STAGE_KINDS


def init_stage(kind: str, out: Path, seed: int = 0, storage_dtype: torch.dtype = torch.float16) -> Path:
    torch.manual_seed(seed)
    if kind == "clip":
        config = ClipStageConfig()
        module = create_clip(config.model_name)
    elif kind == "prior":
        config = PriorStageConfig()
        module = DiffusionPrior(config.model)
    elif kind == "decoder":
        config = DecoderStageConfig()
        module = UNet(config.model)
    else:
        config = UpsamplerStageConfig()
        module = UNet(config.model)
    # Zero-initialised output layers make a fresh network ignore its inputs; nudge them so that
    # untrained checkpoints still carry every input through to the output (tests rely on it).
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.02)
    return save_checkpoint(out / kind, config, module.state_dict(), storage_dtype=storage_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", default=list(STAGE_KINDS), choices=STAGE_KINDS)
    args = parser.parse_args()
    for kind in args.stages:
        print(init_stage(kind, args.out, args.seed))


if __name__ == "__main__":
    main()
