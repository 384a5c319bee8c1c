"""GPU check: bf16 training step time, MFU and peak memory of a slice of the 12B configuration.

Full width (features 6144, 48/12 heads, SwiGLU 16384, text fusion 2560 wide) with a few blocks, at the 1024 px token
count (64x64 = 4096 image tokens + 512 text tokens), FSDP2 (bf16 params, fp32 reduce) and per-block torch.compile.

    torchrun --nproc_per_node 8 benchmarks/gpu_check.py --blocks 4 --ac selective
    python benchmarks/gpu_check.py --blocks 2           # one GPU (FSDP over a 1-rank mesh)

On a machine without CUDA it says so and exits 2. Prints one markdown table row per run for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4, help="DiT blocks in the slice (the release has 28)")
    p.add_argument("--batch", type=int, default=1, help="samples per GPU")
    p.add_argument("--img-tokens", type=int, default=4096, help="4096 = 1024x1024 px")
    p.add_argument("--txt-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from timing (compile happens here)")
    p.add_argument("--ac", default="none", choices=["none", "selective", "full"])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="run the same code path on CPU with the tiny preset")
    args = p.parse_args()

    import torch

    if args.cpu_smoke:
        args.img_tokens, args.txt_tokens, args.steps, args.warmup, args.no_compile = 64, 8, 2, 1, True
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; this check needs an NVIDIA GPU (see BENCHMARKS.md, "
              "'Scale-out': GPU figures pending).", file=sys.stderr)
        return 2

    from krea2.models.dit import PRESETS, DiT
    from krea2.train.health import dit_train_flops, peak_flops
    from krea2.train.parallel import (
        ParallelConfig,
        build_mesh,
        clip_grad_norm_,
        destroy_distributed,
        init_distributed,
        parallelize_dit,
    )

    info = init_distributed()
    cuda = info.device.type == "cuda"
    cfg = replace(PRESETS["tiny" if args.cpu_smoke else "krea2-12b"], layers=args.blocks)
    pcfg = ParallelConfig(tp=args.tp, activation_checkpoint=args.ac, compile=not args.no_compile,
                          param_dtype="bfloat16" if cuda else "float32", reduce_dtype="float32")
    with torch.device("meta"):
        model = DiT(cfg)
    mesh = build_mesh(pcfg, info.world_size, info.device.type)
    parallelize_dit(model, mesh, pcfg)
    model.to_empty(device=info.device)
    torch.manual_seed(0)
    with torch.no_grad():  # a plausible init: the check measures speed, not quality
        for prm in model.parameters():
            prm.normal_(0, 0.02) if prm.dim() > 1 else prm.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    B, N, Lt, dev = args.batch, args.img_tokens, args.txt_tokens, info.device
    side = int(N**0.5)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    pos = torch.zeros(B, Lt + N, 3, device=dev)
    pos[:, Lt:, 1:] = grid.float().to(dev)
    img = torch.randn(B, N, cfg.token_dim, device=dev)
    ctx = torch.randn(B, Lt, cfg.txtlayers, cfg.txtdim, device=dev)
    target = torch.randn(B, N, cfg.token_dim, device=dev)

    def step() -> None:
        t = torch.rand(B, device=dev)
        v = model(img, ctx, t, pos)
        (v.float() - target).square().mean().backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_compile = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    t_compile = time.perf_counter() - t_compile
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke run)"
    flops = dit_train_flops(cfg, N, Lt) * B / args.tp  # per GPU: TP ranks split one sample's work
    peak = peak_flops(name)
    mfu = None if peak is None else flops / dt / peak
    tokens_s = B * (N + Lt) / dt
    if info.is_main:
        print(f"\n{name} x {info.world_size}, torch {torch.__version__}, {args.blocks} blocks of 6144, "
              f"{N}+{Lt} tokens, batch {B}/GPU, AC {args.ac}, tp {args.tp}, compile {not args.no_compile}, "
              f"warmup (incl. compile) {t_compile:.0f} s")
        print("| GPUs | blocks | batch/GPU | AC | step (ms) | tokens/s/GPU | MFU | peak mem (GiB) |")
        print("|---|---|---|---|---|---|---|---|")
        mfu_s = "n/a (unknown peak)" if mfu is None else f"{mfu:.1%}"
        print(f"| {info.world_size}x {name} | {args.blocks} | {B} | {args.ac} | {dt * 1e3:.0f} | {tokens_s:.0f} | "
              f"{mfu_s} | {peak_mem:.1f} |")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
