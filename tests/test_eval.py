"""The evaluation harness scores what it should: perfect images score 100%, wrong ones 0%."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np

from unclip.calls import DecodeCall, EncodeTextCall, SampleCall, TextEncoding, UpsampleCall
from unclip.data.shapes import COLOURS, parse_caption, render, sample_scene_for
from unclip.eval.report import format_table, run_eval
from unclip.pipeline import PipelineInfo


class OracleStages:
    """A stage backend that draws exactly what the prompt says (or, with `wrong_colour`, the
    same scene in another colour), so the harness's arithmetic can be checked."""

    def __init__(self, encoder, wrong_colour: bool = False):
        self.encoder = encoder
        self.wrong_colour = wrong_colour
        self.prompt = ""

    async def describe(self):
        return PipelineInfo(32, [4], {"oracle": "1"})

    async def run(self, call, **kwargs):
        if isinstance(call, EncodeTextCall):
            self.prompt = call.texts[0]
            return TextEncoding(np.zeros((1, 64), np.float32), np.zeros((1, 1, 64), np.float32), np.ones((1, 1), bool))
        if isinstance(call, SampleCall):
            return np.zeros((len(call.seeds), 64), np.float32)
        if isinstance(call, DecodeCall):
            return self.decode(call.seeds)
        assert isinstance(call, UpsampleCall)
        return self.upsample(call.images, call.seeds)

    def decode(self, seeds):
        spec = parse_caption(self.prompt)
        if self.wrong_colour:
            used = {o.colour for o in spec.objects}
            spare = [c for c in COLOURS if c not in used]
            spec = dataclasses.replace(
                spec,
                objects=[dataclasses.replace(o, colour=c) for o, c in zip(spec.objects, spare[: len(spec.objects)], strict=True)],
            )
        return np.stack([render(sample_scene_for(spec, np.random.default_rng(seed)), size=32) for seed in seeds])

    def upsample(self, images, seeds):
        spec = parse_caption(self.prompt)
        if self.wrong_colour:
            return np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)
        return np.stack([render(sample_scene_for(spec, np.random.default_rng(seed)), size=128) for seed in seeds])


def test_perfect_images_score_everything(local_stages):
    # More retrieval captions than the encoder takes in one call: the harness must chunk them.
    report = run_eval(OracleStages(local_stages.encoder), prompts=20, seed=1, split="all", sampling={}, retrieval_captions=70)
    for split in ("train", "heldout"):
        for group in ("one_object", "two_objects"):
            summary = report["splits"][split][group]
            assert summary["n"] > 0 and summary["all_correct"] == 1.0, (split, group, summary)
    assert report["failures"] == []
    assert set(report["seconds_per_image"]) == {"encode", "prior", "decode", "upsample0"}
    assert "one_object" in format_table(report)


def test_wrong_colours_score_nothing(local_stages):
    report = run_eval(
        OracleStages(local_stages.encoder, wrong_colour=True),
        prompts=10,
        seed=2,
        split="train",
        sampling={},
        retrieval_captions=10,
    )
    for group in ("one_object", "two_objects"):
        assert report["splits"]["train"][group]["all_correct"] == 0.0
        assert report["splits"]["train"][group]["colour_ok"] == 0.0
    assert len(report["failures"]) == 10


def test_eval_command_writes_json(tmp_path):
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unclip",
            "eval",
            "--prompts",
            "2",
            "--steps",
            "1",
            "--retrieval-captions",
            "4",
            "--json",
            str(out),
            "--images",
            str(tmp_path / "images"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["settings"]["prompts"] == 2 and 0.0 <= report["clip_retrieval_top1_heldout"] <= 1.0
    assert "CLIP retrieval top-1" in result.stdout
    # One PNG per prompt, named by split, index and verdict.
    images = sorted(p.name for p in (tmp_path / "images").glob("*.png"))
    assert len(images) == 2 and all(name.split("-")[2] in ("ok", "wrong") for name in images), images
    wrong = {f["prompt"] for f in report["failures"]}
    assert {name.split("-", 3)[3].removesuffix(".png").replace("-", " ") for name in images if "-wrong-" in name} == wrong
