"""The embedded world (docs/WORLD.md): procedural captioned scenes whose ground truth is known exactly.

A `Scene` is content plus style and does not depend on the canvas size; `render` rasterises it at any supported
side S. Objects are snapped to the pixel grid with odd sides, one object per 3x3 grid cell, kept inside their cell,
so the checker (krea2.eval.checker) can read every image back exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from krea2.data.types import Example
from krea2.errors import Krea2Error

SHAPES = ("circle", "square", "triangle")
COLORS = {  # saturated fills with well separated hues, so hue alone names the colour (shading keeps hue)
    "red": (220, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (240, 220, 0),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (150, 40, 190),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}  # achromatic: never a fill
STYLES = ("flat", "outline", "striped", "gradient", "grainy")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "placement", "size", "style")

GRADIENT_DROP = 0.45  # gradient fill: brightness falls linearly from 1 (top-left) to 1 - drop (bottom-right)
GRAIN_LUMA, GRAIN_CHROMA = 64, 12  # grainy fill: per-pixel uniform noise, mostly brightness so the hue survives


@dataclass(frozen=True)
class Geometry:
    """How a scene is rasterised at one canvas side. Sides are odd so every shape has a centre pixel."""

    canvas: int
    small: int  # object side in pixels
    large: int
    margin: int  # wanted gap between an object and its cell border (less where the cell is too narrow)
    stroke: int  # outline width
    stripe: int  # stripe period in rows (half fill, half background), anchored at the object's top row

    def side(self, size: str) -> int:
        return self.large if size == "large" else self.small


# At 16 px the cells are 5-6 px wide: large objects fill them, so two large objects in edge-adjacent cells could
# touch. Objects still never cross their cell (the checker reads cell by cell) and sample_scene keeps same-coloured
# large objects out of neighbouring cells, so touching objects always differ in colour.
# With stripe period 4 the sides are 1 mod 4, so the bottom row is a fill row and the bounding box stays exact.
GEOMETRIES = {
    16: Geometry(16, small=3, large=5, margin=1, stroke=1, stripe=2),
    32: Geometry(32, small=5, large=9, margin=1, stroke=1, stripe=2),
    48: Geometry(48, small=9, large=13, margin=2, stroke=2, stripe=4),
    64: Geometry(64, small=9, large=17, margin=2, stroke=2, stripe=4),
}
SUPPORTED_SIZES = tuple(GEOMETRIES)


def geometry(size: int) -> Geometry:
    if size not in GEOMETRIES:
        raise Krea2Error(f"world canvas size {size} is not supported; use one of {list(SUPPORTED_SIZES)}")
    return GEOMETRIES[size]


def cell_bounds(size: int) -> list[int]:
    """Pixel borders of the 3x3 grid: cell k spans [b[k], b[k+1])."""
    return [round(k * size / 3) for k in range(4)]


@dataclass
class WorldObject:
    shape: str
    color: str
    size: str
    position: str


@dataclass
class Scene:
    background: str
    style: str
    objects: list[WorldObject]


# ----------------------------------------------------------------------------------------------------- validation
def _check_value(value, allowed, what: str, where: str = "") -> None:
    if value not in allowed:
        raise Krea2Error(f"unknown {what} {value!r}{where}; use one of {list(allowed)}")


def cell_of(position: str) -> tuple[int, int]:
    return divmod(POSITIONS.index(position), 3)


def _neighbours(p: str, q: str) -> bool:
    """Cells that share an edge or a corner."""
    (r1, c1), (r2, c2) = cell_of(p), cell_of(q)
    return max(abs(r1 - r2), abs(c1 - c2)) == 1


def validate_scene(scene: Scene, where: str = "") -> None:
    """Raise Krea2Error unless the scene follows the world's rules."""
    _check_value(scene.background, BACKGROUNDS, "background", where)
    _check_value(scene.style, STYLES, "style", where)
    if not 1 <= len(scene.objects) <= 4:
        raise Krea2Error(f"a world scene holds 1 to 4 objects, got {len(scene.objects)}{where}")
    for o in scene.objects:
        _check_value(o.shape, SHAPES, "shape", where)
        _check_value(o.color, COLORS, "color", where)
        _check_value(o.size, SIZES, "size", where)
        _check_value(o.position, POSITIONS, "position", where)
    cells = [o.position for o in scene.objects]
    if len(set(cells)) != len(cells):
        raise Krea2Error(f"two objects share a grid cell in {cells}{where}; give each object its own cell")
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            if a.size == b.size == "large" and a.color == b.color and _neighbours(a.position, b.position):
                raise Krea2Error(f"same-coloured large objects in neighbouring cells {a.position!r}, {b.position!r}"
                                 f"{where}: they would touch at 16 px; move one")


# ------------------------------------------------------------------------------------------------------- sampling
def sample_scene(rng: np.random.Generator, n_objects: tuple[int, int] = (1, 4), styles: Sequence[str] | None = None,
                 backgrounds: Sequence[str] | None = None, sizes: Sequence[str] | None = None,
                 shapes: Sequence[str] | None = None, colors: Sequence[str] | None = None,
                 large_only: bool = False, n_weights: Sequence[float] | None = None) -> Scene:
    """A random scene. n_objects is an inclusive range; the lists restrict attributes (curricula, prompt tags).

    large_only is sizes=["large"]: what a 16 px curriculum stage wants, where small objects are 3 px.
    n_weights: relative weights of lo, lo + 1, ..., hi objects (None = uniform, the draw of earlier releases), so a
    midtraining mix can keep one-object scenes common while adding crowded ones.
    """
    lo, hi = n_objects
    if not 1 <= lo <= hi <= 4:
        raise Krea2Error(f"n_objects must satisfy 1 <= lo <= hi <= 4, got {n_objects}")
    if n_weights is not None:
        n_weights = np.asarray(n_weights, float)
        if n_weights.shape != (hi - lo + 1,) or not np.all(np.isfinite(n_weights) & (n_weights >= 0)) \
                or not n_weights.sum() > 0:
            raise Krea2Error(f"n_objects weights {n_weights.tolist()} must be {hi - lo + 1} non-negative numbers (one "
                             f"per count {lo}..{hi}) with a positive sum")
    styles, backgrounds = list(styles or STYLES), list(backgrounds or BACKGROUNDS)
    sizes = ["large"] if large_only else list(sizes or SIZES)
    shapes, colors = list(shapes or SHAPES), list(colors or COLORS)
    for values, allowed, what in ((styles, STYLES, "style"), (backgrounds, BACKGROUNDS, "background"),
                                  (sizes, SIZES, "size"), (shapes, SHAPES, "shape"), (colors, COLORS, "color")):
        for v in values:
            _check_value(v, allowed, what)
    n = int(rng.integers(lo, hi + 1)) if n_weights is None else lo + int(rng.choice(hi - lo + 1,
                                                                                p=n_weights / n_weights.sum()))
    style, background = styles[rng.integers(len(styles))], backgrounds[rng.integers(len(backgrounds))]
    while True:  # rejection keeps same-coloured large objects apart (rare: a few % of 4-object scenes)
        cells = rng.permutation(len(POSITIONS))[:n]
        objects = [WorldObject(shape=shapes[rng.integers(len(shapes))], color=colors[rng.integers(len(colors))],
                               size=sizes[rng.integers(len(sizes))], position=POSITIONS[c]) for c in cells]
        scene = Scene(background=background, style=style, objects=objects)
        try:
            validate_scene(scene)
            return scene
        except Krea2Error:
            continue


# ------------------------------------------------------------------------------------------------------ rendering
@functools.cache
def shape_mask(shape: str, n: int) -> np.ndarray:
    """Filled (n, n) mask of a shape with odd side n; circles and triangles stay distinct down to n = 3."""
    c = (n - 1) // 2
    i, j = np.mgrid[0:n, 0:n]
    if shape == "square":
        m = np.ones((n, n), bool)
    elif shape == "circle":
        m = (i - c) ** 2 + (j - c) ** 2 <= c * c + c / 2  # radius ~c + 1/4: a plus at n = 3, corners cut above
    elif shape == "triangle":  # apex up, base the full bottom row; half-width rounds half up
        half = (2 * i * c + (n - 1)) // (2 * (n - 1))
        m = np.abs(j - c) <= half
    else:
        raise Krea2Error(f"unknown shape {shape!r}; use one of {list(SHAPES)}")
    m.flags.writeable = False
    return m


def _erode(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    return m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def fill_kind(style: str) -> str:
    """What a style does to an object's footprint: outline and stripes remove pixels, the others shade them."""
    return style if style in ("outline", "striped") else "solid"


@functools.cache
def object_mask(shape: str, n: int, kind: str, stroke: int, stripe: int) -> np.ndarray:
    """The pixels a rendered object paints, for kind in ('solid', 'outline', 'striped')."""
    m = shape_mask(shape, n)
    if kind == "outline":
        inner = m
        for _ in range(stroke):
            inner = _erode(inner)
        m = m & ~inner
    elif kind == "striped":
        rows = (np.arange(n) // (stripe // 2)) % 2 == 0
        m = m & rows[:, None]
    m = np.ascontiguousarray(m)
    m.flags.writeable = False
    return m


def gradient_factor(n: int) -> np.ndarray:
    i, j = np.mgrid[0:n, 0:n]
    return 1.0 - GRADIENT_DROP * (i + j) / (2 * max(n - 1, 1))


def _place(lo: int, hi: int, n: int, margin: int, rng: np.random.Generator) -> int:
    """Random integer start of an n-pixel object inside [lo, hi), keeping the margin where the cell allows."""
    m = min(margin, (hi - lo - n) // 2)
    return int(rng.integers(lo + m, hi - m - n + 1))


def layout(scene: Scene, size: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(top, left, side) of every object: the integer jitter inside its cell."""
    g, b = geometry(size), cell_bounds(size)
    boxes = []
    for o in scene.objects:
        n = g.side(o.size)
        r, c = cell_of(o.position)
        boxes.append((_place(b[r], b[r + 1], n, g.margin, rng), _place(b[c], b[c + 1], n, g.margin, rng), n))
    return boxes


def render(scene: Scene, size: int, seed: int) -> np.ndarray:
    """(S, S, 3) uint8 RGB image of the scene; the seed fixes the jitter and the grain, nothing else varies."""
    g = geometry(size)
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    kind = fill_kind(scene.style)
    for o, (top, left, n) in zip(scene.objects, layout(scene, size, rng)):
        color = np.array(COLORS[o.color], np.float64)
        pix = np.broadcast_to(color, (n, n, 3)).copy()
        if scene.style == "gradient":
            pix = pix * gradient_factor(n)[..., None]
        elif scene.style == "grainy":
            luma = rng.integers(-GRAIN_LUMA, GRAIN_LUMA + 1, (n, n, 1))
            chroma = rng.integers(-GRAIN_CHROMA, GRAIN_CHROMA + 1, (n, n, 3))
            pix = pix + luma + chroma
        m = object_mask(o.shape, n, kind, g.stroke, g.stripe)
        region = img[top:top + n, left:left + n]
        region[m] = np.clip(np.rint(pix[m]), 0, 255).astype(np.uint8)
    return img


# ------------------------------------------------------------------------------------------------------- captions
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
POSITION_PHRASES = {
    "top left": ("in the top left", "at the top left corner"),
    "top": ("at the top", "at the top middle"),
    "top right": ("in the top right", "at the top right corner"),
    "left": ("on the left", "at the middle left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the middle right"),
    "bottom left": ("in the bottom left", "at the bottom left corner"),
    "bottom": ("at the bottom", "at the bottom middle"),
    "bottom right": ("in the bottom right", "at the bottom right corner"),
}
STYLE_PHRASES = {
    "flat": ("in flat style", "with flat solid colors", "flat-colored"),
    "outline": ("in outline style", "drawn as outlines", "outlined"),
    "striped": ("in striped style", "with striped fills", "striped"),
    "gradient": ("in gradient style", "with gradient shading", "gradient-shaded"),
    "grainy": ("in grainy style", "with grainy noisy fills", "grainy"),
}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def noun_phrase(shape: str, count: int = 1, color: str | None = None, size: str | None = None) -> str:
    """'a small red circle', 'three triangles'."""
    words = [w for w in (size, color) if w] + [shape + ("s" if count > 1 else "")]
    article = ("an" if words[0][0] in "aeiou" else "a") if count == 1 else NUMBER_WORDS[count]
    return " ".join([article] + words)


def _grouped(objects: list[WorldObject], with_color: bool) -> str:
    """Group identical objects into counts: 'two red circles and a blue square'."""
    groups: dict[tuple, int] = {}
    for o in objects:
        key = (o.shape, o.color if with_color else None)
        groups[key] = groups.get(key, 0) + 1
    return _join([noun_phrase(shape, k, color) for (shape, color), k in groups.items()])


def relation_between(a: WorldObject, b: WorldObject, rng: np.random.Generator) -> str | None:
    """A relation that holds between a and b by their cells, or None when they share a row and a column."""
    (ra, ca), (rb, cb) = cell_of(a.position), cell_of(b.position)
    options = []
    if ca != cb:
        options.append("left of" if ca < cb else "right of")
    if ra != rb:
        options.append("above" if ra < rb else "below")
    return _pick(rng, options) if options else None


def relation_phrase(relation: str) -> str:
    return {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}[relation]


def captions(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """Long (every attribute), medium and short (user-like) captions, each from several templates."""
    objs, n, bg = scene.objects, len(scene.objects), scene.background
    count = "one object" if n == 1 else f"{NUMBER_WORDS[n]} objects"
    full = _join([f"{noun_phrase(o.shape, 1, o.color, o.size)} {_pick(rng, POSITION_PHRASES[o.position])}"
                  for o in objs])
    style_in, style_with, style_adj = STYLE_PHRASES[scene.style]
    long = _pick(rng, (
        f"A {scene.style} style image of {count} on a {bg} background: {full}.",
        f"{count.capitalize()} drawn {style_in} on a {bg} background: {full}.",
        f"On a {bg} background, {full}, all {style_in}.",
        f"A {style_adj} picture with a {bg} background showing {full}.",
    ))
    colored = _grouped(objs, with_color=True)
    medium = _pick(rng, (
        f"{colored} on a {bg} background, {style_in}",
        f"{colored} {style_with} on {bg}",
        f"{style_adj} shapes on a {bg} background: {colored}",
        f"{_join([noun_phrase(o.shape, 1, o.color, o.size) for o in objs])} on a {bg} background",
    ))
    short_options = [_grouped(objs, with_color=False), colored]
    if n == 1:
        o = objs[0]
        short_options.append(f"{noun_phrase(o.shape, 1, o.color)} {POSITION_PHRASES[o.position][0]}")
    if n == 2:
        a, b = objs
        rel = relation_between(a, b, rng)
        if rel:
            short_options.append(f"{noun_phrase(a.shape, 1, a.color)} {relation_phrase(rel)} "
                                 f"{noun_phrase(b.shape, 1, b.color)}")
        short_options.append(" and ".join(noun_phrase(o.shape, 1, o.color, o.size) for o in objs))
        short_options.append(" and ".join(noun_phrase(o.shape, 1, size=o.size) for o in objs))
    return {"long": long, "medium": medium, "short": _pick(rng, short_options)}


# -------------------------------------------------------------------------------------------------- ground truth
def scene_to_record(scene: Scene) -> dict:
    return {"background": scene.background, "style": scene.style, "objects": [asdict(o) for o in scene.objects]}


def record_to_scene(d: dict, where: str = "") -> Scene:
    try:
        scene = Scene(background=d["background"], style=d["style"],
                      objects=[WorldObject(o["shape"], o["color"], o["size"], o["position"]) for o in d["objects"]])
    except (KeyError, TypeError) as e:
        raise Krea2Error(f"world scene record lacks field {e}{where}; it needs background, style and objects with "
                         "shape, color, size, position") from None
    validate_scene(scene, where)
    return scene


def world_examples(n: int, size: int, seed: int, **sample_kwargs) -> Iterator[Example]:
    """n captioned renders at side `size`, reproducible from `seed`; meta['scene'] is the ground-truth record."""
    geometry(size)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = sample_scene(rng, **sample_kwargs)
        render_seed = int(rng.integers(2**31))
        yield Example(image=render(scene, size, render_seed), captions=captions(scene, rng),
                      meta={"scene": scene_to_record(scene), "size": size, "render_seed": render_seed})


# ------------------------------------------------------------------------------------------ evaluation prompts
def scene_to_prompt_record(scene: Scene, tag: str, rng: np.random.Generator | None = None) -> dict:
    """An evaluation prompt (WORLD.md JSONL format) of family `tag` that this scene satisfies.

    The scene must suit the tag (e.g. counting: every object has the same shape); its render then passes the check.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    _check_value(tag, TAGS, "tag")
    objs = scene.objects

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise Krea2Error(f"scene does not suit tag {tag!r}: it needs {what}; sample one that does")

    rec: dict = {"tag": tag}
    if tag == "single_object":
        need(len(objs) == 1, "one object")
        rec["objects"] = [{"shape": objs[0].shape}]
        rec["prompt"] = noun_phrase(objs[0].shape)
    elif tag == "two_object":
        need(len(objs) == 2 and objs[0].shape != objs[1].shape, "two objects of different shapes")
        rec["objects"] = [{"shape": o.shape} for o in objs]
        rec["prompt"] = f"{noun_phrase(objs[0].shape)} and {noun_phrase(objs[1].shape)}"
    elif tag == "counting":
        need(len(objs) >= 2 and len({o.shape for o in objs}) == 1, "two to four objects of one shape")
        rec["objects"] = [{"shape": objs[0].shape, "count": len(objs)}]
        rec["prompt"] = noun_phrase(objs[0].shape, len(objs))
    elif tag == "colors":
        need(len(objs) == 1, "one object")
        o = objs[0]
        rec["objects"] = [{"shape": o.shape, "color": o.color}]
        rec["prompt"] = noun_phrase(o.shape, 1, o.color)
    elif tag == "position":
        need(len(objs) == 2 and (objs[0].shape, objs[0].color) != (objs[1].shape, objs[1].color),
             "two distinguishable objects")
        a, b = objs
        rel = relation_between(a, b, rng)
        need(rel is not None, "objects in different rows or columns")
        rec["objects"] = [{"shape": o.shape, "color": o.color} for o in objs]
        rec["relations"] = [{"a": 0, "b": 1, "relation": rel}]
        rec["prompt"] = f"{noun_phrase(a.shape, 1, a.color)} {relation_phrase(rel)} {noun_phrase(b.shape, 1, b.color)}"
    elif tag == "color_attr":
        need(len(objs) == 2 and objs[0].color != objs[1].color, "two objects of different colours")
        rec["objects"] = [{"shape": o.shape, "color": o.color} for o in objs]
        rec["prompt"] = " and ".join(noun_phrase(o.shape, 1, o.color) for o in objs)
    elif tag == "placement":
        need(len(objs) == 1, "one object")
        o = objs[0]
        rec["objects"] = [{"shape": o.shape, "color": o.color, "position": o.position}]
        rec["prompt"] = f"{noun_phrase(o.shape, 1, o.color)} {POSITION_PHRASES[o.position][0]}"
    elif tag == "size":
        need(len(objs) == 2 and objs[0].size != objs[1].size, "two objects of different sizes")
        rec["objects"] = [{"shape": o.shape, "size": o.size} for o in objs]
        rec["prompt"] = " and ".join(noun_phrase(o.shape, 1, size=o.size) for o in objs)
    else:  # style
        need(len(objs) == 1, "one object")
        o = objs[0]
        rec["objects"] = [{"shape": o.shape, "color": o.color}]
        rec["background"], rec["style"] = scene.background, scene.style
        rec["prompt"] = (f"{noun_phrase(o.shape, 1, o.color)} on a {scene.background} background "
                         f"{STYLE_PHRASES[scene.style][0]}")
    return {"prompt": rec.pop("prompt"), **rec}


def sample_scene_for_tag(rng: np.random.Generator, tag: str) -> Scene:
    """A random scene that suits the tag (see scene_to_prompt_record)."""
    _check_value(tag, TAGS, "tag")
    while True:
        if tag in ("single_object", "colors", "placement", "style"):
            scene = sample_scene(rng, n_objects=(1, 1))
        elif tag == "counting":
            scene = sample_scene(rng, n_objects=(2, 4), shapes=[_pick(rng, SHAPES)])
        else:
            scene = sample_scene(rng, n_objects=(2, 2))
        try:
            scene_to_prompt_record(scene, tag, np.random.default_rng(0))
            return scene
        except Krea2Error:
            continue


def make_eval_prompts(n_per_tag: int, seed: int = 0) -> list[dict]:
    """n_per_tag prompts of each WORLD.md tag, deterministic in seed, tags interleaved."""
    rng = np.random.default_rng(seed)
    per_tag = {tag: [] for tag in TAGS}
    for tag in TAGS:
        for _ in range(n_per_tag):
            per_tag[tag].append(scene_to_prompt_record(sample_scene_for_tag(rng, tag), tag, rng))
    return [per_tag[tag][i] for i in range(n_per_tag) for tag in TAGS]
