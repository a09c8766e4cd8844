"""The judge on rendered ground truth: accepts true captions, rejects wrong ones, survives degradation.

Run with -s to see the measured accuracies.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from unclip.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    EXTRA_COLOURS,
    EXTRA_SHAPES,
    POSITIONS,
    SHAPES,
    ObjectSpec,
    Scene,
    ShapeObject,
    Spec,
    format_caption,
    parse_caption,
    render,
    sample,
)
from unclip.eval.judge import _label, analyze, judge, judge_spec

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    """300 scenes from 4 seeds, half with two objects."""
    rngs = [np.random.default_rng(seed) for seed in range(4)]
    return [sample(rng, two_object_fraction=0.5) for rng in rngs for _ in range(75)]


@pytest.fixture(scope="module")
def analyses(scenes):
    return [analyze(render(s)) for s in scenes]


def truth(scene: Scene) -> Spec:
    """The spec stating everything the judge checks: colours, shapes, and position or relation."""
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        return Spec((ObjectSpec(obj.colour, obj.shape, obj.size, obj.position),), background=scene.background)
    return Spec(tuple(ObjectSpec(o.colour, o.shape) for o in scene.objects), scene.relation, scene.background)


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What the base decoder's resolution does to a picture: 32x32, blurred, noisy, upscaled to 128."""
    small = Image.fromarray(image).resize((32, 32), Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(1))
    noisy = np.asarray(small, dtype=np.float64) + rng.normal(0.0, 8.0, (32, 32, 3))
    noisy = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))
    return np.asarray(noisy.resize((128, 128), Image.Resampling.BILINEAR))


def test_scenes_cover_both_kinds_and_all_backgrounds(scenes):
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {s.background for s in scenes} == set(BACKGROUNDS)


def test_judge_accepts_true_captions(scenes, analyses):
    # judge(caption, image) is judge_spec(parse_caption(caption), analyze(image)); reuse the analyses
    for scene, analysis in zip(scenes[:10], analyses[:10], strict=True):
        assert judge(scene.caption, render(scene)) == judge_spec(parse_caption(scene.caption), analysis)
    correct = sum(judge_spec(parse_caption(s.caption), a).correct for s, a in zip(scenes, analyses, strict=True))
    print(f"\njudge accuracy on clean rendered scenes: {correct}/{len(scenes)} = {correct / len(scenes):.2%}")
    assert correct / len(scenes) >= 0.99


def test_analysis_matches_every_attribute_of_clean_scenes(scenes, analyses):
    total = matched = 0
    for scene, analysis in zip(scenes, analyses, strict=True):
        verdict = judge_spec(truth(scene), analysis)
        total += 1
        matched += verdict.correct and verdict.details["background_ok"] and verdict.details["size_ok"] is not False
    print(f"\nall attributes (incl. size, background) on clean scenes: {matched}/{total}")
    assert matched / total >= 0.99


def wrong_specs(scene: Scene, rng: np.random.Generator) -> dict[str, Spec]:
    """One wrong caption per kind of mistake that applies to the scene."""
    spec = truth(scene)
    first = spec.objects[0]
    used = {o.colour for o in spec.objects}
    colour = rng.choice([c for c in COLOURS if c not in used])
    shape = rng.choice([s for s in SHAPES if s != first.shape])
    wrong = {
        "colour": replace(spec, objects=(replace(first, colour=str(colour)), *spec.objects[1:])),
        "shape": replace(spec, objects=(replace(first, shape=str(shape)), *spec.objects[1:])),
    }
    if len(spec.objects) == 1:
        position = rng.choice([p for p in POSITIONS if p != first.position])
        wrong["position"] = replace(spec, objects=(replace(first, position=str(position)),))
    else:
        wrong["relation"] = replace(spec, relation=OPPOSITE[spec.relation])
    return wrong


def test_judge_rejects_wrong_captions(scenes, analyses):
    rng = np.random.default_rng(0)
    rejected: dict[str, list[bool]] = {}
    for scene, analysis in zip(scenes, analyses, strict=True):
        for kind, spec in wrong_specs(scene, rng).items():
            format_caption(spec)  # each wrong spec is a valid caption
            rejected.setdefault(kind, []).append(not judge_spec(spec, analysis).correct)
    for kind, outcomes in sorted(rejected.items()):
        print(f"\nrejects a wrong {kind}: {sum(outcomes)}/{len(outcomes)}", end="")
        assert len(outcomes) >= 100
        assert sum(outcomes) / len(outcomes) >= 0.99, kind


def test_judge_rejects_an_image_with_more_objects_than_the_caption_names(scenes, analyses):
    pairs = [(s, a) for s, a in zip(scenes, analyses, strict=True) if len(s.objects) == 2]
    assert len(pairs) >= 100
    for scene, analysis in pairs:
        first = scene.objects[0]
        # Everything the caption states about its one object is true; the second object is not asked for.
        verdict = judge_spec(Spec((ObjectSpec(first.colour, first.shape),)), analysis)
        assert verdict.details["colour_ok"] and verdict.details["shape_ok"], scene.caption
        assert not verdict.details["count_ok"] and not verdict.correct, scene.caption


def test_judge_survives_decoder_resolution_degradation(scenes):
    rng = np.random.default_rng(1)
    correct = sum(judge(s.caption, degrade(render(s), rng)).correct for s in scenes)
    print(f"\njudge accuracy on degraded scenes: {correct}/{len(scenes)} = {correct / len(scenes):.2%}")
    assert correct / len(scenes) >= 0.99  # measured 300/300


def test_judge_reports_each_attribute():
    scene = sample(np.random.default_rng(0), two_object_fraction=0.0)
    obj = scene.objects[0]
    image = render(scene)
    details = judge(format_caption(truth(scene)), image).details
    assert details["colour_ok"] and details["shape_ok"] and details["position_ok"] and details["size_ok"]
    assert details["relation_ok"] is None and details["background"] == scene.background
    other = next(p for p in POSITIONS if p != obj.position)
    verdict = judge(format_caption(Spec((ObjectSpec(obj.colour, obj.shape, position=other),))), image)
    assert not verdict.correct and verdict.details["colour_ok"] and verdict.details["shape_ok"]
    assert verdict.details["position_ok"] is False and verdict.details["size_ok"] is None


def test_judge_takes_any_size_and_rejects_bad_input():
    scene = sample(np.random.default_rng(2), two_object_fraction=0.0)
    for size in (64, 256):
        assert judge(scene.caption, render(scene, size)).correct
    with pytest.raises(ValueError):
        judge("a red dodecahedron", render(scene))
    with pytest.raises(ValueError):
        analyze(np.zeros((16, 16, 3), np.uint8))


def test_label_finds_connected_components():
    classes = np.array(
        [
            [0, 0, -1, 1],
            [-1, 0, -1, 1],
            [0, 0, 1, 1],
            [-1, -1, -1, 0],
        ]
    )
    labels = _label(classes)
    assert (labels == -1).sum() == 6
    assert len(np.unique(labels[labels >= 0])) == 3  # the 0s around the corner, the 1s, the lone 0
    assert labels[0, 0] == labels[2, 0] and labels[0, 3] == labels[2, 2] != labels[3, 3]


@pytest.mark.parametrize("colour", EXTRA_COLOURS)
def test_an_object_of_a_colour_outside_the_palette_still_counts(colour: str):
    """A model trained on the extra vocabulary may draw a teal star beside the red circle it was asked
    for; the picture then says more than the caption, even though the judge cannot name the colour."""
    for background in BACKGROUNDS:
        asked = ShapeObject("circle", "red", "large", 0.25, 0.25, 0.16, COLOURS["red"])
        stray = ShapeObject(EXTRA_SHAPES[-1], colour, "large", 0.75, 0.75, 0.16, EXTRA_COLOURS[colour])
        alone, crowded = (render(Scene(background, objects, None, "", {})) for objects in ((asked,), (asked, stray)))
        assert judge("a red circle in the top left corner", alone).correct
        verdict = judge("a red circle in the top left corner", crowded)
        assert not verdict.correct and verdict.details["n_objects"] == 2, (background, verdict.details)
