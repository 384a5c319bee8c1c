"""Style-reference evaluation on the world: style accuracy, content and content leakage, read by the exact checker.

Each prompt record may carry `refs: [{"style": S, "weight": w}, ...]` and `strength`; a record without refs gets
one reference of style STYLES[i mod 5] at weight 1 (the public prompts as they are). Every reference is rendered
here from a random scene in its style, so its objects are known. For each image:
- style: the checker's style equals the style of the heaviest positive reference;
- content: the checker on the prompt's requirements without its style and background (those are the reference's
  job now);
- leakage: the image holds an object with a reference object's shape and colour that the prompt did not ask for.
The same prompts and seeds without a reference give the base rates; the report's leakage is the rise over them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from krea2.data import world
from krea2.errors import Krea2Error
from krea2.eval import checker
from krea2.train.data import to_pixels


def references(record: dict, index: int, size: int, seed: int) -> tuple[torch.Tensor, list[float], list[dict]]:
    """The record's references rendered: images (n, 3, size, size) in [-1, 1], weights, and each scene record."""
    refs = record.get("refs") or [{"style": world.STYLES[index % len(world.STYLES)], "weight": 1.0}]
    images, weights, scenes = [], [], []
    for j, ref in enumerate(refs):
        if ref.get("style") not in world.STYLES or not isinstance(ref.get("weight", 1.0), (int, float)):
            raise Krea2Error(f"prompt {index + 1}: a reference needs a style of {list(world.STYLES)} and a numeric "
                             f"weight, got {ref}")
        rng = np.random.default_rng([seed, index, j])
        scene = world.sample_scene(rng, styles=[ref["style"]])
        images.append(world.render(scene, size, int(rng.integers(2**31))))
        weights.append(float(ref.get("weight", 1.0)))
        scenes.append(world.scene_to_record(scene))
    return to_pixels(torch.from_numpy(np.stack(images))), weights, scenes


def leaks(det: checker.Detection, record: dict, ref_scenes: Sequence[dict]) -> bool:
    """An object of the image has a reference object's shape and colour and the prompt asked for no such object."""
    ref_pairs = {(o["shape"], o["color"]) for s in ref_scenes for o in s["objects"]}
    asked = record.get("objects", [])
    for o in det.objects:
        if (o.shape, o.color) not in ref_pairs:
            continue
        if not any(a.get("shape") == o.shape and a.get("color") in (None, o.color) for a in asked):
            return True
    return False


def content_record(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("style", "background", "refs", "strength")}


def evaluate_style(pipe, encoder, records: Sequence[dict], strength: float = 1.0, images_per_prompt: int = 2,
                   seed: int = 0) -> tuple[dict, list]:
    """Generate each prompt with and without its references; returns (report, styled PIL images).

    report: style accuracy, content score, leakage (and the base rates without references), per tag, and style
    accuracy per reference style."""
    from krea2.pipeline import to_pil
    from krea2.style import mix_references

    if images_per_prompt < 1:
        raise Krea2Error("--images-per-prompt must be at least 1")
    size = pipe.resolution
    rows, styled_images = [], []
    for i, rec in enumerate(records):
        pixels, weights, scenes = references(rec, i, size, seed)
        with torch.no_grad():
            tokens = encoder(pixels.to(pipe.device))
        s = float(rec.get("strength", strength))
        mix = mix_references([t[None] for t in tokens], weights, s, **encoder.injection_kwargs)
        prompts = [rec["prompt"]] * images_per_prompt
        styled = to_pil(pipe.generate(prompts, seed=seed + i * images_per_prompt, style=mix))
        base = to_pil(pipe.generate(prompts, seed=seed + i * images_per_prompt))
        target = scenes[int(np.argmax(weights))]["style"]
        for im_s, im_b in zip(styled, base):
            ds, db = checker.detect(im_s), checker.detect(im_b)
            rows.append({"tag": rec["tag"], "ref_style": target, "style": ds.style == target,
                         "drawn": bool(ds.objects), "base_style": db.style == target,
                         "content": checker.matches(ds, content_record(rec)),
                         "base_content": checker.matches(db, content_record(rec)),
                         "leak": leaks(ds, rec, scenes), "base_leak": leaks(db, rec, scenes)})
        styled_images += styled

    def mean(key):
        return float(np.mean([r[key] for r in rows]))

    tags = sorted({r["tag"] for r in rows}, key=world.TAGS.index)
    report = {"style": mean("style"), "content": mean("content"), "leakage": mean("leak") - mean("base_leak"),
              "base": {"style": mean("base_style"), "content": mean("base_content"), "leak": mean("base_leak")},
              "leak_rate": mean("leak"), "strength": strength, "n_images": len(rows),
              "per_tag": {t: {"style": float(np.mean([r["style"] for r in rows if r["tag"] == t])),
                              "content": float(np.mean([r["content"] for r in rows if r["tag"] == t]))}
                          for t in tags},
              # among images with at least one object: an empty canvas has no style to judge, so this separates the
              # adapter's transfer from the base model's empty canvases
              "style_when_drawn": float(np.mean([r["style"] for r in rows if r["drawn"]] or [0.0])),
              "drawn": mean("drawn"),
              # style accuracy by the reference's style: which styles the adapter carries over, which it cannot
              "per_style": {st: float(np.mean([r["style"] for r in rows if r["ref_style"] == st]))
                            for st in world.STYLES if any(r["ref_style"] == st for r in rows)}}
    return report, styled_images


def format_style_summary(report: dict) -> list[str]:
    b = report["base"]
    return [f"{'style':10s} {report['style']:.3f}  (without a reference: {b['style']:.3f})",
            f"{'content':10s} {report['content']:.3f}  (without: {b['content']:.3f})",
            f"{'leak rate':10s} {report['leak_rate']:.3f}  (without: {b['leak']:.3f})",
            f"{'drawn':10s} {report.get('drawn', 0):.3f}  (style where something is drawn: "
            f"{report.get('style_when_drawn', 0):.3f})",
            f"{'by style':10s} " + "  ".join(f"{k} {v:.2f}" for k, v in report.get("per_style", {}).items()),
            f"style {report['style']:.4f} content {report['content']:.4f} leakage {report['leakage']:.4f}"]
