"""A judge for Shapes pictures: finds the coloured objects in an image and checks a caption against them.

It is a colour-segmentation analyser, not a learned model. The backgrounds are achromatic and
the palette colours are not, and blending a colour with gray (antialiasing, blur) keeps its hue,
so a pixel's hue names the object it belongs to. Each connected blob of one colour is then
measured: its mass and centroid give size and position, and the best-fitting blurred template
of each shape gives the shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from unclip.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZE_JITTER,
    SIZES,
    Scene,
    ShapeObject,
    Spec,
    parse_caption,
    position_of,
    render,
)

ANALYSIS_SIZE = 128  # every image is resized to this square before analysis
MIN_CHROMA = 40.0  # max - min channel; less is background (or too faint to tell)
MAX_HUE_ERROR = 25.0  # degrees from the nearest palette hue
MIN_AREA = 0.004  # of the canvas; a quarter of the smallest object, larger than fringes and noise
BLUR_SIGMAS = (0.0, 2.0, 4.0, 6.0)  # pixels; the blurs a shape template is tried with
WINDOW_PAD = 6  # pixels around a blob's box where its blurred edges still show
SEAM_WIDTH = 2  # pixels: an off-palette blob this close to a palette one is their blend, not an object
# Geometric mean of the largest small and the smallest large half-width.
SIZE_SPLIT = math.sqrt(SIZES["small"] * (1 + SIZE_JITTER) * SIZES["large"] * (1 - SIZE_JITTER))
AREA_PER_HALF_WIDTH_SQUARED = {"circle": math.pi, "square": 4.0, "triangle": 2.0}


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    cx: float  # box centre, fraction of the side
    cy: float
    half_width: float
    position: str
    area: float  # fraction of the canvas


@dataclass(frozen=True)
class Analysis:
    background: str
    objects: list[DetectedObject]


@dataclass(frozen=True)
class Verdict:
    correct: bool
    details: dict


def _hue_and_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue in degrees and chroma (max - min) of float RGB [..., 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = high - low
    c = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(high == r, ((g - b) / c) % 6, np.where(high == g, (b - r) / c + 2, (r - g) / c + 4))
    return hue * 60.0, chroma


# A coloured blob of no palette hue (teal, say, which a model that learnt more colours than the
# domain's might draw) is an object all the same: it makes a picture say more than its caption.
UNKNOWN_COLOUR = "unknown"
_COLOUR_NAMES = [*COLOURS, UNKNOWN_COLOUR]
_UNKNOWN_INDEX = _COLOUR_NAMES.index(UNKNOWN_COLOUR)
_PALETTE_HUES, _ = _hue_and_chroma(np.array(list(COLOURS.values()), dtype=np.float64))


def _classify(hue: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """Index into _COLOUR_NAMES of each pixel's nearest palette hue (UNKNOWN_COLOUR where no palette
    hue is near), -1 for background."""
    error = np.abs(hue[..., None] - _PALETTE_HUES)
    error = np.minimum(error, 360.0 - error)  # hue is circular
    nearest = np.where(error.min(-1) <= MAX_HUE_ERROR, error.argmin(-1), _UNKNOWN_INDEX)
    return np.where(chroma >= MIN_CHROMA, nearest, -1)


def _label(classes: np.ndarray) -> np.ndarray:
    """Connected components (4-neighbour) of pixels of equal class >= 0, as the smallest flat index
    in each component; -1 where classes is -1.

    Min-label propagation with pointer jumping: each round a pixel takes the smallest label among
    its same-class neighbours, then the label of the pixel its label names.
    """
    h, w = classes.shape
    fg = classes >= 0
    none = h * w  # larger than every label
    labels = np.where(fg, np.arange(h * w).reshape(h, w), none)
    same_x = fg[:, 1:] & (classes[:, 1:] == classes[:, :-1])
    same_y = fg[1:, :] & (classes[1:, :] == classes[:-1, :])
    while True:
        new = labels.copy()
        np.minimum(new[:, 1:], np.where(same_x, labels[:, :-1], none), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_x, labels[:, 1:], none), out=new[:, :-1])
        np.minimum(new[1:, :], np.where(same_y, labels[:-1, :], none), out=new[1:, :])
        np.minimum(new[:-1, :], np.where(same_y, labels[1:, :], none), out=new[:-1, :])
        new[fg] = new.flat[new[fg]]
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def _prepare(image: np.ndarray) -> np.ndarray:
    """The image as float RGB [ANALYSIS_SIZE, ANALYSIS_SIZE, 3], lightly smoothed against noise."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 32:
        raise ValueError(f"the image must be at least 32x32, got {image.shape[1]}x{image.shape[0]}")
    pil = Image.fromarray(image)
    if pil.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
        shrink = max(pil.size) > ANALYSIS_SIZE
        pil = pil.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    return np.asarray(pil.filter(ImageFilter.BoxBlur(1)), dtype=np.float64)


def _background(rgb: np.ndarray) -> str:
    """The background most border pixels are nearest to."""
    border = np.concatenate([rgb[:2], rgb[-2:], rgb[:, :2].transpose(1, 0, 2), rgb[:, -2:].transpose(1, 0, 2)])
    border = border.reshape(-1, 3)
    references = np.array(list(BACKGROUNDS.values()), dtype=np.float64)
    nearest = np.linalg.norm(border[:, None] - references, axis=-1).argmin(-1)
    return list(BACKGROUNDS)[np.bincount(nearest, minlength=len(references)).argmax()]


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """M such that M @ x blurs x (length n) with a Gaussian of this sigma, renormalised at the ends."""
    if sigma == 0:
        return np.eye(n)
    d = np.arange(n)[:, None] - np.arange(n)
    weights = np.exp(-0.5 * (d / sigma) ** 2)
    return weights / weights.sum(1, keepdims=True)


def _template(shape: str, cx: float, cy: float, half_width: float, side: int) -> np.ndarray:
    """Coverage [side, side] of one shape, drawn exactly as the Shapes generator draws it."""
    obj = ShapeObject(shape, "red", "small", cx, cy, half_width, (255, 255, 255))
    return render(Scene("black", (obj,), None, "", {}), side)[..., 0] / 255.0


def _measure(
    colour: str, blob: np.ndarray, rgb: np.ndarray, chroma: np.ndarray, others: np.ndarray, background: np.ndarray
) -> DetectedObject | None:
    """Shape, size and box centre of one blob (a mask), or None if it is too faint to be an object.

    Coverage is the projection of each pixel onto (object colour - background): linear, so noise
    averages out and mass and centroid survive blur. Half-width follows from the mass once the
    shape is known; the shape is the one whose template, blurred by the best of BLUR_SIGMAS,
    fits the coverage in least squares (a matched filter: moments are too noisy on small blobs).
    """
    side = rgb.shape[0]
    ys, xs = np.nonzero(blob)
    window = (
        slice(max(ys.min() - WINDOW_PAD, 0), min(ys.max() + WINDOW_PAD + 1, side)),
        slice(max(xs.min() - WINDOW_PAD, 0), min(xs.max() + WINDOW_PAD + 1, side)),
    )
    vivid = blob & (chroma >= np.percentile(chroma[blob], 75))
    direction = np.median(rgb[vivid], axis=0) - background
    valid = ~others[window]  # other objects' pixels say nothing about this one
    coverage = np.where(valid, (rgb[window] - background) @ direction / (direction @ direction), 0.0)
    mass = coverage.sum()
    if mass < MIN_AREA * side * side:
        return None
    gy, gx = np.mgrid[window] + 0.5  # pixel centres
    mx, my = (coverage * gx).sum() / mass, (coverage * gy).sum() / mass
    height, width = coverage.shape
    best = (math.inf, "", 0.0, 0.0)
    for shape in SHAPES:
        half_width = math.sqrt(mass / AREA_PER_HALF_WIDTH_SQUARED[shape])
        # A triangle's centroid lies a third of its half-width below its box centre.
        box_cy = my - half_width / 3 if shape == "triangle" else my
        template = _template(shape, mx / side, box_cy / side, half_width / side, side)[window]
        for sigma in BLUR_SIGMAS:
            fit = _gaussian_matrix(height, sigma) @ template @ _gaussian_matrix(width, sigma).T
            error = (((fit - coverage) ** 2) * valid).sum()
            if error < best[0]:
                best = (error, shape, half_width, box_cy)
    _, shape, half_width, box_cy = best
    cx, cy, half_width = float(mx / side), float(box_cy / side), half_width / side
    size = "large" if half_width >= SIZE_SPLIT else "small"
    return DetectedObject(colour, shape, size, cx, cy, half_width, position_of(cx, cy), float(mass / side**2))


def _grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask dilated by `pixels` in the four directions (a diamond)."""
    grown = mask.copy()
    for _ in range(pixels):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


def analyze(image: np.ndarray) -> Analysis:
    """The background and every significant coloured blob of a uint8 [H, W, 3] image, largest first."""
    rgb = _prepare(image)
    hue, chroma = _hue_and_chroma(rgb)
    classes = _classify(hue, chroma)
    labels = _label(classes)
    background = np.median(rgb[classes < 0], axis=0) if (classes < 0).any() else np.zeros(3)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    side = rgb.shape[0]
    significant = ids[counts >= MIN_AREA * side * side]
    blobs = {label: labels == label for label in significant}
    palette_pixels = (classes >= 0) & (classes != _UNKNOWN_INDEX)
    objects = []
    for label, blob in blobs.items():
        colour = _COLOUR_NAMES[classes.flat[label]]  # a label is the flat index of one of its pixels
        if colour == UNKNOWN_COLOUR and (_grown(blob, SEAM_WIDTH) & palette_pixels).any():
            continue  # the blend along the seam of two nearby objects (red and purple make pink), not an object
        others = np.isin(labels, significant) & ~blob  # not fringes: they belong to this blob's edge
        obj = _measure(colour, blob, rgb, chroma, others, background)
        if obj is not None:
            objects.append(obj)
    objects.sort(key=lambda o: -o.area)
    return Analysis(_background(rgb), objects)


def relation_holds(relation: str, a: DetectedObject, b: DetectedObject) -> bool:
    """Whether a is <relation> b: the centres differ most along the relation's axis, in its direction."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along, across = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along > abs(across)


def judge_spec(spec: Spec, analysis: Analysis) -> Verdict:
    """Check a parsed caption against an analysed image (to judge several captions per analysis).

    details holds colour_ok, shape_ok, position_ok, relation_ok (None when the caption does not
    state one), count_ok (as many objects found as the caption names), size_ok and background_ok
    (reported, not part of "correct"), and the objects used. Raises ValueError for a colour or
    shape of the extra training vocabulary, which the judge cannot tell apart.
    """
    for o in spec.objects:
        if o.colour not in COLOURS or o.shape not in SHAPES:
            raise ValueError(
                f"the judge knows the colours {list(COLOURS)} and the shapes {list(SHAPES)}, not {o.colour} {o.shape}"
            )
    candidates = [[d for d in analysis.objects if d.colour == o.colour] for o in spec.objects]
    details: dict[str, Any] = {
        "colour_ok": all(candidates),
        # An extra object (a second blob, a duplicate) makes the picture say something else.
        "count_ok": len(analysis.objects) == len(spec.objects),
        "background_ok": None if spec.background is None else spec.background == analysis.background,
        "background": analysis.background,
        "n_objects": len(analysis.objects),
    }
    if len(spec.objects) == 1:
        o = spec.objects[0]

        def score_one(d: DetectedObject) -> tuple[bool, bool, float]:  # the right shape, then place, then the largest
            return (d.shape == o.shape, o.position is None or d.position == o.position, d.area)

        best = max(candidates[0], key=score_one, default=None)
        details |= {
            "shape_ok": best is not None and best.shape == o.shape,
            "position_ok": None if o.position is None else best is not None and best.position == o.position,
            "relation_ok": None,
            "size_ok": None if o.size is None else best is not None and best.size == o.size,
            "objects": [best],
        }
    else:
        a, b = spec.objects
        pairs = [(da, db) for da in candidates[0] for db in candidates[1]]

        def related(pair: tuple[DetectedObject, DetectedObject]) -> bool:
            return spec.relation is not None and relation_holds(spec.relation, *pair)

        def score_pair(pair: tuple[DetectedObject, DetectedObject]) -> tuple[int, float]:  # most right, then largest
            da, db = pair
            return ((da.shape == a.shape) + (db.shape == b.shape) + related(pair), da.area + db.area)

        best_pair = max(pairs, key=score_pair, default=None)
        details |= {
            "shape_ok": best_pair is not None and best_pair[0].shape == a.shape and best_pair[1].shape == b.shape,
            "position_ok": None,
            "relation_ok": None if spec.relation is None else best_pair is not None and related(best_pair),
            "size_ok": None,
            "objects": list(best_pair) if best_pair is not None else [None, None],
        }
    required = (details[k] for k in ("colour_ok", "shape_ok", "position_ok", "relation_ok", "count_ok"))
    return Verdict(all(v for v in required if v is not None), details)


def judge(prompt: str, image: np.ndarray) -> Verdict:
    """Whether the image shows what the Shapes prompt says (ValueError if it is not one)."""
    return judge_spec(parse_caption(prompt), analyze(image))
