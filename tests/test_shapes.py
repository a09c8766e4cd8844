"""The Shapes domain: pictures match their scenes, captions match the grammar, splits and seeds hold."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from unclip.data.shapes import (
    BACKGROUNDS,
    COLOUR_JITTER,
    COLOURS,
    DEFAULT_HELDOUT,
    EXTRA_COLOURS,
    EXTRA_SHAPES,
    MAX_CONTRAST_GROUP,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    ShapeObject,
    ShapesDataset,
    Spec,
    canonical_prompts,
    contrast_specs,
    format_caption,
    parse_caption,
    position_of,
    render,
    sample,
    sample_scene_for,
)


def scenes(n: int, seed: int = 0, **kwargs):
    rng = np.random.default_rng(seed)
    return [sample(rng, **kwargs) for _ in range(n)]


@pytest.fixture(scope="module")
def mixed():
    return scenes(400, seed=1, two_object_fraction=0.5)


def combos(scene) -> set[tuple[str, str]]:
    return {(o.colour, o.shape) for o in scene.objects}


def test_object_colours_within_jitter_at_their_centres(mixed):
    for scene in mixed[:100]:
        image = render(scene)
        for obj in scene.objects:
            pixel = image[int(obj.cy * 128), int(obj.cx * 128)].astype(int)
            assert tuple(pixel) == obj.rgb
            assert np.abs(pixel - COLOURS[obj.colour]).max() <= COLOUR_JITTER


def test_background_exact_at_free_corners(mixed):
    checked = 0
    for scene in mixed[:100]:
        image = render(scene)
        for y, x in [(0, 0), (0, 127), (127, 0), (127, 127)]:
            # the pixel's square, as fractions, touches no object's box
            free = all(
                abs((x + 0.5) / 128 - o.cx) > o.half_width + 1 / 128 or abs((y + 0.5) / 128 - o.cy) > o.half_width + 1 / 128
                for o in scene.objects
            )
            if free:
                assert tuple(image[y, x]) == BACKGROUNDS[scene.background]
                checked += 1
    assert checked > 300


def test_sizes_within_ten_percent_and_objects_on_canvas(mixed):
    for scene in mixed:
        for obj in scene.objects:
            assert 0.9 - 1e-9 <= obj.half_width / SIZES[obj.size] <= 1.1 + 1e-9
            assert obj.half_width <= obj.cx <= 1 - obj.half_width
            assert obj.half_width <= obj.cy <= 1 - obj.half_width


def test_stated_position_is_the_box_centres_cell(mixed):
    stated = 0
    for scene in mixed:
        spec = parse_caption(scene.caption)
        if len(scene.objects) == 1 and spec.objects[0].position is not None:
            obj = scene.objects[0]
            assert position_of(obj.cx, obj.cy) == obj.position == spec.objects[0].position
            stated += 1
    assert stated > 50


def test_relations_keep_their_distances_and_boxes_do_not_overlap(mixed):
    pairs = [s for s in mixed if len(s.objects) == 2]
    assert len(pairs) > 150 and {s.relation for s in pairs} == set(RELATIONS)
    for scene in pairs:
        a, b = scene.objects
        dx, dy = a.cx - b.cx, a.cy - b.cy
        along, across = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[scene.relation]
        assert along >= 0.25 and along > abs(across)
        assert max(abs(dx), abs(dy)) >= a.half_width + b.half_width  # boxes are disjoint
        assert a.colour != b.colour


def test_captions_follow_the_grammar_and_round_trip(mixed):
    colour, shape = "|".join(COLOURS), "|".join(SHAPES)
    position, relation = "|".join(POSITION_PHRASES.values()), "|".join(RELATIONS.values())
    article = r"(a (?!orange)|an (?=orange))"  # "an" exactly before a vowel
    background = rf"( on a ({'|'.join(BACKGROUNDS)}) background)?"
    one = rf"{article}((small|large) )?({colour}) ({shape})( ({position}))?{background}"
    two = rf"{article}({colour}) ({shape}) ({relation}) {article}({colour}) ({shape}){background}"
    for scene in mixed:
        assert re.fullmatch(one if len(scene.objects) == 1 else two, scene.caption), scene.caption
        spec = parse_caption(scene.caption)
        assert format_caption(spec) == scene.caption
        assert [(o.colour, o.shape) for o in spec.objects] == [(o.colour, o.shape) for o in scene.objects]
        assert spec.relation == scene.relation
        assert spec.background in (None, scene.background)
        assert (spec.background is not None) == scene.mentioned["background"]
        if spec.objects[0].size is not None:
            assert spec.objects[0].size == scene.objects[0].size
    assert any(c.startswith("an orange") for c in (s.caption for s in mixed))
    assert any(" an orange " in s.caption for s in mixed)


@pytest.mark.parametrize(
    "caption",
    [
        "a orange circle",
        "an red circle",
        "a red hexagon",
        "a red circle to the left of a red square",  # two objects have different colours
        "a small red circle to the left of a blue square",  # sizes are not stated in pairs
        "a red circle in the middle",
        "",
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(caption):
    with pytest.raises(ValueError):
        parse_caption(caption)


def test_sample_scene_for_honours_a_partial_spec():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = sample_scene_for(Spec((ObjectSpec(colour="orange", position="bottom left"),)), rng)
        (obj,) = scene.objects
        assert obj.colour == "orange" and obj.position == "bottom left"
        assert scene.caption == f"an orange {obj.shape} in the bottom left corner"
        assert scene.mentioned == {"size": False, "position": True, "background": False}
    scene = sample_scene_for(Spec((ObjectSpec("red", "circle"), ObjectSpec()), "above", "white"), rng)
    assert scene.relation == "above" and scene.background == "white"
    assert scene.objects[0].colour == "red" and scene.objects[1].colour != "red"


def test_render_size_and_antialiasing():
    (scene,) = scenes(1, seed=5)
    assert render(scene, size=64).shape == (64, 64, 3)
    image = render(scene)
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
    # Antialiased edges blend object and background: more than two distinct colours.
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 2


def take(dataset, n):
    return list(itertools.islice(dataset, n))


def test_dataset_is_reproducible_and_seeds_differ():
    a, b = take(ShapesDataset(seed=7, size=64), 5), take(ShapesDataset(seed=7, size=64), 5)
    assert [x["caption"] for x in a] == [x["caption"] for x in b]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert a[0]["image"].shape == (64, 64, 3) and a[0]["image"].dtype == np.uint8
    c = take(ShapesDataset(seed=8, size=64), 5)
    assert [x["caption"] for x in a] != [x["caption"] for x in c]


def test_dataloader_workers_get_independent_streams():
    dataset = ShapesDataset(seed=11, size=32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    items = take(loader, 12)  # the loader alternates workers: 0, 1, 0, 1, ...
    worker0 = [x["caption"] for x in items[0::2]]
    worker1 = [x["caption"] for x in items[1::2]]
    assert worker0 != worker1
    # worker 0 draws from (seed, 0), as the main process does; worker 1 from (seed, 1)
    assert worker0 == [x["caption"] for x in take(dataset, 6)]


def test_train_split_never_shows_held_out_combinations():
    for scene in scenes(600, seed=2, two_object_fraction=0.5, split="train"):
        assert not combos(scene) & set(DEFAULT_HELDOUT)
        assert not {(o.colour, o.shape) for o in parse_caption(scene.caption).objects} & set(DEFAULT_HELDOUT)
    for item in take(ShapesDataset(seed=0, size=32), 50):
        assert not {(o.colour, o.shape) for o in parse_caption(item["caption"]).objects} & set(DEFAULT_HELDOUT)


def test_heldout_split_always_shows_a_held_out_combination():
    held = scenes(300, seed=4, two_object_fraction=0.5, split="heldout")
    for scene in held:
        assert combos(scene) & set(DEFAULT_HELDOUT)
        assert {(o.colour, o.shape) for o in parse_caption(scene.caption).objects} & set(DEFAULT_HELDOUT)
    assert {len(s.objects) for s in held} == {1, 2}
    custom = ShapesDataset(seed=0, size=32, split="heldout", heldout=[("red", "circle")])
    assert all("red circle" in item["caption"] for item in take(custom, 20))
    with pytest.raises(ValueError):
        ShapesDataset(split="test")


@pytest.mark.parametrize("split", ["all", "train", "heldout"])
def test_canonical_prompts_are_deterministic_and_mixed(split):
    prompts = canonical_prompts(100, seed=0, split=split)
    assert prompts == canonical_prompts(100, seed=0, split=split)
    assert prompts != canonical_prompts(100, seed=1, split=split)
    specs = [parse_caption(p) for p in prompts]
    single = [s for s in specs if len(s.objects) == 1]
    assert len(single) == 60
    assert all(s.objects[0].position is not None for s in single)
    assert all(s.relation is not None for s in specs if len(s.objects) == 2)
    shown = [{(o.colour, o.shape) for o in s.objects} & set(DEFAULT_HELDOUT) for s in specs]
    if split == "train":
        assert not any(shown)
    if split == "heldout":
        assert all(shown)


def test_mention_p_sets_how_often_captions_state_optional_attributes():
    def stated(mention_p: float) -> list[Spec]:
        specs = [parse_caption(x["caption"]) for x in take(ShapesDataset(seed=3, size=16, mention_p=mention_p), 40)]
        return [s for s in specs if len(s.objects) == 1]

    always, never = stated(1.0), stated(0.0)
    assert always and never
    assert all(s.background and s.objects[0].size and s.objects[0].position for s in always)
    assert not any(s.background or s.objects[0].size or s.objects[0].position for s in never)
    with pytest.raises(ValueError, match="mention_p"):
        ShapesDataset(mention_p=1.5)


def _differences(a: Spec, b: Spec) -> list[str]:
    """What changes from a to b: object fields (one object), or "relation" / "colours swapped"."""
    if len(a.objects) != len(b.objects) or a.background != b.background:
        return ["objects or background"]
    if len(a.objects) == 1:
        (x,), (y,) = a.objects, b.objects
        return [name for name in ("colour", "shape", "size", "position") if getattr(x, name) != getattr(y, name)]
    if a.relation != b.relation:
        same_objects = a.objects == b.objects
        return ["relation"] if same_objects else ["relation", "objects"]
    (p, q), (r, s) = a.objects, b.objects
    swapped = (p.colour, q.colour) == (s.colour, r.colour) and (p.shape, q.shape) == (r.shape, s.shape)
    if swapped:
        return ["colours swapped"]
    return [
        f"colour of object {i}"
        for i, (x, y) in enumerate(zip(a.objects, b.objects, strict=True))
        if x != y and x.shape == y.shape
    ]


def test_contrast_groups_differ_from_their_scene_in_one_stated_fact_and_are_drawn_as_captioned():
    from unclip.eval.judge import judge

    group = 4
    examples = take(ShapesDataset(seed=5, size=128, mention_p=0.8, contrast_group=group, two_object_fraction=0.4), 160)
    changes = []
    for start in range(0, len(examples), group):
        scene, *variants = examples[start : start + group]
        assert len({x["caption"] for x in examples[start : start + group]}) == group  # all different
        for variant in variants:
            (change,) = _differences(parse_caption(scene["caption"]), parse_caption(variant["caption"]))
            changes.append(change)
            # Same background; the variant's picture shows what its caption says.
            assert (scene["image"][0, 0] == variant["image"][0, 0]).all()
            assert judge(variant["caption"], variant["image"]).correct, variant["caption"]
            for colour, shape in DEFAULT_HELDOUT:  # the train split keeps held-out pairs out of variants too
                assert f"{colour} {shape}" not in variant["caption"]
    assert {"position", "colour", "shape", "relation", "colours swapped", "colour of object 1"} <= set(changes)
    assert changes.count("position") >= 20  # the fact plain batches almost never contrast
    with pytest.raises(ValueError, match="contrast groups are for training"):
        ShapesDataset(split="heldout", contrast_group=2)
    with pytest.raises(ValueError, match="contrast_group must lie in"):
        ShapesDataset(contrast_group=MAX_CONTRAST_GROUP + 1)


def test_every_caption_has_enough_variants_for_the_largest_group():
    rng = np.random.default_rng(0)
    train_combos = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in DEFAULT_HELDOUT]
    for colour, shape in train_combos:
        bare = Spec((ObjectSpec(colour, shape),))  # states the fewest facts
        assert len(contrast_specs(bare, rng, train_combos, MAX_CONTRAST_GROUP - 1)) == MAX_CONTRAST_GROUP - 1
    with pytest.raises(ValueError, match="one-fact variants"):
        contrast_specs(Spec((ObjectSpec("red", "circle"),)), rng, train_combos, 50)


def _uses_extra_words(caption: str) -> bool:
    return bool(set(caption.split()) & (set(EXTRA_COLOURS) | set(EXTRA_SHAPES)))


def test_extra_vocabulary_sets_the_share_of_scenes_that_draw_on_it_and_leaves_other_streams_alone():
    def share(fraction: float) -> float:
        items = take(ShapesDataset(seed=2, size=16, extra_vocabulary=fraction, two_object_fraction=0.5), 400)
        return sum(_uses_extra_words(x["caption"]) for x in items) / len(items)

    # An extended scene may still draw only domain pairs (16 of the 68 it may show), so the shares sit below the fraction.
    assert share(0.0) == 0.0 and share(1.0) > 0.75 and 0.3 < share(0.5) < 0.55
    # Off, the stream is exactly the one drawn before the option existed: no extra random numbers.
    rng = np.random.default_rng([3, 0])
    expected = [sample(rng, 0.3, DEFAULT_HELDOUT, "train", 0.5).caption for _ in range(30)]
    assert [x["caption"] for x in take(ShapesDataset(seed=3, size=16), 30)] == expected
    with pytest.raises(ValueError, match=r"extra_vocabulary must lie in \[0, 1\]"):
        ShapesDataset(extra_vocabulary=1.5)


def test_extra_vocabulary_keeps_held_out_pairs_out_of_scenes_and_contrast_groups():
    group = 4
    items = take(
        ShapesDataset(seed=6, size=16, extra_vocabulary=1.0, contrast_group=group, two_object_fraction=0.5, mention_p=0.8), 400
    )
    changes = []
    for start in range(0, len(items), group):
        scene, *variants = (parse_caption(x["caption"]) for x in items[start : start + group])
        for spec in (scene, *variants):
            assert not {(o.colour, o.shape) for o in spec.objects} & set(DEFAULT_HELDOUT)
        for variant in variants:
            (change,) = _differences(scene, variant)  # still one fact apart
            changes.append((change, variant))
    # Variants draw on the extra words too: "a purple circle" meets "a purple ring", not only "a purple square".
    assert any(change == "shape" and variant.objects[0].shape in EXTRA_SHAPES for change, variant in changes)
    assert any(change == "colour" and variant.objects[0].colour in EXTRA_COLOURS for change, variant in changes)
    assert any(variant.objects[0].colour == "purple" and variant.objects[0].shape in EXTRA_SHAPES for _, variant in changes)


@pytest.mark.parametrize("shape", EXTRA_SHAPES)
def test_extra_shapes_are_drawn_as_named(shape: str):
    half = 0.3
    obj = ShapeObject(shape, "pink", "large", 0.5, 0.5, half, EXTRA_COLOURS["pink"])
    image = render(Scene("black", (obj,), None, f"a pink {shape}", {}), size=256)

    def filled(dx: float, dy: float) -> bool:  # offsets from the centre, in half-widths
        x, y = (int(256 * (0.5 + d * half)) for d in (dx, dy))
        return bool(image[y, x].any())

    # Points that tell these shapes from each other and from the domain's circle, square and triangle.
    expected = {
        "diamond": {(0, 0): True, (0.9, 0): True, (0, -0.9): True, (0.7, 0.7): False, (-0.7, -0.7): False},
        "cross": {(0, 0): True, (0.9, 0): True, (0, 0.9): True, (0.7, 0.7): False, (-0.7, -0.7): False},
        "ring": {(0, 0): False, (0.75, 0): True, (0, -0.75): True, (0.95, 0.95): False},
        "star": {(0, 0): True, (0, -0.9): True, (0, 0.9): False, (0.9, 0.9): False},
    }[shape]
    assert {point: filled(*point) for point in expected} == expected
    inside = image[image.any(axis=-1)]
    assert np.abs(np.median(inside, axis=0) - EXTRA_COLOURS["pink"]).max() <= 1


def test_the_judge_refuses_words_of_the_extra_vocabulary():
    from unclip.eval.judge import judge

    image = render(sample_scene_for(parse_caption("a red circle"), np.random.default_rng(0)))
    assert judge("a red circle", image).correct
    for caption in ("a pink circle", "a red star", "a red circle above a teal ring"):
        with pytest.raises(ValueError, match="the judge knows the colours"):
            judge(caption, image)
