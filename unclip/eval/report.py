"""`unclip eval`: how often generated images show what the prompt asked, on the Shapes domain.

Canonical prompts are generated, images sampled in-process, and each image judged by the
colour-segmentation judge (`unclip.eval.judge`). Also CLIP retrieval accuracy on held-out
captions and seconds per image by stage. Prints a table and writes JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unclip.data.shapes import DEFAULT_HELDOUT, canonical_prompts, parse_caption, render, sample_scene_for
from unclip.eval.judge import judge
from unclip.parameters import GenerationParameters
from unclip.pipeline import StageEvent, generate
from unclip.validation import MAX_BATCH

ATTRIBUTES = ("colour_ok", "shape_ok", "position_ok", "relation_ok", "count_ok", "size_ok", "background_ok")


@dataclass
class Tally:
    """Correct / total per group (one object, two objects) and per attribute."""

    correct: int = 0
    total: int = 0
    attributes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def add(self, correct: bool, details: dict[str, Any]) -> None:
        self.correct += int(correct)
        self.total += 1
        for name in ATTRIBUTES:
            if details.get(name) is not None:
                self.attributes[name][0] += int(bool(details[name]))
                self.attributes[name][1] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "all_correct": self.correct / self.total if self.total else None,
            "n": self.total,
            **{name: ok / n for name, (ok, n) in sorted(self.attributes.items())},
        }


def clip_retrieval_top1(encoder, n: int, seed: int, heldout=DEFAULT_HELDOUT) -> float:
    """Top-1 image->caption retrieval among n held-out scenes with fully stated captions.

    A retrieved caption counts when its text equals the image's own (scenes may share a caption).
    """
    rng = np.random.default_rng(seed)
    captions = canonical_prompts(n, seed=seed, split="heldout", heldout=heldout)
    images = np.stack([render(sample_scene_for(parse_caption(c), rng)) for c in captions])
    chunks = range(0, n, MAX_BATCH)  # the encoder takes at most MAX_BATCH rows a call
    image_embeddings = np.concatenate([encoder.encode_image(images[i : i + MAX_BATCH]) for i in chunks])
    text_embeddings = np.concatenate([encoder.encode_text(captions[i : i + MAX_BATCH]).embeddings for i in chunks])
    best = (image_embeddings @ text_embeddings.T).argmax(axis=1)
    return float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)]))


def run_eval(
    stages,
    *,
    prompts: int,
    seed: int,
    split: str,
    sampling: dict[str, Any],
    retrieval_captions: int = 200,
    images_dir: Path | None = None,
) -> dict[str, Any]:
    """Generate one image per canonical prompt (seed + index) and judge it; with images_dir, also
    write each image there, its name saying split, index, verdict and prompt."""
    splits = ["train", "heldout"] if split == "all" else [split]
    per_split = {name: prompts // len(splits) + (i < prompts % len(splits)) for i, name in enumerate(splits)}
    seconds_by_stage: dict[str, float] = defaultdict(float)
    tallies: dict[str, dict[str, Tally]] = {}
    failures: list[dict[str, Any]] = []
    images_done = 0
    started = time.perf_counter()

    def on_stage(event: StageEvent) -> None:
        seconds_by_stage[event.name] += event.seconds

    for split_name, count in per_split.items():
        groups = tallies.setdefault(split_name, {"one_object": Tally(), "two_objects": Tally()})
        for index, prompt in enumerate(canonical_prompts(count, seed=seed, split=split_name)):
            params = GenerationParameters(prompt=prompt, seed=seed + index, **sampling)
            image = asyncio.run(generate(stages, params, on_stage=on_stage))[0]
            verdict = judge(prompt, image.pixels)
            group = "one_object" if len(parse_caption(prompt).objects) == 1 else "two_objects"
            groups[group].add(verdict.correct, verdict.details)
            images_done += 1
            if images_dir is not None:
                save_judged_image(images_dir, split_name, index, prompt, verdict.correct, image.pixels)
            if not verdict.correct:
                failures.append({"prompt": prompt, "seed": image.seed, "split": split_name})

    report = {
        "settings": {"prompts": prompts, "seed": seed, "split": split, "sampling": sampling},
        "splits": {name: {group: tally.summary() for group, tally in groups.items()} for name, groups in tallies.items()},
        "clip_retrieval_top1_heldout": clip_retrieval_top1(stages.encoder, retrieval_captions, seed),
        "seconds_per_image": {stage: s / images_done for stage, s in sorted(seconds_by_stage.items())},
        "wall_seconds": time.perf_counter() - started,
        "models": asyncio.run(stages.describe()).model_versions,
        "failures": failures[:50],
    }
    return report


def save_judged_image(directory: Path, split: str, index: int, prompt: str, correct: bool, pixels: np.ndarray) -> Path:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    slug = "-".join(prompt.split())
    path = directory / f"{split}-{index:03d}-{'ok' if correct else 'wrong'}-{slug}.png"
    Image.fromarray(pixels).save(path)
    return path


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'split':<8} {'group':<12} {'n':>4} {'all correct':>11} {'colour':>7} {'shape':>6} {'position':>8} {'relation':>8} {'count':>6}"
    ]
    for split_name, groups in report["splits"].items():
        for group, summary in groups.items():
            if not summary["n"]:
                continue

            def pct(key: str, summary: dict[str, Any] = summary) -> str:
                value = summary.get(key)
                return "-" if value is None else f"{100 * value:.1f}%"

            lines.append(
                f"{split_name:<8} {group:<12} {summary['n']:>4} {pct('all_correct'):>11} {pct('colour_ok'):>7} "
                f"{pct('shape_ok'):>6} {pct('position_ok'):>8} {pct('relation_ok'):>8} {pct('count_ok'):>6}"
            )
    lines.append(f"CLIP retrieval top-1 on held-out captions: {100 * report['clip_retrieval_top1_heldout']:.1f}%")
    timing = ", ".join(f"{stage} {seconds:.3f}" for stage, seconds in report["seconds_per_image"].items())
    lines.append(f"seconds per image by stage: {timing}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
