"""The world's caption language, read and written: the parser that makes the expander's faithfulness exact.

`parse` reads any caption the world's cascade writes (long, medium and short templates, docs/WORLD.md "Captions") and
the prompts of the evaluation files into a `ParsedCaption`: noun phrases (count, size, colour, shape, grid position),
relations stated between neighbouring phrases, background, style, the declared object count, and the words it does
not know. `prompt_record` turns a short prompt into the structured requirements a world prompt record holds (what
the user fixed), `caption_detection` turns an expansion into the detection an image of it would give, so that
`krea2.eval.checker.matches` and `krea2.rewards.world.requirement_results` judge the text exactly as they judge images.
`expansion_text` writes an expansion of a scene at a creativity level with the world's own phrases.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import numpy as np

from krea2.data import world
from krea2.errors import Krea2Error
from krea2.eval import checker

NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
STYLE_WORDS = {"flat": "flat", "flat-colored": "flat", "outline": "outline", "outlines": "outline",
               "outlined": "outline", "striped": "striped", "gradient": "gradient", "gradient-shaded": "gradient",
               "grainy": "grainy"}
_POSITION_PHRASES = {phrase: pos for pos, phrases in world.POSITION_PHRASES.items() for phrase in phrases}
_RELATION_PHRASES = {world.relation_phrase(r): r for r in world.RELATIONS}


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first: "at the top left"


NOUN_PHRASE = re.compile(
    rf"\b(?P<num>{_alternation(NUMBERS)})\s+(?:(?P<size>{_alternation(world.SIZES)})\s+)?"
    rf"(?:(?P<color>{_alternation(world.COLORS)})\s+)?(?P<shape>{_alternation(world.SHAPES)})(?P<plural>s)?\b"
    rf"(?:\s+(?P<position>{_alternation(_POSITION_PHRASES)})\b)?", re.IGNORECASE)
_BACKGROUNDS = _alternation(world.BACKGROUNDS)
BACKGROUND = re.compile(rf"\b(?:({_BACKGROUNDS})\s+background|on\s+({_BACKGROUNDS}))\b", re.IGNORECASE)
STYLE = re.compile(rf"(?<![\w-])({_alternation(STYLE_WORDS)})(?![\w-])", re.IGNORECASE)
DECLARED_COUNT = re.compile(r"\b(one|two|three|four)\s+objects?\b", re.IGNORECASE)
WORD = re.compile(r"[a-z]+(?:-[a-z]+)*", re.IGNORECASE)


@dataclass
class Phrase:
    """One noun phrase: `count` objects of `shape`, with the attributes it names (None: left open)."""
    shape: str
    count: int = 1
    color: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass
class ParsedCaption:
    """What a caption states. relations: (i, j, relation) between phrases i and j; styles/backgrounds: every value
    named (more than one is a contradiction); unknown: words outside the world's language."""
    phrases: list[Phrase] = field(default_factory=list)
    relations: list[tuple[int, int, str]] = field(default_factory=list)
    backgrounds: list[str] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)
    declared_count: int | None = None
    unknown: list[str] = field(default_factory=list)

    @property
    def n_objects(self) -> int:
        return sum(p.count for p in self.phrases)

    @property
    def background(self) -> str | None:
        return self.backgrounds[0] if len(set(self.backgrounds)) == 1 else None

    @property
    def style(self) -> str | None:
        return self.styles[0] if len(set(self.styles)) == 1 else None


@functools.cache
def known_words() -> frozenset[str]:
    """Every word the world's captions, prompts and the expander's format use (lower case)."""
    rng = np.random.default_rng(0)
    words = set(NUMBERS) | set(world.SHAPES) | {s + "s" for s in world.SHAPES} | set(world.COLORS) | set(world.SIZES)
    words |= set(world.BACKGROUNDS) | set(STYLE_WORDS) | set(FORMAT_WORDS)
    for text in [*world.POSITION_PHRASES.values(), *world.STYLE_PHRASES.values()]:
        for phrase in text:
            words |= set(WORD.findall(phrase.lower()))
    for r in world.RELATIONS:
        words |= set(WORD.findall(world.relation_phrase(r)))
    for _ in range(400):  # the templates' own filler words ("drawn", "showing", "picture", ...)
        scene = world.sample_scene(rng)
        for caption in world.captions(scene, rng).values():
            words |= set(WORD.findall(caption.lower()))
    return frozenset(words)


# Words that state content: left over outside every phrase read, they mean something was said that was not parsed.
CONTENT_WORDS = frozenset([*world.SHAPES, *(s + "s" for s in world.SHAPES), *world.COLORS, *world.SIZES,
                           "top", "bottom", "left", "right", "center", "middle", "corner", "above", "below"])
FORMAT_WORDS = ("keep", "open", "caption", "color", "size", "position", "background", "style", "nothing",
                "objects", "object", "of", "right", "left", "above", "below")


def parse(text: str) -> ParsedCaption:
    """Read a caption or prompt of the world's language (any case, any of the cascade's templates).

    A relation is read where the text between two consecutive noun phrases is exactly a relation phrase ("a red
    circle to the left of a blue square"). What it cannot read lands in `unknown`: words outside the world's
    language, and content words (shapes, colours, sizes, position and relation words, digits) left over outside every
    phrase it read ("a red circle and squares", "at the top left"), so that nothing stated is silently dropped.
    Raises Krea2Error only for input that is not text.
    """
    if not isinstance(text, str):
        raise Krea2Error(f"a caption must be text, got {type(text).__name__}")
    out = ParsedCaption()
    matches = list(NOUN_PHRASE.finditer(text))
    for m in matches:
        num = NUMBERS[m["num"].lower()]
        out.phrases.append(Phrase(shape=m["shape"].lower(), count=num,
                                  color=m["color"].lower() if m["color"] else None,
                                  size=m["size"].lower() if m["size"] else None,
                                  position=_POSITION_PHRASES[m["position"].lower()] if m["position"] else None))
    read = [(m.start(), m.end()) for m in matches]
    for i in range(len(matches) - 1):
        between = " ".join(text[matches[i].end():matches[i + 1].start()].lower().split())
        if between in _RELATION_PHRASES:
            out.relations.append((i, i + 1, _RELATION_PHRASES[between]))
            read.append((matches[i].end(), matches[i + 1].start()))
    for pattern in (BACKGROUND, STYLE, DECLARED_COUNT):
        read += [(m.start(), m.end()) for m in pattern.finditer(text)]
    out.backgrounds = [(a or b).lower() for a, b in BACKGROUND.findall(text)]
    out.styles = [STYLE_WORDS[w.lower()] for w in STYLE.findall(text)]
    declared = DECLARED_COUNT.search(text)
    out.declared_count = NUMBERS[declared[1].lower()] if declared else None
    vocab = known_words()
    out.unknown = [w for w in WORD.findall(text.lower()) if w not in vocab]
    rest = list(text.lower())
    for a, b in read:
        rest[a:b] = " " * (b - a)
    out.unknown += [w for w in re.findall(r"[a-z]+|\d+", "".join(rest)) if w in CONTENT_WORDS or w.isdigit()]
    return out


def prompt_record(prompt: str) -> dict:
    """The requirements a short prompt fixes, as a world prompt record (docs/WORLD.md): objects with the attributes
    named (and counts), relations, background, style. Raises Krea2Error when the prompt names no object of the world,
    has words the grammar cannot place (then nothing can be checked against it) or contradicts itself (two
    backgrounds, two styles)."""
    p = parse(prompt)
    if not p.phrases:
        raise Krea2Error(f"prompt {prompt!r} names no object of the world (a circle, square or triangle)")
    if p.unknown:
        raise Krea2Error(f"prompt {prompt!r} has words the world grammar cannot place: {', '.join(p.unknown)}")
    if len(set(p.backgrounds)) > 1 or len(set(p.styles)) > 1:
        raise Krea2Error(f"prompt {prompt!r} names two backgrounds or two styles; name one")
    objects = []
    for ph in p.phrases:
        o = {"shape": ph.shape}
        o.update({k: v for k, v in (("color", ph.color), ("size", ph.size), ("position", ph.position)) if v})
        if ph.count > 1:
            o["count"] = ph.count
        objects.append(o)
    rec: dict = {"prompt": prompt, "objects": objects}
    if p.relations:
        rec["relations"] = [{"a": i, "b": j, "relation": r} for i, j, r in p.relations]
    if p.background:
        rec["background"] = p.background
    if p.style:
        rec["style"] = p.style
    return rec


def _cell_centre(position: str) -> tuple[float, float]:
    row, col = world.cell_of(position)
    return ((col + 0.5) / 3, (row + 0.5) / 3)


def caption_detection(p: ParsedCaption) -> checker.Detection:
    """What the checker would find in a perfect image of the caption: one object per counted phrase at the centre
    of its cell. An attribute the caption leaves open is None (it matches no requirement); an object with no cell
    is placed by the relations the caption states (left of: x 1/6 vs 5/6; above: y 1/6 vs 5/6), else centred."""
    objects, owner = [], []
    for k, ph in enumerate(p.phrases):
        for _ in range(ph.count):
            centre = _cell_centre(ph.position) if ph.position else (0.5, 0.5)
            objects.append(checker.DetectedObject(ph.shape, ph.color, ph.size, ph.position, centre, 1.0))
            owner.append(k)
    for i, j, rel in p.relations:
        for n, obj in enumerate(objects):
            if obj.position is not None or owner[n] not in (i, j):
                continue
            first = owner[n] == i
            x, y = obj.centroid
            if rel in ("left of", "right of"):
                x = 1 / 6 if first == (rel == "left of") else 5 / 6
            else:
                y = 1 / 6 if first == (rel == "above") else 5 / 6
            obj.centroid = (x, y)
    return checker.Detection(background=p.background, style=p.style, objects=objects)


# ------------------------------------------------------------------------------------------------------ writing
LEVELS = ("raw", "low", "medium", "high")
# What each creativity level decides of what the user left open; the rest stays open for the image model.
DECIDES = {"raw": (), "low": ("background", "style"), "medium": ("background", "style", "color", "size"),
           "high": ("background", "style", "color", "size", "position")}


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise Krea2Error(f"unknown creativity {level!r}; use one of {list(LEVELS)}")
    return level


def open_attributes(record: dict) -> list[str]:
    """The attributes a prompt record leaves open, in a fixed order (an object attribute is open when some object
    does not give it)."""
    out = [a for a in ("color", "size", "position") if any(a not in o for o in record["objects"])]
    return out + [a for a in ("background", "style") if a not in record]


def intent_text(record: dict) -> str:
    """The intent reconstruction before an expansion: 'keep: <what the user fixed> | open: <what is left open>'."""
    kept = [world.noun_phrase(o["shape"], o.get("count", 1), o.get("color"), o.get("size"))
            + (f" {world.POSITION_PHRASES[o['position']][0]}" if "position" in o else "") for o in record["objects"]]
    kept += [f"object {r['a'] + 1} {r['relation']} object {r['b'] + 1}" for r in record.get("relations", [])]
    kept += [f"{record[k]} {k}" for k in ("background", "style") if k in record]
    return f"keep: {', '.join(kept)} | open: {', '.join(open_attributes(record)) or 'nothing'}"


def _object_phrase(o: world.WorldObject, spec: dict, decides: tuple[str, ...]) -> str:
    named = {a: getattr(o, a) for a in ("color", "size", "position") if a in spec or a in decides}
    text = world.noun_phrase(o.shape, 1, named.get("color"), named.get("size"))
    return text + (f" {world.POSITION_PHRASES[named['position']][0]}" if "position" in named else "")


def expansion_text(scene: world.Scene, record: dict, level: str, rng: np.random.Generator) -> str:
    """A caption of `scene` (which satisfies `record`) that states what the user fixed plus what `level` decides.

    high: a long caption of the cascade (every attribute of every object, background, style); low/medium: the
    objects with what the user named (medium adds colour and size), the background and the style, in the medium
    templates; a relation the user stated is kept as a phrase where positions are not written. The scene's objects
    must be in the record's order, counted objects consecutive (as world.sample_scene_for_tag makes them).
    """
    check_level(level)
    if level == "raw":
        return record["prompt"]
    if level == "high":
        return world.captions(scene, rng)["long"]
    decides = DECIDES[level]
    specs = [o for o in record["objects"] for _ in range(o.get("count", 1))]
    if len(specs) != len(scene.objects):
        raise Krea2Error(f"scene has {len(scene.objects)} objects but the record asks for {len(specs)}")
    if level == "low" and not record.get("relations") and all(len(o) == 1 + ("count" in o) for o in record["objects"]):
        objs = world._join([world.noun_phrase(o["shape"], o.get("count", 1)) for o in record["objects"]])
    else:
        phrases = [_object_phrase(o, s, decides) for o, s in zip(scene.objects, specs)]
        rel = record.get("relations", [])
        if len(phrases) == 2 and rel and "position" not in decides and not all("position" in s for s in specs):
            objs = f"{phrases[0]} {world.relation_phrase(rel[0]['relation'])} {phrases[1]}"
        else:
            objs = world._join(phrases)
    style_in, style_with, style_adj = world.STYLE_PHRASES[scene.style]
    bg = scene.background
    return world._pick(rng, (f"{objs} on a {bg} background, {style_in}", f"{objs} {style_with} on a {bg} background",
                             f"{style_adj} shapes on a {bg} background: {objs}"))


def scene_detection(scene: world.Scene) -> checker.Detection:
    """What the checker finds in a perfect render of a scene: every object at the centre of its cell."""
    return checker.Detection(background=scene.background, style=scene.style, objects=[
        checker.DetectedObject(o.shape, o.color, o.size, o.position, _cell_centre(o.position), 1.0)
        for o in scene.objects])


def complete_scene(record: dict, rng: np.random.Generator, tries: int = 2000) -> world.Scene:
    """A scene that satisfies a prompt record, each open attribute drawn uniformly (no house style); objects in the
    record's slot order (counted objects consecutive). Raises Krea2Error when no scene of the world can satisfy it
    (more than 4 objects, two objects asked for one cell, relations that contradict)."""
    slots = [o for o in record["objects"] for _ in range(o.get("count", 1))]
    if not 1 <= len(slots) <= 4:
        raise Krea2Error(f"a world scene holds 1 to 4 objects; the prompt asks for {len(slots)}")
    def pick(spec: dict, key: str, values) -> str:
        return spec.get(key) or values[int(rng.integers(len(values)))]

    for _ in range(tries):
        scene = world.Scene(
            background=pick(record, "background", tuple(world.BACKGROUNDS)), style=pick(record, "style", world.STYLES),
            objects=[world.WorldObject(s["shape"], pick(s, "color", tuple(world.COLORS)), pick(s, "size", world.SIZES),
                                       pick(s, "position", world.POSITIONS)) for s in slots])
        try:
            world.validate_scene(scene)
        except Krea2Error:
            continue
        if checker.matches(scene_detection(scene), record):
            return scene
    raise Krea2Error(f"no world scene satisfies prompt {record.get('prompt', record)!r}; it asks for more than the "
                     "3x3 grid holds or for relations that contradict")
