"""Rewards from the exact world checker (krea2.eval.checker, docs/WORLD.md): what `krea2 eval world` counts, per image.

A record is a world prompt record (docs/WORLD.md: `objects` with `shape` and optionally `color`, `size`,
`position`, `count`; optional `relations`, `background`, `style`), as in the eval prompt files. A scene record
(`world_examples(...)` meta["scene"]: background, style, every object's four attributes) is one too: the prompt that
asks for exactly that scene.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from krea2.errors import Krea2Error
from krea2.eval import checker


def to_canvases(images: Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] -> B arrays (H, W, 3) uint8, rounded as krea2.pipeline.to_pil rounds generated images."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise Krea2Error(f"a world reward needs images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    from krea2.pipeline import to_uint8

    return list(to_uint8(images))


def _check_batch(images: Tensor, records: Sequence[dict]) -> list[np.ndarray]:
    canvases = to_canvases(images)
    if len(records) != len(canvases):
        raise Krea2Error(f"a world reward needs one record per image, got {len(records)} records for "
                         f"{len(canvases)} images")
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("objects"), list) or not rec["objects"]:
            raise Krea2Error("a world reward record needs a non-empty 'objects' list (a prompt or scene record, "
                             "docs/WORLD.md)")
    return canvases


def _has(obj: checker.DetectedObject, spec: dict) -> bool:
    """The attribute test of checker.matches: every given field but count equals what was detected."""
    return all(getattr(obj, key) == value for key, value in spec.items() if key != "count")


def _relation_results(det: checker.Detection, record: dict, slots: list[int], assigned: list[int | None]) -> list[bool]:
    """Per relation: holds between every object given to a and every object given to b (checker.matches' rule)."""
    out = []
    for r in record.get("relations", []):
        owners_a = [assigned[s] for s, i in enumerate(slots) if i == r["a"]]
        owners_b = [assigned[s] for s, i in enumerate(slots) if i == r["b"]]
        out.append(None not in owners_a + owners_b and all(
            checker.relation_holds(r["relation"], det.objects[a].centroid, det.objects[b].centroid)
            for a in owners_a for b in owners_b))
    return out


def _best_assignment(det: checker.Detection, record: dict, slots: list[int]) -> tuple[list[int | None], list[bool]]:
    """Detected object (or None) per slot, no object used twice, meeting the most object and relation requirements.

    Depth-first with a bound; slots hold at most 4 objects and candidates are only objects with the asked attributes.
    """
    specs = record["objects"]
    candidates = [[j for j, o in enumerate(det.objects) if _has(o, specs[i])] for i in slots]
    n_rel = len(record.get("relations", []))
    best: dict = {"score": -1, "assigned": [None] * len(slots), "relations": [False] * n_rel}
    attainable = min(len(slots), len({j for c in candidates for j in c})) + n_rel

    def visit(s: int, assigned: list[int | None], n_assigned: int) -> None:
        if best["score"] == attainable or n_assigned + len(slots) - s + n_rel <= best["score"]:
            return
        if s == len(slots):
            relations = _relation_results(det, record, slots, assigned)
            if n_assigned + sum(relations) > best["score"]:
                best.update(score=n_assigned + sum(relations), assigned=list(assigned), relations=relations)
            return
        for j in candidates[s]:
            if j not in assigned:
                visit(s + 1, assigned + [j], n_assigned + 1)
        visit(s + 1, assigned + [None], n_assigned)

    visit(0, [], 0)
    return best["assigned"], best["relations"]


def requirement_results(det: checker.Detection, record: dict) -> dict[str, bool]:
    """Which of a record's requirements a detection meets; all of them hold exactly when checker.matches is True.

    The requirements are the clauses of WORLD.md's correctness rule, each checked as checker.matches checks it:
    "background" and "style" (where the record gives them); "object count" (the image holds exactly as many objects
    as the record lists, counts included: no other object); one "object i" per listed object (repeated as
    "object i#k" for count > 1): a distinct detected object with every attribute it asks for; one "relation r" per
    relation: it holds between the objects given to a and to b. Objects are given to requirements by the assignment
    that meets the most object and relation requirements (the image is read as favourably as the checker allows).
    """
    slots = [i for i, o in enumerate(record["objects"]) for _ in range(o.get("count", 1))]
    assigned, relations = _best_assignment(det, record, slots)
    results = {}
    if "background" in record:
        results["background"] = det.background == record["background"]
    if "style" in record:
        results["style"] = det.style == record["style"]
    results["object count"] = len(det.objects) == len(slots)
    for s, i in enumerate(slots):
        k = slots[:s].count(i)
        results[f"object {i}" + (f"#{k + 1}" if record["objects"][i].get("count", 1) > 1 else "")] = \
            assigned[s] is not None
    results.update({f"relation {r}": ok for r, ok in enumerate(relations)})
    return results


def world_rubric(images: Tensor, records: Sequence[dict]) -> Tensor:
    """Fraction of each record's requirements (see requirement_results) that the checker finds met in its image.

    images: (B, 3, H, W) in [-1, 1] at a side the checker reads (16, 32, 48, 64 px or a multiple); records: B prompt
    or scene records. Returns (B,) float32 in [0, 1], on images' device; 1 exactly where world_strict is 1.
    """
    canvases = _check_batch(images, records)
    scores = []
    for img, rec in zip(canvases, records):
        met = requirement_results(checker.detect(img), rec)
        scores.append(sum(met.values()) / len(met))
    return torch.tensor(scores, dtype=torch.float32, device=images.device)


def world_strict(images: Tensor, records: Sequence[dict]) -> Tensor:
    """1.0 where the checker passes image i for record i (checker.matches: what `krea2 eval world` counts), else 0.0.

    images: (B, 3, H, W) in [-1, 1]; records: B prompt or scene records. Returns (B,) float32 on images' device.
    """
    canvases = _check_batch(images, records)
    passed = [float(checker.matches(checker.detect(img), rec)) for img, rec in zip(canvases, records)]
    return torch.tensor(passed, dtype=torch.float32, device=images.device)


def world_artifacts(images: Tensor, records: Sequence[dict]) -> Tensor:
    """1 for a clean image; lower for stray fragments and broken shapes, whatever the prompt asked.

    score = 1 / (1 + extra + broken), where extra is the number of detected objects beyond those the record asks for
    (fragments the checker takes for objects) and broken the number of detected objects no shape template fits.
    Pixel speckle is not scored separately: the grainy style is speckle by design, and speckle dense enough to matter
    forms fragments. images (B, 3, H, W) in [-1, 1]; returns (B,) float32 in (0, 1] on images' device; ground-truth
    renders score 1.
    """
    canvases = _check_batch(images, records)
    scores = []
    for img, rec in zip(canvases, records):
        det = checker.detect(img)
        wanted = sum(o.get("count", 1) for o in rec["objects"])
        extra = max(0, len(det.objects) - wanted)
        broken = sum(o.shape == "unknown" for o in det.objects)
        scores.append(1.0 / (1 + extra + broken))
    return torch.tensor(scores, dtype=torch.float32, device=images.device)
