"""DiT step time: ours vs diffusers' Krea2Transformer2DModel on the same weights, alternating in one process.

Config (core issue): features 512, heads 8, kv-heads 2, 4 layers, text dim 256 with 3 layers, batch 2, 256 image
+ 64 text tokens. Reports forward and forward+backward times, the ratio diffusers/ours, and the fraction of this
machine's measured fp32 / bf16 matmul peak our step reaches.

    python benchmarks/dit_step.py [--rounds 12] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from krea2.models.convert import to_diffusers
from krea2.models.dit import DiT
from krea2.sampling import joint_inputs


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    """Measured GFLOP/s of a square matmul: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def step_flops(model: DiT, B: int, Lt: int, N: int) -> float:
    """Forward FLOPs: 2·weights·tokens for every Linear at the tokens it sees, plus the attention matmuls."""
    cfg, L = model.cfg, Lt + N

    def w(module) -> int:
        return sum(p.numel() for p in module.parameters() if p.dim() == 2)

    f = 2 * w(model.blocks) * B * L + 2 * w(model.txtmlp) * B * Lt + 2 * (w(model.first) + w(model.last)) * B * N
    f += 2 * (w(model.tmlp) + w(model.tproj)) * B
    f += 2 * w(model.txtfusion.layerwise_blocks) * B * Lt * cfg.txtlayers + 2 * w(model.txtfusion.refiner_blocks) * B * Lt
    f += cfg.layers * 4 * B * L * L * cfg.features  # QK^T and PV
    f += cfg.txtblocks * 4 * (B * Lt * cfg.txtlayers**2 + B * Lt * Lt) * cfg.txtdim
    return f


def bench(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = DiT("bench").train()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.05)
    theirs = to_diffusers(ours).train()
    cfg, B, Lt, gh, gw = ours.cfg, 2, 64, 16, 16
    img = torch.randn(B, gh * gw, cfg.token_dim)
    ctx = torch.randn(B, Lt, cfg.txtlayers, cfg.txtdim)
    txtmask = torch.ones(B, Lt, dtype=torch.bool)
    txtmask[1, 48:] = False  # one padded caption, as in a real batch
    pos, mask = joint_inputs(txtmask, gh, gw)
    t = torch.rand(B)

    def run_ours(backward: bool):
        out = ours(img, ctx, t, pos, mask)
        if backward:
            out.float().square().mean().backward()

    def run_theirs(backward: bool):
        out = theirs(img, ctx, t, pos[0], txtmask, return_dict=False)[0]
        if backward:
            out.float().square().mean().backward()

    flops = step_flops(ours, B, Lt, gh * gw)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured matmul peak "
          f"fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; step {flops / 1e9:.2f} GFLOP fwd")
    print(f"{'precision':10s} {'pass':9s} {'ours ms':>8s} {'diffusers ms':>13s} {'ratio':>6s} {'ours %peak':>10s}")
    for precision in ("fp32", "bf16"):
        for backward in (False, True):
            ctx_mgr = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else (
                lambda: torch.autocast("cpu", enabled=False))
            grad = torch.enable_grad if backward else torch.no_grad
            times = {"ours": [], "diffusers": []}
            with ctx_mgr(), grad():
                for fn in (run_ours, run_theirs):
                    fn(backward), fn(backward)  # warm-up
                for _ in range(args.rounds):  # alternate so drift on a noisy machine hits both equally
                    times["ours"] += bench(lambda: run_ours(backward), 1)
                    times["diffusers"] += bench(lambda: run_theirs(backward), 1)
            ours.zero_grad(set_to_none=True)
            theirs.zero_grad(set_to_none=True)
            o, d = statistics.median(times["ours"]), statistics.median(times["diffusers"])
            total = flops * (3 if backward else 1)
            print(f"{precision:10s} {'fwd+bwd' if backward else 'fwd':9s} {o * 1e3:8.1f} {d * 1e3:13.1f} "
                  f"{d / o:6.2f} {100 * total / o / 1e9 / peaks[precision]:9.0f}%")


if __name__ == "__main__":
    main()
