"""Output error of weight-only fp8 / int8 quantisation against the float32 model (krea2.models.quantize).

Two models: the shipped world model (`load_pipeline("world")`, trained weights), and a randomly initialised model
with the 12B's layer structure at small widths (28 blocks, 2 + 2 text-fusion blocks, 12 text taps, GQA 4:1,
SwiGLU x4, 16 latent channels, patch 2; 384 wide with head dim 16). Each variant is the float32 model with its
weights changed (bf16 cast, or quantised) and, unless it says otherwise, float32 activations, so the column shows
the weights' error alone. Reported: relative L2 ||y - y_fp32|| / ||y_fp32|| of
- velocity: one forward on noised inputs at t in {0.1, 0.3, 0.5, 0.7, 0.9} (world: real prompts; 12B-shaped: random
  text states),
- images / latents: the sampler's output from the same noise (world: the pipeline's decoded images in [-1, 1] with
  the checkpoint's preset; 12B-shaped: 8 Euler steps without guidance),
- velocity / share: the velocity error over the share of the velocity the transformer blocks make (the relative
  L2 change when they are skipped): random-init blocks contribute little, which dilutes their error in the output,
- world only: the checker's score on the prompts (mean over tags of the fraction of images exactly right), and
  flips: images whose verdict differs from the float32 model's (same seeds).

    OMP_NUM_THREADS=1 python benchmarks/quantize_error.py [--prompts 54] [--skip-12b]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from krea2.models.dit import DiT, DiTConfig
from krea2.models.quantize import quantize_dit
from krea2.sampling import Conditioning, euler_sample, joint_inputs, patchify

SHAPED_12B = DiTConfig(features=384, tdim=256, txtdim=160, heads=24, kvheads=6, multiplier=4, layers=28, patch=2,
                       channels=16, txtlayers=12, txtheads=10, txtkvheads=10, txtblocks=2)
TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def variants(model: DiT) -> dict[str, DiT]:
    """name -> a copy of the float32 model with changed weights (and, for the last, bf16 activations)."""
    out = {"bf16 weights": copy.deepcopy(model).to(torch.bfloat16).float()}
    for name, fmt, per_row in (("fp8 per tensor", "fp8", False), ("fp8 per row", "fp8", True),
                               ("int8 per row", "int8", True)):
        out[name] = quantize_dit(copy.deepcopy(model), fmt, per_row)
    # the usual GPU setting: everything in bf16, block weights in fp8
    out["fp8 per row, bf16 model"] = quantize_dit(copy.deepcopy(model).to(torch.bfloat16), "fp8", True)
    return out


class SkipBlock(torch.nn.Module):
    """A transformer block that does nothing (returns its input's tokens from `start`)."""

    def forward(self, h, tv, rot, mask, start=0):
        return h[:, start:]


def blocks_share(model: DiT, img: torch.Tensor, cond: Conditioning, ref_v: torch.Tensor) -> float:
    """||v - v without the transformer blocks|| / ||v||: how much of the velocity the (quantised) blocks make.

    A randomly initialised DiT's blocks contribute little (small gates), which dilutes their quantisation error in
    the output; dividing by this share gives the error relative to what the blocks contribute."""
    skipped = copy.deepcopy(model)
    skipped.blocks = torch.nn.ModuleList([SkipBlock() for _ in skipped.blocks])
    return rel(velocities(skipped, img, cond), ref_v)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def velocities(model: DiT, img: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    dtype = model.first.weight.dtype
    vs = []
    for t in TIMES:
        tt = torch.full((img.shape[0],), t)
        vs.append(model(img.to(dtype), cond.context.to(dtype), tt, cond.pos, cond.mask).float())
    return torch.stack(vs)


def world(n_prompts: int) -> dict:
    from krea2.eval.world_eval import evaluate_images, prompts_path
    from krea2.pipeline import load_pipeline, to_pil
    from krea2.sampling import initial_noise

    pipe = load_pipeline("world")  # float32 DiT
    records = [json.loads(line) for line in prompts_path("world_eval_small").read_text().splitlines()][:n_prompts]
    prompts = [r["prompt"] for r in records]
    ctx, mask = pipe.encode(prompts)
    p, side = pipe.model.cfg.patch, pipe.resolution
    gh = gw = side // pipe.pixels_per_token
    torch.manual_seed(0)
    x0 = initial_noise(len(prompts), pipe.model.cfg.channels, side, side, seed=1)
    noise = initial_noise(len(prompts), pipe.model.cfg.channels, side, side, seed=2)
    img = patchify((1 - 0.5) * x0 + 0.5 * noise, p)  # a half-noised input; t varies per forward below
    cond = Conditioning.build(ctx, mask, gh, gw)
    ref_model = pipe.model
    ref_v = velocities(ref_model, img, cond)
    ref_images = pipe.generate(prompts, seed=0)
    ref_score, ref_rows = evaluate_images(records, to_pil(ref_images))
    results = {"fp32": {"velocity": 0.0, "images": 0.0, "score": ref_score["overall"], "flips": 0,
                        "share": blocks_share(ref_model, img, cond, ref_v)}}
    for name, m in variants(ref_model).items():
        pipe.model = m
        pipe._empty = None  # the cached empty encoding is keyed by dtype; reset for clarity
        images = pipe.generate(prompts, seed=0)
        score, rows = evaluate_images(records, to_pil(images))
        results[name] = {"velocity": rel(velocities(m, img, cond), ref_v), "images": rel(images, ref_images),
                         "score": score["overall"],
                         "flips": sum(a["correct"] != b["correct"] for a, b in zip(rows, ref_rows))}
    pipe.model = ref_model
    return results


def shaped_12b() -> dict:
    torch.manual_seed(0)
    model = DiT(SHAPED_12B).eval()
    with torch.no_grad():  # zero-initialised gains/modulations make a degenerate model; perturb them (as tests do)
        for name, q in model.named_parameters():
            if q.dim() == 1 or name.endswith("mod.lin") or "modulation" in name:
                q.normal_(0, 0.02)
    B, Lt, gh, gw = 2, 32, 8, 8
    txtmask = torch.ones(B, Lt, dtype=torch.bool)
    txtmask[1, 20:] = False
    pos, mask = joint_inputs(txtmask, gh, gw)
    ctx = torch.randn(B, Lt, SHAPED_12B.txtlayers, SHAPED_12B.txtdim)
    cond = Conditioning(ctx, pos, mask)
    img = torch.randn(B, gh * gw, SHAPED_12B.token_dim)
    ts = torch.linspace(1, 0, 9)
    ref_v, ref_x = velocities(model, img, cond), euler_sample(model, img, ts, cond, None, 0.0)
    results = {"fp32": {"velocity": 0.0, "latents": 0.0, "share": blocks_share(model, img, cond, ref_v)}}
    for name, m in variants(model).items():
        c = Conditioning(ctx.to(m.first.weight.dtype), pos, mask)
        results[name] = {"velocity": rel(velocities(m, img, cond), ref_v),
                         "latents": rel(euler_sample(m, img, ts, c, None, 0.0), ref_x)}
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=54, help="world_eval_small prompts (54 in all)")
    ap.add_argument("--skip-12b", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    w = world(args.prompts)
    share = w["fp32"]["share"]
    print(f"world model (world-s, trained), {args.prompts} world_eval_small prompts, float32 reference; the blocks "
          f"make {share:.2f} of the velocity (relative L2 without them):")
    print(f"{'variant':26s} {'velocity':>9s} {'/ share':>8s} {'images':>9s} {'score':>6s} {'flips':>6s}")
    for name, r in w.items():
        print(f"{name:26s} {r['velocity']:9.4f} {r['velocity'] / share:8.4f} {r['images']:9.4f} {r['score']:6.3f} "
              f"{r['flips']:6d}")
    if not args.skip_12b:
        s = shaped_12b()
        n = sum(p.numel() for p in DiT(SHAPED_12B).parameters())
        share = s["fp32"]["share"]
        print(f"\n12B-shaped ({SHAPED_12B.layers} blocks, {SHAPED_12B.features} wide, {n / 1e6:.0f}M params, random "
              f"init), float32 reference; the blocks make {share:.3f} of the velocity:")
        print(f"{'variant':26s} {'velocity':>9s} {'/ share':>8s} {'latents':>9s}")
        for name, r in s.items():
            print(f"{name:26s} {r['velocity']:9.4f} {r['velocity'] / share:8.4f} {r['latents']:9.4f}")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
