"""The Shapes domain: procedural pictures of coloured shapes and the captions that describe them.

A scene is either one object in one cell of a 3x3 grid, or two objects of different colours in
a spatial relation, on a uniform background. One small caption grammar drives everything:
`format_caption` writes it, `parse_caption` reads it back into a `Spec`, and `sample_scene_for`
draws a scene that a (possibly partial) spec describes. Training data (`ShapesDataset`),
evaluation prompts (`canonical_prompts`) and the judge (`unclip.eval.judge`) all share it.

Coordinates are fractions of the side, 0..1, with y pointing down.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import IterableDataset, get_worker_info

from unclip.validation import check_fraction

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
# A training-only vocabulary beyond the domain (`--extra-vocabulary`): more colours and shapes,
# every one seen with nearly every other, so that a model meets colour and shape as separate
# facts. With six colours and three shapes, most colour-shape pairs are seen and two are not, and
# small models learn the pairs instead; a purple triangle then comes out as a purple circle.
# Evaluation prompts and the judge keep to COLOURS and SHAPES, and the held-out pairs stay held out.
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (240, 120, 190),
    "brown": (130, 80, 35),
    "lime": (165, 225, 50),
    "teal": (20, 150, 150),
}
EXTRA_SHAPES = ("diamond", "cross", "ring", "star")
ALL_COLOURS = COLOURS | EXTRA_COLOURS
ALL_SHAPES = SHAPES + EXTRA_SHAPES
SIZES: dict[str, float] = {"small": 0.10, "large": 0.16}  # nominal half-width, fraction of the side
SIZE_JITTER = 0.10  # relative, uniform
COLOUR_JITTER = 12  # per channel, uniform

# Grid cells as (column, row), and how a caption names them.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
# "left" means: the first object of the caption is to the left of the second.
RELATIONS: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
# A scene plus its one-fact variants: every caption has at least 5 (colour and shape changes
# within the train split), so groups of up to 6 can always be filled.
MAX_CONTRAST_GROUP = 6
SPLITS = ("train", "heldout", "all")
DEFAULT_HELDOUT: list[tuple[str, str]] = [("purple", "triangle"), ("orange", "square")]

# Stricter than the grammar needs, so that a judge measuring a blurry picture is not at the mercy
# of a pixel: box centres stay this far inside their cell, a relation's axis separation beats the
# other axis by this much, and two objects' boxes are at least this far apart.
CELL_MARGIN = 0.03
RELATION_MARGIN = 0.05
MIN_RELATION_DISTANCE = 0.25
BOX_GAP = 0.02
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str  # "small" | "large"
    cx: float  # box centre
    cy: float
    half_width: float
    rgb: tuple[int, int, int]

    @property
    def position(self) -> str:
        return position_of(self.cx, self.cy)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    relation: str | None  # two-object scenes: objects[0] is <relation> objects[1]
    caption: str
    mentioned: dict[str, bool]  # which optional attributes (size, position, background) the caption states


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; None is "not stated"."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Spec:
    """What a caption says about a scene; None is "not stated"."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")
        for o in self.objects:
            _check_value("colour", o.colour, ALL_COLOURS)
            _check_value("shape", o.shape, ALL_SHAPES)
            _check_value("size", o.size, SIZES)
            _check_value("position", o.position, POSITIONS)
        _check_value("relation", self.relation, RELATIONS)
        _check_value("background", self.background, BACKGROUNDS)
        if len(self.objects) == 1 and self.relation is not None:
            raise ValueError("a relation needs two objects")
        if len(self.objects) == 2:
            a, b = self.objects
            if any(o.size or o.position for o in self.objects):
                raise ValueError("two-object scenes state neither sizes nor positions")
            if a.colour is not None and a.colour == b.colour:
                raise ValueError(f"the two objects must have different colours, both are {a.colour}")


def _check_value(name: str, value: str | None, allowed) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")


def position_of(cx: float, cy: float) -> str:
    """The grid cell that contains the point (cx, cy)."""
    cell = (min(int(cx * 3), 2), min(int(cy * 3), 2))
    return next(name for name, c in POSITIONS.items() if c == cell)


# ---------------------------------------------------------------------------------------------
# Captions


def _with_article(words: list[str | None]) -> str:
    """The stated words (None: not stated) after "a" or "an"."""
    text = " ".join(word for word in words if word is not None)
    return ("an " if text[0] in "aeiou" else "a ") + text


def format_caption(spec: Spec) -> str:
    """The caption that states exactly what `spec` states; colours, shapes and relation are required."""
    if any(o.colour is None or o.shape is None for o in spec.objects):
        raise ValueError("a caption states every object's colour and shape")
    if len(spec.objects) == 1:
        o = spec.objects[0]
        text = _with_article([o.size, o.colour, o.shape])
        if o.position is not None:
            text += " " + POSITION_PHRASES[o.position]
    else:
        if spec.relation is None:
            raise ValueError("a two-object caption states the relation")
        a, b = spec.objects
        text = f"{_with_article([a.colour, a.shape])} {RELATIONS[spec.relation]} {_with_article([b.colour, b.shape])}"
    if spec.background is not None:
        text += f" on a {spec.background} background"
    return text


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in words)


_COLOUR, _SHAPE = _alternatives(ALL_COLOURS), _alternatives(ALL_SHAPES)
_BACKGROUND = rf"(?: on a (?P<background>{_alternatives(BACKGROUNDS)}) background)?"
_ONE_OBJECT = re.compile(
    rf"(?P<article>an?) (?:(?P<size>{_alternatives(SIZES)}) )?(?P<colour>{_COLOUR}) (?P<shape>{_SHAPE})"
    rf"(?: (?P<position>{_alternatives(POSITION_PHRASES.values())}))?{_BACKGROUND}"
)
_TWO_OBJECTS = re.compile(
    rf"(?P<article>an?) (?P<colour>{_COLOUR}) (?P<shape>{_SHAPE}) (?P<relation>{_alternatives(RELATIONS.values())})"
    rf" (?P<article2>an?) (?P<colour2>{_COLOUR}) (?P<shape2>{_SHAPE}){_BACKGROUND}"
)


def parse_caption(caption: str) -> Spec:
    """The inverse of `format_caption`: raises ValueError on text outside the grammar."""
    text = " ".join(caption.lower().split()).removesuffix(".")
    phrase_to_position = {p: name for name, p in POSITION_PHRASES.items()}
    phrase_to_relation = {p: name for name, p in RELATIONS.items()}
    if m := _ONE_OBJECT.fullmatch(text):
        _check_article(m["article"], m["size"] or m["colour"], caption)
        obj = ObjectSpec(m["colour"], m["shape"], m["size"], phrase_to_position.get(m["position"]))
        return Spec((obj,), background=m["background"])
    if m := _TWO_OBJECTS.fullmatch(text):
        _check_article(m["article"], m["colour"], caption)
        _check_article(m["article2"], m["colour2"], caption)
        objects = (ObjectSpec(m["colour"], m["shape"]), ObjectSpec(m["colour2"], m["shape2"]))
        return Spec(objects, phrase_to_relation[m["relation"]], m["background"])
    raise ValueError(f"not a Shapes caption: {caption!r}")


def _check_article(article: str, word: str, caption: str) -> None:
    if _with_article([word]).split()[0] != article:
        raise ValueError(f"wrong article {article!r} before {word!r} in {caption!r}")


# ---------------------------------------------------------------------------------------------
# Scenes


def _choice(rng: np.random.Generator, options):
    options = list(options)
    return options[rng.integers(len(options))]


def _make_object(rng: np.random.Generator, colour: str, shape: str, size: str, cx=0.5, cy=0.5) -> ShapeObject:
    half_width = SIZES[size] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    red, green, blue = (int(v) for v in np.clip(np.array(ALL_COLOURS[colour]) + jitter, 0, 255))
    return ShapeObject(shape, colour, size, cx, cy, half_width, (red, green, blue))


def _point_in_cell(rng: np.random.Generator, position: str, half_width: float) -> tuple[float, float]:
    """A box centre inside the cell (by CELL_MARGIN) that keeps the whole box on the canvas."""

    def coordinate(index: int) -> float:
        low = max(index / 3 + CELL_MARGIN, half_width)
        high = min((index + 1) / 3 - CELL_MARGIN, 1 - half_width)
        return rng.uniform(low, high)

    col, row = POSITIONS[position]
    return coordinate(col), coordinate(row)


def _place_pair(rng: np.random.Generator, hw_a: float, hw_b: float, relation: str) -> np.ndarray:
    """Box centres [[ax, ay], [bx, by]] with a <relation> b, by rejection sampling."""
    axis, sign = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
    for _ in range(10_000):
        a = rng.uniform(hw_a, 1 - hw_a, size=2)
        b = rng.uniform(hw_b, 1 - hw_b, size=2)
        d = a - b
        along, across = sign * d[axis], abs(d[1 - axis])
        apart = max(abs(d[0]), abs(d[1])) >= hw_a + hw_b + BOX_GAP
        if along >= MIN_RELATION_DISTANCE and along >= across + RELATION_MARGIN and apart:
            return np.stack([a, b])
    raise RuntimeError(f"could not place two objects {relation!r} of each other")  # never seen in practice


def sample_scene_for(spec: Spec, rng: np.random.Generator) -> Scene:
    """A scene that satisfies `spec`; whatever it leaves open is drawn at random.

    The caption states exactly what the spec states (plus the colours and shapes drawn for it).
    """
    free_colours = [c for c in COLOURS if c not in {o.colour for o in spec.objects}]
    objects = []
    for o in spec.objects:
        colour = o.colour
        if colour is None:
            colour = _choice(rng, free_colours)
            free_colours.remove(colour)
        objects.append(_make_object(rng, colour, o.shape or _choice(rng, SHAPES), o.size or _choice(rng, SIZES)))
    background = spec.background or _choice(rng, BACKGROUNDS)
    relation = None
    if len(objects) == 1:
        (obj,) = objects
        cx, cy = _point_in_cell(rng, spec.objects[0].position or _choice(rng, POSITIONS), obj.half_width)
        objects = [_moved(obj, cx, cy)]
    else:
        relation = spec.relation or _choice(rng, RELATIONS)
        centres = _place_pair(rng, objects[0].half_width, objects[1].half_width, relation)
        objects = [_moved(obj, *centre) for obj, centre in zip(objects, centres, strict=True)]
    stated = Spec(
        tuple(ObjectSpec(obj.colour, obj.shape, o.size, o.position) for obj, o in zip(objects, spec.objects, strict=True)),
        relation,
        spec.background,
    )
    mentioned = {
        "size": spec.objects[0].size is not None,
        "position": spec.objects[0].position is not None,
        "background": spec.background is not None,
    }
    return Scene(background, tuple(objects), relation, format_caption(stated), mentioned)


def _moved(obj: ShapeObject, cx: float, cy: float) -> ShapeObject:
    return ShapeObject(obj.shape, obj.colour, obj.size, float(cx), float(cy), obj.half_width, obj.rgb)


def split_combos(heldout: list[tuple[str, str]], split: str, extended: bool = False) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split may show: all but the held-out ones for "train", else all;
    extended: over the extra vocabulary as well."""
    colours, shapes = (ALL_COLOURS, ALL_SHAPES) if extended else (COLOURS, SHAPES)
    combos = [(c, s) for c in colours for s in shapes]
    if split == "train":
        combos = [c for c in combos if c not in {tuple(pair) for pair in heldout}]
    return combos


def _draw_combos(
    rng: np.random.Generator, count: int, heldout: list[tuple[str, str]], split: str, extended: bool = False
) -> list[tuple[str, str]]:
    """(colour, shape) for `count` objects of different colours, honouring the held-out split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    heldout = [(colour, shape) for colour, shape in heldout]
    if split == "heldout" and not heldout:
        raise ValueError("the heldout split needs at least one held-out (colour, shape)")
    combos = split_combos(heldout, split, extended)
    while True:
        drawn = [_choice(rng, combos) for _ in range(count)]
        if split == "heldout":  # one object is held out, the other anything
            drawn[rng.integers(count)] = _choice(rng, heldout)
        if len({colour for colour, _ in drawn}) == count:
            return drawn


def _random_spec(
    rng: np.random.Generator, combos: list[tuple[str, str]], mention_p: float, always_position: bool = False
) -> Spec:
    """A spec for these objects that states each optional attribute with probability mention_p."""

    def maybe(options):
        return _choice(rng, options) if rng.random() < mention_p else None

    background = maybe(BACKGROUNDS)
    if len(combos) == 1:
        (colour, shape), size = combos[0], maybe(SIZES)
        position = _choice(rng, POSITIONS) if always_position else maybe(POSITIONS)
        return Spec((ObjectSpec(colour, shape, size, position),), background=background)
    objects = tuple(ObjectSpec(colour, shape) for colour, shape in combos)
    return Spec(objects, _choice(rng, RELATIONS), background)


def sample(
    rng: np.random.Generator,
    two_object_fraction: float = 0.3,
    heldout: list[tuple[str, str]] = DEFAULT_HELDOUT,
    split: str = "all",
    mention_p: float = 0.5,
    extended: bool = False,
) -> Scene:
    """One random scene with its caption; extended: its objects may use the extra vocabulary."""
    count = 2 if rng.random() < two_object_fraction else 1
    spec = _random_spec(rng, _draw_combos(rng, count, heldout, split, extended), mention_p)
    return sample_scene_for(spec, rng)


def colours_swapped(spec: Spec) -> Spec:
    """A two-object spec with its two colours exchanged between the shapes."""
    a, b = spec.objects
    return dataclasses.replace(spec, objects=(ObjectSpec(b.colour, a.shape), ObjectSpec(a.colour, b.shape)))


def contrast_specs(spec: Spec, rng: np.random.Generator, combos: list[tuple[str, str]], count: int) -> list[Spec]:
    """`count` different specs that each differ from `spec` in exactly one stated fact.

    Contrastive training rarely meets captions in a batch that differ only in position or in
    which colour goes with which shape, so it can score well while ignoring them; a group of such
    variants in every batch makes them the only thing left to learn. One fact is chosen per group
    (position half the time when the caption states it; else colour, shape or stated size; for
    two objects the relation, the colours swapped, or one object's colour) and as many variants as
    possible vary it; other facts fill up the rest. Colour-shape pairs stay within `combos`.
    """
    objects = spec.objects
    colours, shapes = dict.fromkeys(c for c, _ in combos), dict.fromkeys(s for _, s in combos)  # ordered, unique
    kinds: dict[str, list[Spec]] = {}
    if len(objects) == 2:
        a, b = objects
        kinds["relation"] = [dataclasses.replace(spec, relation=r) for r in RELATIONS if r != spec.relation]
        swapped = colours_swapped(spec)
        if a.shape != b.shape and all((o.colour, o.shape) in combos for o in swapped.objects):
            kinds["swap"] = [swapped]
        taken = {a.colour, b.colour}
        kinds["colour"] = [
            dataclasses.replace(spec, objects=(a, ObjectSpec(c, b.shape)))
            for c in colours
            if c not in taken and (c, b.shape) in combos
        ]
    else:
        (obj,) = objects

        def with_object(**change) -> Spec:
            return dataclasses.replace(spec, objects=(dataclasses.replace(obj, **change),))

        if obj.position is not None:
            kinds["position"] = [with_object(position=p) for p in POSITIONS if p != obj.position]
        kinds["colour"] = [with_object(colour=c) for c in colours if c != obj.colour and (c, obj.shape) in combos]
        kinds["shape"] = [with_object(shape=s) for s in shapes if s != obj.shape and (obj.colour, s) in combos]
        if obj.size is not None:
            kinds["size"] = [with_object(size=s) for s in SIZES if s != obj.size]
    names = [name for name, options in kinds.items() if options]
    first = "position" if "position" in names and rng.random() < 0.5 else _choice(rng, names)
    order = [first] + [names[i] for i in rng.permutation(len(names)) if names[i] != first]
    variants = [option for name in order for option in (kinds[name][i] for i in rng.permutation(len(kinds[name])))]
    if len(variants) < count:
        raise ValueError(f"{format_caption(spec)!r} has only {len(variants)} one-fact variants, {count} asked for")
    return variants[:count]


def render(scene: Scene, size: int = 128) -> np.ndarray:
    """The scene as a [size, size, 3] uint8 image: drawn SUPERSAMPLE times larger, then box-filtered."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        # PIL boxes include their last pixel, hence the - 1.
        x0, y0 = (obj.cx - obj.half_width) * big, (obj.cy - obj.half_width) * big
        x1, y1 = (obj.cx + obj.half_width) * big - 1, (obj.cy + obj.half_width) * big - 1
        cx, cy, half = obj.cx * big - 0.5, obj.cy * big - 0.5, obj.half_width * big
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=obj.rgb)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=obj.rgb)
        elif obj.shape == "triangle":  # pointing up: apex at the top centre of its box, base along the bottom
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=obj.rgb)
        elif obj.shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=obj.rgb)
        elif obj.shape == "cross":  # a plus sign whose arms are 0.4 of the box wide
            arm = 0.4 * half
            draw.rectangle((x0, cy - arm, x1, cy + arm), fill=obj.rgb)
            draw.rectangle((cx - arm, y0, cx + arm, y1), fill=obj.rgb)
        elif obj.shape == "ring":  # a disk with the background showing through its middle half
            draw.ellipse((x0, y0, x1, y1), fill=obj.rgb)
            hole = 0.5 * half
            draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=BACKGROUNDS[scene.background])
        elif obj.shape == "star":  # five points, the first straight up
            angles = np.pi / 2 + np.arange(10) * np.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, half, 0.45 * half)
            draw.polygon([(cx + r * np.cos(a), cy - r * np.sin(a)) for r, a in zip(radii, angles, strict=True)], fill=obj.rgb)
        else:
            raise ValueError(f"cannot draw shape {obj.shape!r}")
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


# ---------------------------------------------------------------------------------------------
# Datasets and prompts


class ShapesDataset(IterableDataset):
    """An endless, seeded stream of {"image": uint8 [size, size, 3], "caption": str}.

    Each optional attribute (size, position, background) is stated in a caption with probability
    mention_p; stating more teaches a contrastive model attributes it otherwise rarely has to tell apart.

    split "train" never shows a held-out (colour, shape), in pictures or captions; "heldout"
    shows at least one in every scene; "all" ignores the held-out list. Each DataLoader worker
    draws its own stream from (seed, worker id), so workers never repeat each other.

    contrast_group > 1: every scene is followed by contrast_group - 1 variants whose captions
    differ from it in one fact (`contrast_specs`), on the same background, so that batches whose
    size is a multiple of the group hold every scene with its hard negatives.

    extra_vocabulary: the share of scenes (and their contrast groups) whose objects are drawn from
    the colours and shapes of the domain plus EXTRA_COLOURS and EXTRA_SHAPES, held-out pairs still
    excepted; the others keep to the domain.
    """

    def __init__(
        self,
        seed: int = 0,
        size: int = 128,
        two_object_fraction: float = 0.3,
        heldout: list[tuple[str, str]] = DEFAULT_HELDOUT,
        split: str = "train",
        mention_p: float = 0.5,
        contrast_group: int = 1,
        extra_vocabulary: float = 0.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if not 1 <= contrast_group <= MAX_CONTRAST_GROUP:
            raise ValueError(f"contrast_group must lie in [1, {MAX_CONTRAST_GROUP}], got {contrast_group}")
        if contrast_group > 1 and split == "heldout":
            raise ValueError("contrast groups are for training: a variant may lose the held-out pair the heldout split promises")
        self.contrast_group = contrast_group
        self.seed, self.size, self.split = seed, size, split
        self.two_object_fraction = check_fraction(two_object_fraction, "two_object_fraction")
        self.heldout = list(heldout)
        self.mention_p = check_fraction(mention_p, "mention_p")
        self.extra_vocabulary = check_fraction(extra_vocabulary, "extra_vocabulary")

    def __iter__(self):
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if worker is None else worker.id])
        # What contrast variants may show, by vocabulary.
        combos = {extended: split_combos(self.heldout, self.split, extended) for extended in (False, True)}
        while True:
            # Drawn only when asked for, so that streams without the extra vocabulary stay as they were.
            extended = self.extra_vocabulary > 0 and rng.random() < self.extra_vocabulary
            scene = sample(rng, self.two_object_fraction, self.heldout, self.split, self.mention_p, extended)
            yield {"image": render(scene, self.size), "caption": scene.caption}
            if self.contrast_group > 1:
                for spec in contrast_specs(parse_caption(scene.caption), rng, combos[extended], self.contrast_group - 1):
                    variant = dataclasses.replace(sample_scene_for(spec, rng), background=scene.background)
                    yield {"image": render(variant, self.size), "caption": variant.caption}


def canonical_prompts(n: int, seed: int = 0, split: str = "all", heldout: list[tuple[str, str]] = DEFAULT_HELDOUT) -> list[str]:
    """n evaluation prompts, the same for the same arguments: 60% one object (colour, shape and
    position always stated), 40% two objects in a relation, shuffled; held-out split as in ShapesDataset."""
    rng = np.random.default_rng(seed)
    n_one = round(0.6 * n)
    prompts = []
    for i in range(n):
        combos = _draw_combos(rng, 1 if i < n_one else 2, heldout, split)
        prompts.append(format_caption(_random_spec(rng, combos, mention_p=0.5, always_position=True)))
    rng.shuffle(prompts)
    return prompts
