"""The exact world checker (docs/WORLD.md): reads background, style and objects back from pixels alone.

Analysis by synthesis, cell by cell: foreground is every saturated pixel (backgrounds are achromatic), its colour
is the hue of its mean (shading and grain keep hue), and shape, size and fill kind are the rendered template
(krea2.data.world.object_mask) that overlaps it best. On the world's own renders every template matches with
IoU 1, so the checker is exact there; IoU and residual thresholds leave room for slightly noisy or blurred images.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from krea2.data import world
from krea2.errors import Krea2Error

FG_SATURATION = 48  # max - min channel above this is an object pixel; fills keep >= 77 even at their darkest
GROUP_SHARE = 0.25  # a second colour in a cell is a second object only above this share of the cell's pixels
MIN_FIT = 0.5  # IoU below this: the blob is no known shape
SOLID_STYLE_RMS = 12.0  # residual (0-255 scale) under which a fill is flat or gradient rather than grainy
RELATION_MARGIN = 1 / 12  # centroids must differ by a quarter cell (fraction of the canvas) for a relation to hold
KINDS = ("solid", "outline", "striped")


@dataclass
class DetectedObject:
    shape: str  # "unknown" when no template fits
    color: str
    size: str
    position: str
    centroid: tuple[float, float]  # (x, y) as fractions of the canvas side
    fit: float  # IoU with the best template


@dataclass
class Detection:
    background: str
    style: str | None  # None when the image holds no object
    objects: list[DetectedObject]


# ----------------------------------------------------------------------------------------------------- pixels
def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h * 60.0


COLOR_NAMES = tuple(world.COLORS)
PALETTE_HUES = hue_degrees(np.array(list(world.COLORS.values()), np.float64))


def hue_class(rgb: np.ndarray) -> np.ndarray:
    """Index into COLOR_NAMES of the nearest palette hue (circular distance)."""
    d = np.abs(hue_degrees(rgb)[..., None] - PALETTE_HUES)
    return np.minimum(d, 360 - d).argmin(-1)


def as_canvas(image) -> np.ndarray:
    """(S, S, 3) uint8 at a supported side; larger multiples (e.g. 128 for 64) are box-downsampled."""
    a = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] != a.shape[1]:
        raise Krea2Error(f"checker needs a square RGB image (S, S, 3), got shape {a.shape}")
    s = a.shape[0]
    if s in world.GEOMETRIES:
        return a.astype(np.uint8)
    for t in sorted(world.GEOMETRIES, reverse=True):
        if s % t == 0:
            k = s // t
            return np.rint(a.reshape(t, k, t, k, 3).astype(np.float64).mean((1, 3))).astype(np.uint8)
    raise Krea2Error(f"checker cannot read a {s} px image; generate at one of {list(world.SUPPORTED_SIZES)} "
                     "(or a multiple of one)")


# ----------------------------------------------------------------------------------------------------- templates
@functools.cache
def templates(size: int) -> list[tuple[str, str, str, np.ndarray]]:
    """(kind, shape, size name, mask) for every object the renderer can paint at this canvas side."""
    g = world.geometry(size)
    return [(kind, shape, sz, world.object_mask(shape, g.side(sz), kind, g.stroke, g.stripe))
            for kind in KINDS for shape in world.SHAPES for sz in world.SIZES]


@functools.cache
def min_object_pixels(size: int) -> int:
    return max(2, min(int(t[3].sum()) for t in templates(size)) // 2)


def _iou(mask: np.ndarray, count: int, t: np.ndarray, top: int, left: int) -> float:
    h, w = mask.shape
    n = t.shape[0]
    t0, l0, t1, l1 = max(top, 0), max(left, 0), min(top + n, h), min(left + n, w)
    inter = 0 if t0 >= t1 or l0 >= l1 else int((mask[t0:t1, l0:l1] & t[t0 - top:t1 - top, l0 - left:l1 - left]).sum())
    return inter / (count + int(t.sum()) - inter)


OFFSETS = [(0, 0)] + [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def fit_templates(mask: np.ndarray, size: int) -> dict[str, tuple[float, str, str, int, int]]:
    """Per fill kind the best (iou, shape, size name, top, left) for a blob mask, placed on its bounding-box centre."""
    rows, cols = np.nonzero(mask)
    cy, cx = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    count = len(rows)
    best: dict[str, tuple[float, str, str, int, int]] = {}
    for exact_only in (True, False):  # renders match at offset 0; search nearby only when something does not
        for kind, shape, sz, t in templates(size):
            n = t.shape[0]
            top0, left0 = int(round(cy - (n - 1) / 2)), int(round(cx - (n - 1) / 2))
            for dy, dx in OFFSETS[:1] if exact_only else OFFSETS[1:]:
                iou = _iou(mask, count, t, top0 + dy, left0 + dx)
                if iou > best.get(kind, (-1.0,))[0]:
                    best[kind] = (iou, shape, sz, top0 + dy, left0 + dx)
        if max(b[0] for b in best.values()) == 1.0:
            break
    return best


# ----------------------------------------------------------------------------------------------------- detection
@dataclass
class _Blob:
    mask: np.ndarray  # inside its cell window
    y0: int  # window origin in the canvas
    x0: int
    position: str
    rgb: np.ndarray  # the window's pixels, float
    canvas: int


def _is_spill(fg: np.ndarray, cell: np.ndarray, ys: slice, xs: slice) -> bool:
    """A sliver at most 2 px thick against a cell border, touching foreground across it: part of the neighbour.

    Renders never have one (objects stay inside their cells and the only footprint thinner than 3 px, a small striped
    circle, keeps a margin); a sampled object a pixel off its cell would otherwise count as an extra object.
    """
    rows, cols = np.nonzero(cell)
    rows, cols = rows + ys.start, cols + xs.start  # canvas coordinates
    s = fg.shape[0]
    if cols.max() - cols.min() < 2:
        for across in (xs.start - 1, xs.stop):  # the column just outside each side of the cell
            if 0 <= across < s and np.abs(cols - across).min() == 1 and fg[rows, across].any():
                return True
    if rows.max() - rows.min() < 2:
        for across in (ys.start - 1, ys.stop):
            if 0 <= across < s and np.abs(rows - across).min() == 1 and fg[across, cols].any():
                return True
    return False


def _blobs(img: np.ndarray, fg: np.ndarray, classes: np.ndarray) -> list[_Blob]:
    s = img.shape[0]
    b = world.cell_bounds(s)
    min_px = min_object_pixels(s)
    blobs = []
    for k, position in enumerate(world.POSITIONS):
        r, c = divmod(k, 3)
        win = (slice(b[r], b[r + 1]), slice(b[c], b[c + 1]))
        cell_fg = fg[win]
        total = int(cell_fg.sum())
        if total < min_px or _is_spill(fg, cell_fg, *win):
            continue
        counts = np.bincount(classes[win][cell_fg], minlength=len(COLOR_NAMES))
        groups = [i for i in np.argsort(-counts) if counts[i] >= max(min_px, GROUP_SHARE * total)] or [counts.argmax()]
        if len(groups) == 1:  # stray hues (grain, edges) belong to the one object
            masks = [cell_fg]
        else:
            masks = [cell_fg & (classes[win] == i) for i in groups]
        rgb = img[win].astype(np.float64)
        blobs += [_Blob(m, b[r], b[c], position, rgb, s) for m in masks]
    return blobs


def _solid_style(blobs: list[_Blob], fits: list[tuple]) -> str:
    """flat, gradient or grainy from how well a constant or the renderer's gradient explains the fill."""
    sse_flat = sse_grad = count = 0.0
    for blob, (_, _, sz, top, left) in zip(blobs, fits):
        ys, xs = np.nonzero(blob.mask)
        p = np.pad(blob.mask, 1)
        inner = blob.mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        if inner.sum() >= 6:  # interior pixels only: blurred edges are neither flat nor gradient
            ys, xs = np.nonzero(inner)
        x = blob.rgb[ys, xs]
        n = world.geometry(blob.canvas).side(sz)
        f = world.gradient_factor(n)[np.clip(ys - top, 0, n - 1), np.clip(xs - left, 0, n - 1)][:, None]
        base = (f * x).sum(0) / (f * f).sum()
        sse_flat += ((x - x.mean(0)) ** 2).sum()
        sse_grad += ((x - f * base) ** 2).sum()
        count += x.size
    rms_flat, rms_grad = np.sqrt(sse_flat / count), np.sqrt(sse_grad / count)
    if min(rms_flat, rms_grad) >= SOLID_STYLE_RMS:
        return "grainy"
    return "flat" if rms_flat <= rms_grad else "gradient"


def detect(image) -> Detection:
    """Background, style and every object of a world image, from its pixels only."""
    img = as_canvas(image)
    s = img.shape[0]
    x = img.astype(np.float64)
    fg = x.max(-1) - x.min(-1) >= FG_SATURATION
    bg_luma = float(np.median(x[~fg].mean(-1))) if (~fg).any() else 128.0
    background = min(world.BACKGROUNDS, key=lambda name: abs(world.BACKGROUNDS[name][0] - bg_luma))
    blobs = _blobs(img, fg, hue_class(x))
    if not blobs:
        return Detection(background, None, [])
    all_fits = [fit_templates(blob.mask, s) for blob in blobs]
    kind = max(KINDS, key=lambda k: sum(f[k][0] for f in all_fits))  # one style for the whole image
    fits = [f[kind] for f in all_fits]
    style = kind if kind != "solid" else _solid_style(blobs, fits)
    objects = []
    for blob, (iou, shape, sz, _, _) in zip(blobs, fits):
        ys, xs = np.nonzero(blob.mask)
        mean_rgb = blob.rgb[ys, xs].mean(0)
        color = COLOR_NAMES[int(hue_class(mean_rgb))]
        centroid = ((xs.mean() + blob.x0 + 0.5) / s, (ys.mean() + blob.y0 + 0.5) / s)
        objects.append(DetectedObject(shape if iou >= MIN_FIT else "unknown", color, sz, blob.position,
                                      (float(centroid[0]), float(centroid[1])), float(iou)))
    return Detection(background, style, objects)


# ----------------------------------------------------------------------------------------------------- prompts
OBJECT_FIELDS = {"shape": world.SHAPES, "color": tuple(world.COLORS), "size": world.SIZES, "position": world.POSITIONS}


def validate_prompt_record(d, where: str = "") -> dict:
    """Check one WORLD.md prompt record; raise Krea2Error naming the problem, else return it."""
    def bad(msg: str):
        raise Krea2Error(f"{msg}{where}; see the prompt format in docs/WORLD.md")

    if not isinstance(d, dict):
        bad("prompt record is not a JSON object")
    if not isinstance(d.get("prompt"), str):
        bad("prompt record lacks a string 'prompt'")
    if d.get("tag") not in world.TAGS:
        bad(f"unknown tag {d.get('tag')!r} (use one of {list(world.TAGS)})")
    objects = d.get("objects")
    if not isinstance(objects, list) or not objects:
        bad("prompt record needs a non-empty 'objects' list")
    for o in objects:
        if not isinstance(o, dict) or "shape" not in o:
            bad("every object needs a 'shape'")
        for key, value in o.items():
            if key == "count":
                if not isinstance(value, int) or not 1 <= value <= 4:
                    bad(f"object count must be an integer 1-4, got {value!r}")
            elif key not in OBJECT_FIELDS:
                bad(f"unknown object field {key!r}")
            elif value not in OBJECT_FIELDS[key]:
                bad(f"unknown {key} {value!r} (use one of {list(OBJECT_FIELDS[key])})")
    if sum(o.get("count", 1) for o in objects) > 4:
        bad("a world image holds at most 4 objects; the counts add up to more")
    for rel in d.get("relations", []):
        if not isinstance(rel, dict) or rel.get("relation") not in world.RELATIONS:
            bad(f"unknown relation {rel!r} (use one of {list(world.RELATIONS)})")
        if not all(isinstance(rel.get(k), int) and 0 <= rel[k] < len(objects) for k in ("a", "b")):
            bad(f"relation {rel} must index the objects list with integer 'a' and 'b'")
    if "background" in d and d["background"] not in world.BACKGROUNDS:
        bad(f"unknown background {d['background']!r} (use one of {list(world.BACKGROUNDS)})")
    if "style" in d and d["style"] not in world.STYLES:
        bad(f"unknown style {d['style']!r} (use one of {list(world.STYLES)})")
    return d


def load_prompts(path: str | Path) -> list[dict]:
    """Read a JSONL prompt file; blank lines are skipped, anything malformed is an error naming file and line."""
    from krea2.errors import read_text

    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise Krea2Error(f"prompt file {path} not found; pass a JSON Lines file of world prompts")
    records = []
    for i, line in enumerate(read_text(path, "prompt file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise Krea2Error(f"malformed JSON in {path} line {i}: {e.msg}; write one JSON object per line") from None
        records.append(validate_prompt_record(d, f" in {path} line {i}"))
    if not records:
        raise Krea2Error(f"prompt file {path} holds no prompts")
    return records


# ----------------------------------------------------------------------------------------------------- checking
def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation] > RELATION_MARGIN


def matches(det: Detection, record: dict) -> bool:
    """WORLD.md's rule: exactly the listed objects (with counts), their attributes, relations, background, style."""
    if "background" in record and det.background != record["background"]:
        return False
    if "style" in record and det.style != record["style"]:
        return False
    slots = [i for i, o in enumerate(record["objects"]) for _ in range(o.get("count", 1))]
    if len(slots) != len(det.objects):
        return False
    specs = record["objects"]
    for perm in itertools.permutations(det.objects):
        if not all(all(getattr(obj, key) == value for key, value in specs[i].items() if key != "count")
                   for i, obj in zip(slots, perm)):
            continue
        owners = {}
        for i, obj in zip(slots, perm):
            owners.setdefault(i, []).append(obj)
        if all(relation_holds(r["relation"], oa.centroid, ob.centroid)
               for r in record.get("relations", []) for oa in owners[r["a"]] for ob in owners[r["b"]]):
            return True
    return False


FAILURES = ("background", "no object", "style", "missing object", "extra object", "shape", "color", "size",
            "position", "relation")  # `failure`'s answers, in the order it tests them


def failure(det: Detection, record: dict) -> str | None:
    """Why `matches` rejects the image: the first of FAILURES that fails, None when it matches. Objects are judged
    count first (no object, fewer, more than asked), then by the assignment of detected to asked objects that gets
    the most attributes right: its first wrong attribute in the order shape, color, size, position; "relation" when
    every attribute fits but no assignment satisfies the relations. A failure breakdown of an evaluation reads the
    images this way (what the model gets wrong, not only how often)."""
    if "background" in record and det.background != record["background"]:
        return "background"
    if not det.objects:  # before style: an image without objects has no style either
        return "no object"
    if "style" in record and det.style != record["style"]:
        return "style"
    slots = [i for i, o in enumerate(record["objects"]) for _ in range(o.get("count", 1))]
    if len(det.objects) != len(slots):
        return "missing object" if len(det.objects) < len(slots) else "extra object"
    if matches(det, record):
        return None
    keys = ("shape", "color", "size", "position")
    best, wrong = -1, "relation"
    for perm in itertools.permutations(det.objects):
        pairs = [(record["objects"][i], obj) for i, obj in zip(slots, perm)]
        right = sum(getattr(obj, k) == spec[k] for spec, obj in pairs for k in keys if k in spec)
        if right > best:
            bad = [k for k in keys for spec, obj in pairs if k in spec and getattr(obj, k) != spec[k]]
            best, wrong = right, bad[0] if bad else "relation"
    return wrong


def check(image, prompt_record: dict) -> bool:
    return matches(detect(image), prompt_record)


def score_results(records: Sequence[dict], correct: Sequence[bool]) -> dict:
    """Per-tag accuracy and their mean (GenEval's overall score)."""
    per_tag: dict[str, list[bool]] = {}
    for rec, ok in zip(records, correct, strict=True):
        per_tag.setdefault(rec["tag"], []).append(bool(ok))
    acc = {tag: float(np.mean(v)) for tag, v in sorted(per_tag.items(), key=lambda kv: world.TAGS.index(kv[0]))}
    return {"per_tag": acc, "overall": float(np.mean(list(acc.values()))) if acc else 0.0,
            "counts": {tag: len(v) for tag, v in per_tag.items()}}


def score(records: Sequence[dict], images: Sequence) -> dict:
    """Check image i against record i (repeat a record for several images of one prompt)."""
    return score_results(records, [check(img, rec) for rec, img in zip(records, images, strict=True)])
