"""Judge one stage at a time on Shapes, to find which stage of a pipeline is failing.

    python tools/stage_checks.py clip CLIP_DIR [--n 300]
        which of colour, shape and position the CLIP gets right: each one-object image is matched
        to the nearest of the 162 captions "a <colour> <shape> <position>"; and how alike the text
        embeddings of captions that differ only in position are (1.0: position words ignored).
    python tools/stage_checks.py prior PRIOR_DIR --clip CLIP_DIR [--n 60] [--steps 32] [--guidance 2]
        sample the prior for canonical prompts and name what its embedding shows: the nearest of
        the mean image embeddings of renders of every one-object colour-shape-position (one-object
        prompts), or of the four relations, the colour swap and the four one-shape changes
        (two-object prompts).
    python tools/stage_checks.py upsampler UPSAMPLER_DIR [--n 12] [--steps 20]
        upsample true 32x32 renders, judge the 128x128 result.
    python tools/stage_checks.py decoder DECODER_DIR --clip CLIP_DIR [--n 18] [--steps 25] [--guidance 3]
        decode the true CLIP image embedding (plus the caption's text tokens), upscale bicubically
        to 128x128 and judge; prints each prompt with what the judge found.

`--split heldout` draws the prompts (clip: the images) from the held-out colour-shapes, `--split train`
from the others; by default the clip check draws from both.

`--grid PATH` writes the judged images side by side with the truth.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import numpy as np
from PIL import Image

from unclip.data.shapes import (
    COLOURS,
    DEFAULT_HELDOUT,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    Spec,
    canonical_prompts,
    colours_swapped,
    format_caption,
    parse_caption,
    render,
    sample,
    sample_scene_for,
)
from unclip.eval.judge import analyze, judge
from unclip.options import SamplingOptions
from unclip.stages import load_engine

# Every one-object caption that states colour, shape and position.
ONE_OBJECT_COMBOS = list(itertools.product(COLOURS, SHAPES, POSITION_PHRASES))


def _encode_images(clip, images: np.ndarray) -> np.ndarray:
    return np.concatenate([clip.encode_image(images[i : i + 16]) for i in range(0, len(images), 16)])


def check_clip(args: argparse.Namespace) -> None:
    clip = load_engine("clip", args.checkpoint)
    rng = np.random.default_rng(args.seed)
    split = args.split or "all"
    scenes = [sample(rng, 0.0, DEFAULT_HELDOUT, split) for _ in range(args.n)]
    images = np.stack([render(scene) for scene in scenes])
    combos = ONE_OBJECT_COMBOS
    captions = [
        f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} {POSITION_PHRASES[place]}" for colour, shape, place in combos
    ]
    image_embeddings = _encode_images(clip, images)
    text_embeddings = np.concatenate([clip.encode_text(captions[i : i + 16]).embeddings for i in range(0, len(captions), 16)])
    best = (image_embeddings @ text_embeddings.T).argmax(axis=1)
    right = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    for scene, index in zip(scenes, best, strict=True):
        colour, shape, place = combos[index]
        obj = scene.objects[0]
        hits = (colour == obj.colour, shape == obj.shape, place == obj.position)
        for name, hit in zip(("colour", "shape", "position"), hits, strict=True):
            right[name] += hit
        right["all"] += all(hits)
    print(", ".join(f"{name} {count}/{args.n}" for name, count in right.items()))
    # A text tower that ignores position words gives the nine captions of a colour-shape one embedding.
    by_combo = text_embeddings.reshape(len(COLOURS) * len(SHAPES), len(POSITION_PHRASES), -1)
    similarities = np.einsum("cpd,cqd->cpq", by_combo, by_combo)
    off_diagonal = ~np.eye(len(POSITION_PHRASES), dtype=bool)
    print(f"mean cosine similarity of captions that differ only in position: {similarities[:, off_diagonal].mean():.4f}")
    _check_clip_pairs(clip, rng, args.n, split)


def _check_clip_pairs(clip, rng: np.random.Generator, n: int, split: str) -> None:
    """Two objects: does the nearest of the four relation captions name the true relation, does
    the true caption beat the one with the two colours swapped between the shapes, and does it beat
    all four captions that give one object another shape?"""
    scenes = [sample(rng, 1.0, DEFAULT_HELDOUT, split) for _ in range(n)]
    image_embeddings = _encode_images(clip, np.stack([render(scene) for scene in scenes]))
    relation_hits = binding_hits = binding_total = shape_hits = 0
    relations = list(RELATIONS)
    for scene, image_embedding in zip(scenes, image_embeddings, strict=True):
        a, b = (ObjectSpec(o.colour, o.shape) for o in scene.objects)
        spec = Spec((a, b), scene.relation)
        captions = [format_caption(dataclasses.replace(spec, relation=relation)) for relation in relations]
        captions.append(format_caption(colours_swapped(spec)))
        captions += [format_caption(variant) for variant in _reshaped(spec)]
        scores = clip.encode_text(captions).embeddings @ image_embedding
        truth = relations.index(scene.relation)
        relation_hits += int(scores[:4].argmax() == truth)
        shape_hits += int(scores[truth] > scores[5:].max())
        if a.shape != b.shape:  # with one shape twice, swapping the colours changes nothing
            binding_total += 1
            binding_hits += int(scores[truth] > scores[4])
    print(
        f"two objects: relation {relation_hits}/{n} (chance 1/4), colours bound to the right shapes "
        f"{binding_hits}/{binding_total} (chance 1/2), true shapes preferred to any one shape changed {shape_hits}/{n} (chance 1/5)"
    )


def _reshaped(spec: Spec) -> list[Spec]:
    """The two-object spec with one object given another shape, every way (four variants)."""
    return [
        dataclasses.replace(
            spec, objects=tuple(ObjectSpec(o.colour, shape) if i == index else o for i, o in enumerate(spec.objects))
        )
        for index, obj in enumerate(spec.objects)
        for shape in SHAPES
        if shape != obj.shape
    ]


def _mean_image_embedding(clip, spec: Spec, rng: np.random.Generator, renders: int = 4) -> np.ndarray:
    images = np.stack([render(sample_scene_for(spec, rng)) for _ in range(renders)])
    mean = clip.encode_image(images).mean(axis=0)
    return mean / np.linalg.norm(mean)


def check_prior(args: argparse.Namespace) -> None:
    clip, prior = load_engine("clip", args.clip), load_engine("prior", args.checkpoint)
    rng = np.random.default_rng(args.seed)
    combos = ONE_OBJECT_COMBOS
    one_object_references = np.stack(
        [_mean_image_embedding(clip, Spec((ObjectSpec(c, s, position=p),)), rng) for c, s, p in combos]
    )
    right = {"colour": 0, "shape": 0, "position": 0, "relation": 0, "binding": 0, "shapes": 0}
    shape_rng = np.random.default_rng([args.seed, 1])  # its own stream, so the other figures stay as they were
    counts = {1: 0, 2: 0, "binding": 0}
    for index, prompt in enumerate(canonical_prompts(args.n, seed=args.seed, split=args.split)):
        spec = parse_caption(prompt)
        text = clip.encode_text([prompt])
        embedding = prior.sample(
            text.embeddings,
            text.encodings,
            text.mask,
            [index],
            guidance_scale=args.guidance,
            sampling=SamplingOptions(steps=args.steps),
        )[0]
        counts[len(spec.objects)] += 1
        if len(spec.objects) == 1:
            obj = spec.objects[0]
            colour, shape, place = combos[int((one_object_references @ embedding).argmax())]
            right["colour"] += colour == obj.colour
            right["shape"] += shape == obj.shape
            right["position"] += place == obj.position
            continue
        a, b = spec.objects
        variants = [dataclasses.replace(spec, relation=r, background=None) for r in RELATIONS]
        references = np.stack([_mean_image_embedding(clip, v, rng) for v in variants])
        right["relation"] += list(RELATIONS)[int((references @ embedding).argmax())] == spec.relation
        truth = references[list(RELATIONS).index(spec.relation)]
        reshaped = np.stack(
            [_mean_image_embedding(clip, dataclasses.replace(v, background=None), shape_rng) for v in _reshaped(spec)]
        )
        right["shapes"] += float(truth @ embedding) > float((reshaped @ embedding).max())
        swapped = dataclasses.replace(colours_swapped(spec), background=None)
        if a.shape != b.shape:  # with one shape twice, swapping the colours changes nothing
            counts["binding"] += 1
            right["binding"] += float(truth @ embedding) > float(_mean_image_embedding(clip, swapped, rng) @ embedding)
    print(
        f"one object ({counts[1]}): colour {right['colour']}, shape {right['shape']}, position {right['position']}; "
        f"two objects ({counts[2]}): relation {right['relation']}, colours bound to the right shapes {right['binding']}/{counts['binding']}, "
        f"true shapes nearer than any one shape changed {right['shapes']}"
    )


def check_upsampler(args: argparse.Namespace) -> None:
    upsampler = load_engine("upsampler", args.checkpoint)
    prompts, scenes = _scenes(args)
    tiles, correct = [], 0
    for index, (prompt, scene) in enumerate(zip(prompts, scenes, strict=True)):
        high = upsampler.upsample(render(scene, 32)[None], [index], sampling=SamplingOptions(steps=args.steps))[0]
        correct += judge(prompt, high).correct
        tiles.append(np.concatenate([render(scene), high], axis=1))
    print(f"upsampler: {correct}/{len(prompts)} judged correct on true 32x32 inputs")
    _save_grid(tiles, args.grid)


def check_decoder(args: argparse.Namespace) -> None:
    clip = load_engine("clip", args.clip)
    decoder = load_engine("decoder", args.checkpoint)
    prompts, scenes = _scenes(args)
    images = np.stack([render(scene) for scene in scenes])
    embeddings = _encode_images(clip, images)
    tiles, correct = [], {1: [], 2: []}
    for i, prompt in enumerate(prompts):
        text = clip.encode_text([prompt])
        small = decoder.decode(
            embeddings[i : i + 1],
            [i],
            text_encodings=text.encodings,
            text_mask=text.mask,
            guidance_scale=args.guidance,
            sampling=SamplingOptions(steps=args.steps),
        )[0]
        big = np.asarray(Image.fromarray(small).resize((128, 128), Image.Resampling.BICUBIC))
        verdict = judge(prompt, big)
        correct[len(scenes[i].objects)].append(verdict.correct)
        found = [(o.colour, o.shape, o.position) for o in analyze(big).objects]
        print(f"{'ok   ' if verdict.correct else 'wrong'} {prompt} | found {found}")
        tiles.append(np.concatenate([images[i], big], axis=1))
    for count, verdicts in correct.items():
        print(f"{count} object(s): {sum(verdicts)}/{len(verdicts)} judged correct")
    _save_grid(tiles, args.grid)


def _scenes(args: argparse.Namespace):
    prompts = canonical_prompts(args.n, seed=args.seed, split=args.split)
    rng = np.random.default_rng(args.seed)
    return prompts, [sample_scene_for(parse_caption(prompt), rng) for prompt in prompts]


def _save_grid(tiles: list[np.ndarray], path: str | None) -> None:
    if path:
        rows = [np.concatenate(tiles[i : i + 3], axis=1) for i in range(0, len(tiles) - len(tiles) % 3, 3)]
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("clip", "prior", "upsampler", "decoder"))
    parser.add_argument("checkpoint")
    parser.add_argument("--clip", help="prior, decoder: the CLIP it was trained on")
    parser.add_argument("--n", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, help="decoder: 3, prior: 2")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--split", choices=("train", "heldout"), help="prompts from seen or held-out colour-shapes (default: train; clip: both)"
    )
    parser.add_argument("--grid", help="write the judged images here (PNG)")
    args = parser.parse_args()
    if args.stage in ("prior", "decoder") and not args.clip:
        parser.error(f"{args.stage} needs --clip")
    defaults = {"clip": (300, 0, None), "prior": (60, 32, 2.0), "upsampler": (12, 20, None), "decoder": (18, 25, 3.0)}[args.stage]
    args.n = args.n or defaults[0]
    args.steps = args.steps or defaults[1]
    args.guidance = args.guidance if args.guidance is not None else defaults[2]
    if args.stage != "clip":
        args.split = args.split or "train"
    checks = {"clip": check_clip, "prior": check_prior, "upsampler": check_upsampler, "decoder": check_decoder}
    checks[args.stage](args)


if __name__ == "__main__":
    main()
