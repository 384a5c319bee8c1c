"""The trial that ruled out a plain diffusers AutoencoderDC for the world (BENCHMARKS.md, "World autoencoder").

A small DC-AE (4x, 16 channels, no full-resolution stage, 1.7M parameters), L1 loss, batch 32 at 32 px alternating
with 8 at 64 px, AdamW lr 1e-3; prints the loss and, every --eval-every steps, PSNR and checker accuracy (100 renders
per size, every style). The figures in BENCHMARKS.md: `.venv/bin/python benchmarks/ae_dcae_trial.py --steps 1500`.
"""

import argparse
import time

import torch
from diffusers import AutoencoderDC

from krea2.train.autoencoder import reconstruction_report, world_renders


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    chans = (32, 32, 128)
    ae = AutoencoderDC(in_channels=3, latent_channels=16, attention_head_dim=16,
                       encoder_block_types=("ResBlock",) * 3, decoder_block_types=("ResBlock",) * 3,
                       encoder_block_out_channels=chans, decoder_block_out_channels=chans,
                       encoder_layers_per_block=(0, 1, 2), decoder_layers_per_block=(0, 1, 3),
                       encoder_qkv_multiscales=((),) * 3, decoder_qkv_multiscales=((),) * 3)
    print(f"AutoencoderDC, {sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3, weight_decay=0)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        size = 32 if step % 2 else 64
        x, _ = world_renders(32 if size == 32 else 8, size, step)
        loss = (ae.decode(ae.encode(x).latent).sample - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step} {time.perf_counter() - t0:.0f}s loss {loss.item():.4f}", flush=True)
        if step % args.eval_every == 0:
            ae.eval()
            with torch.no_grad():
                for s in (32, 64):
                    r = reconstruction_report(lambda v: ae.encode(v).latent,
                                              lambda z: ae.decode(z).sample.clamp(-1, 1), s, 20)
                    print(f"  {s}px PSNR {r['psnr']:.2f} dB checker {r['accuracy']:.3f}", flush=True)
            ae.train()


if __name__ == "__main__":
    main()
