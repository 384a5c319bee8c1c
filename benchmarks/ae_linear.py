"""The best *linear* 4x autoencoder of world renders: PCA of 4x4 patches at 16, 24 and 32 latent channels.

It is the fresh `WorldAE` (residual nets at zero) for each channel count; prints PSNR and the exact checker's accuracy
per style on ground-truth renders at 32 and 64 px. BENCHMARKS.md, "World autoencoder".
    .venv/bin/python benchmarks/ae_linear.py [--n 40]
"""

import argparse

import torch

from krea2.train.autoencoder import AEConfig, build_ae, reconstruction_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40, help="renders per style and size")
    args = ap.parse_args()
    print("| channels | px | PSNR (dB) | checker | " + " | ".join(
        ["flat", "outline", "striped", "gradient", "grainy"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in (16, 24, 32):
        ae = build_ae(AEConfig(latent_channels=c, width=16, enc_blocks=1, dec_blocks=1)).eval()
        for size in (32, 64):
            with torch.no_grad():
                r = reconstruction_report(ae.encode, lambda z, ae=ae: ae.decode(z).clamp(-1, 1), size, args.n)
            print(f"| {c} | {size} | {r['psnr']:.1f} | {r['accuracy']:.3f} | "
                  + " | ".join(f"{v['accuracy']:.2f}" for v in r["styles"].values()) + " |")


if __name__ == "__main__":
    main()
