"""DiT step time: ours vs diffusers' Krea2Transformer2DModel on the same weights, alternating in one process.

Config (core issue): features 512, heads 8, kv-heads 2, 4 layers, text dim 256 with 3 layers, batch 2, 256 image
+ 64 text tokens. Reports forward and forward+backward times, the ratio diffusers/ours, and the fraction of this
machine's measured fp32 / bf16 matmul peak our step reaches (official FLOPs over our time). Ratios are
diffusers/ours of the medians ("ratio") and of the fastest rounds ("min-ratio", steadier on a shared machine).

    python benchmarks/dit_step.py [--rounds 12] [--threads N [--clock cpu]] [--precision fp32|bf16] [--passes fwd+bwd]
                                   [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from krea2.models.convert import to_diffusers
from krea2.models.dit import DiT
from krea2.sampling import joint_inputs


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 20, clock=time.perf_counter) -> float:
    """Measured GFLOP/s of a square matmul: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n**3 / best / 1e9


def step_flops(model: DiT, B: int, Lt: int, N: int) -> float:
    """Forward FLOPs: 2·weights·tokens for every Linear at the tokens it sees, plus the attention matmuls."""
    cfg, L = model.cfg, Lt + N

    def w(module) -> int:
        return sum(p.numel() for p in module.parameters() if p.dim() == 2)

    f = 2 * w(model.blocks) * B * L + 2 * w(model.txtmlp) * B * Lt + 2 * (w(model.first) + w(model.last)) * B * N
    f += 2 * (w(model.tmlp) + w(model.tproj)) * B
    f += 2 * w(model.txtfusion.layerwise_blocks) * B * Lt * cfg.txtlayers
    f += 2 * w(model.txtfusion.refiner_blocks) * B * Lt
    f += cfg.layers * 4 * B * L * L * cfg.features  # QK^T and PV
    f += cfg.txtblocks * 4 * (B * Lt * cfg.txtlayers**2 + B * Lt * Lt) * cfg.txtdim
    return f


def ratio_row(label: str, ours: list[float], theirs: list[float], total: float, peak: float) -> str:
    o, d = statistics.median(ours), statistics.median(theirs)
    return (f"{label:28s} {o * 1e3:8.1f} {d * 1e3:13.1f} {d / o:6.2f} {min(theirs) / min(ours):8.2f} "
            f"{100 * total / o / 1e9 / peak:9.0f}%")


def bench_pair(seed: int = 0):
    """Our DiT at preset `bench` (1-d gains perturbed so no output is trivially zero) and diffusers'
    Krea2Transformer2DModel holding the same weights, both in train mode."""
    torch.manual_seed(seed)
    ours = DiT("bench").train()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.05)
    return ours, to_diffusers(ours).train()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="both")
    ap.add_argument("--compile", action="store_true", help="add a row for ours with per-block torch.compile")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this thread's CPU time (needs --threads 1); unaffected by time spent descheduled when "
                         "other jobs share the cores")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures one thread: pass --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, theirs = bench_pair()
    cfg, B, Lt, gh, gw = ours.cfg, 2, 64, 16, 16
    img = torch.randn(B, gh * gw, cfg.token_dim)
    ctx = torch.randn(B, Lt, cfg.txtlayers, cfg.txtdim)
    txtmask = torch.ones(B, Lt, dtype=torch.bool)
    txtmask[1, 48:] = False  # one padded caption, as in a real batch
    pos, mask = joint_inputs(txtmask, gh, gw)
    t = torch.rand(B)
    compiled = None
    if args.compile:
        compiled = DiT("bench").train()
        compiled.load_state_dict(ours.state_dict())
        for block in compiled.blocks:
            block.compile()

    def run(model, backward: bool):
        if model is theirs:
            out = theirs(img, ctx, t, pos[0], txtmask, return_dict=False)[0]
        else:
            out = model(img, ctx, t, pos, mask)
        if backward:
            out.float().square().mean().backward()

    flops = step_flops(ours, B, Lt, gh * gw)
    peaks = {"fp32": matmul_peak(torch.float32, clock=clock), "bf16": matmul_peak(torch.bfloat16, clock=clock)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, {args.rounds} rounds; "
          f"measured matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; "
          f"step {flops / 1e9:.2f} GFLOP fwd (official work; ours skips some)")
    print(f"{'case':28s} {'ours ms':>8s} {'diffusers ms':>13s} {'ratio':>6s} {'min-ratio':>8s} {'ours %peak':>10s}")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    passes = [False, True] if args.passes == "both" else [args.passes == "fwd+bwd"]
    for precision in precisions:
        for backward in passes:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
            grad = torch.enable_grad if backward else torch.no_grad
            models = {"ours": ours, "diffusers": theirs, **({"compiled": compiled} if compiled else {})}
            times = {k: [] for k in models}
            with autocast, grad():
                for model in models.values():  # warm-up (and compilation)
                    run(model, backward), run(model, backward)
                for _ in range(args.rounds):  # alternate so drift on a noisy machine hits all equally
                    for k, model in models.items():
                        t0 = clock()
                        run(model, backward)
                        times[k].append(clock() - t0)
            for model in models.values():
                model.zero_grad(set_to_none=True)
            label = f"{precision} {'fwd+bwd' if backward else 'fwd'}"
            total, peak = flops * (3 if backward else 1), peaks[precision]
            print(ratio_row(label, times["ours"], times["diffusers"], total, peak))
            if compiled:
                print(ratio_row(label + " compiled", times["compiled"], times["diffusers"], total, peak) +
                      f"  ({statistics.median(times['ours']) / statistics.median(times['compiled']):.2f}x eager)")


if __name__ == "__main__":
    main()
