"""Mix a checkpoint with its fine-tune in weight space: (1 - alpha) * start + alpha * end.

    python tools/interpolate_weights.py runs/a16/init RUN unclip/weights/decoder --alpha 0.5

A fine-tune that gains on what it was tuned for can lose what the start did well (here: a
decoder tuned on more two-object scenes forgot part of how to draw colour-shapes it never saw).
Interpolating the weights of a model and its own fine-tune (WiSE-FT, Wortsman et al. 2022)
often keeps most of both, since the two sit in one basin of the loss. The result is written as
a servable checkpoint whose `training.json` records alpha and both parents' records.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unclip.checkpoint import load_weights, read_config
from unclip.train.export import STORAGE_DTYPES, training_record, write_servable
from unclip.validation import check_fraction


def _network(config):
    """What fixes a stage's tensors: its model geometry, or for CLIP the open_clip model name."""
    return config.model if hasattr(config, "model") else config.model_name


def interpolate(start: Path, end: Path, out: Path, alpha: float, dtype: str = "float16") -> Path:
    check_fraction(alpha, "alpha")
    first, second = read_config(start), read_config(end)
    if first.kind != second.kind or _network(first) != _network(second):
        raise ValueError(
            f"{start} and {end} are not the same network ({first.kind} vs {second.kind}); only a model and its fine-tune mix"
        )
    a, b = load_weights(start, first), load_weights(end, second)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError(f"{start} and {end} hold different tensors")
    mixed = {k: (1 - alpha) * a[k] + alpha * b[k] if a[k].is_floating_point() else b[k] for k in a}
    parents = {"start": {"path": str(start), **training_record(start)}, "end": {"path": str(end), **training_record(end)}}
    record = {"kind": second.kind, "interpolated": {"alpha": alpha, **parents}}
    return write_servable(out, second, mixed, record, dtype, end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("start", type=Path, help="the checkpoint a fine-tune started from")
    parser.add_argument("end", type=Path, help="the fine-tuned checkpoint (its config is kept)")
    parser.add_argument("out", type=Path, help="where to write the servable mix")
    parser.add_argument("--alpha", type=float, required=True, help="0 gives start, 1 gives end")
    parser.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float16")
    args = parser.parse_args()
    print(f"wrote {interpolate(args.start, args.end, args.out, args.alpha, args.dtype)}")


if __name__ == "__main__":
    main()
