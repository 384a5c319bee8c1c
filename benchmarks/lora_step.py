"""LoRA training step: our DiT with peft adapters vs diffusers' Krea2Transformer2DModel with peft adapters on the
same weights and the same Linear modules, alternating in one process.

One step = forward, flow-matching-shaped loss, backward, AdamW on the adapters, zero_grad. Config: preset `bench`
(512 wide, 4 blocks), batch 2, 256 image + 64 text tokens, rank 32 on every Linear of the blocks (`targets = "all"`,
the released default). Ratio = diffusers / ours of the medians ("ratio") and of the fastest rounds ("min-ratio").

    python benchmarks/lora_step.py [--rounds 12] [--threads N] [--precision bf16|fp32] [--rank 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from dit_step import bench_pair  # benchmarks/ is on sys.path when run as a script

from krea2.models.dit import DiT
from krea2.models.lora import diffusers_name
from krea2.sampling import joint_inputs
from krea2.train.lora import LoRAConfig, inject_lora, lora_targets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, inject_adapter_in_model

    ours, theirs = bench_pair()  # the same weights, before either gets adapters
    cfg = LoRAConfig(rank=args.rank, alpha=args.rank, targets="all")
    names = lora_targets(ours, cfg.targets)
    ours = inject_lora(ours, cfg)
    theirs = inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank,
                                                target_modules=[diffusers_name(n) for n in names]), theirs)
    for name, p in theirs.named_parameters():
        p.requires_grad_(".lora_" in name)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_ours == n_theirs, (n_ours, n_theirs)  # the same adapters on both sides
    opts = {m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for m in (ours, theirs)}

    c, B, Lt, gh, gw = DiT("bench").cfg, 2, 64, 16, 16
    img, target = torch.randn(B, gh * gw, c.token_dim), torch.randn(B, gh * gw, c.token_dim)
    ctx = torch.randn(B, Lt, c.txtlayers, c.txtdim)
    txtmask = torch.ones(B, Lt, dtype=torch.bool)
    txtmask[1, 48:] = False
    pos, mask = joint_inputs(txtmask, gh, gw)
    t = torch.rand(B)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(model):
        with autocast:
            out = theirs(img, ctx, t, pos[0], txtmask, return_dict=False)[0] if model is theirs else \
                model(img, ctx, t, pos, mask)
        (out.float() - target).square().mean().backward()
        opts[model].step()
        opts[model].zero_grad(set_to_none=True)

    times = {"ours": [], "diffusers": []}
    for model in (ours, theirs):  # warm-up
        step(model), step(model)
    for _ in range(args.rounds):  # alternate so drift on a shared machine hits both equally
        for key, model in (("ours", ours), ("diffusers", theirs)):
            t0 = time.perf_counter()
            step(model)
            times[key].append(time.perf_counter() - t0)
    o, d = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}, rank {args.rank} on "
          f"{len(names)} Linears ({n_ours:,} adapter parameters), {args.rounds} rounds")
    print(f"LoRA step: ours {o * 1e3:.1f} ms, diffusers+peft {d * 1e3:.1f} ms, ratio {d / o:.2f}, "
          f"min-ratio {min(times['diffusers']) / min(times['ours']):.2f}")


if __name__ == "__main__":
    main()
