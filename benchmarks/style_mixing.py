"""Two-reference mixing sweep of a style adapter: prompt i gets references of styles A = STYLES[i mod 5] at weight w
and B = STYLES[(i + 2) mod 5] at weight 1 - w (strength 1), and the exact checker reads each image's style; the
share of images in style A should rise with w (issue 14's mixing target). References are rendered here from random
world scenes, as `krea2 eval style` does.

    python benchmarks/style_mixing.py --style-encoder world [--checkpoint world] [--prompts world_eval_small]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from krea2.data import world
    from krea2.eval import checker
    from krea2.eval.style_eval import references
    from krea2.eval.world_eval import prompts_path
    from krea2.pipeline import load_pipeline, to_pil
    from krea2.style import check_style_encoder, load_style_encoder, mix_references

    ap = argparse.ArgumentParser()
    ap.add_argument("--style-encoder", default="world")
    ap.add_argument("--checkpoint", default="world")
    ap.add_argument("--prompts", default="world_eval_small")
    ap.add_argument("--weights", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--images-per-prompt", type=int, default=2)
    args = ap.parse_args()
    records = checker.load_prompts(prompts_path(args.prompts))
    encoder = load_style_encoder(args.style_encoder)
    pipe = load_pipeline(args.checkpoint)
    check_style_encoder(encoder, pipe.model)
    n, styles = args.images_per_prompt, world.STYLES
    print("| w (style A) | share in A | share in B | images |")
    print("|---|---|---|---|")
    for w in (float(x) for x in args.weights.split(",")):
        in_a = in_b = total = 0
        for i, rec in enumerate(records):
            a, b = styles[i % len(styles)], styles[(i + 2) % len(styles)]
            refs = [{"style": a, "weight": w}, {"style": b, "weight": 1 - w}]
            pixels, weights, _ = references({**rec, "refs": refs}, i, pipe.resolution, 0)
            with torch.no_grad():
                tokens = encoder(pixels)
            mix = mix_references([t[None] for t in tokens], weights, 1.0, **encoder.injection_kwargs)
            for im in to_pil(pipe.generate([rec["prompt"]] * n, seed=i * n, style=mix)):
                style = checker.detect(im).style
                in_a, in_b, total = in_a + (style == a), in_b + (style == b), total + 1
        print(f"| {w:.2f} | {in_a / total:.3f} | {in_b / total:.3f} | {total} |", flush=True)


if __name__ == "__main__":
    main()
