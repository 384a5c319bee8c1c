"""`krea2 train-ae`: the world autoencoder (`WorldAE`: 4x, a linear patch code plus a learned residual, a diffusers
ModelMixin) trained on world renders of every style and size and on the emoji set.

Why this shape (BENCHMARKS.md, "World autoencoder"): world images must come back nearly pixel-exact (a 0.6 px blur
already costs the checker a quarter of its accuracy) and two CPU cores buy little training. A small `AutoencoderKL`
and an `AutoencoderDC` (space-to-channel shortcuts, no full-resolution stage) were still at 17-21 dB with ~0 checker
accuracy after 1,500 steps, while the best *linear* code of 4x4 patches (PCA) is at 26-38 dB before any training.
So the model starts as that PCA code (`init_linear`) and learns a residual, with every conv at the latent resolution.

Training: L1 + a gradient-difference term (keeps edges and grain sharp: Mathieu et al. 2016), the decoder sees
z + sigma * std(z) noise so the imperfect latents a DiT samples still decode to clean shapes; fresh renders every step
from (seed, step), so `--resume` continues exactly. At the end the per-channel latent mean/std are measured on
renders and stored beside the weights (`latents.json`), applied as the release applies the Qwen-Image VAE's
`latents_mean`/`latents_std`: z = (E(x) - mean) / std.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from krea2.data.world import STYLES
from krea2.errors import Krea2Error
from krea2.eval.world_encoder import to_tensor
from krea2.models.autoencoders import LATENT_STATS, WorldAutoencoder, world_ae_class
from krea2.models.checkpoint import publish_dir
from krea2.pipeline import to_uint8
from krea2.train import checkpoint as ckpt


@dataclass
class AEConfig:
    """Everything `krea2 train-ae` reads; `--set key=value` overrides fields."""

    steps: int = 9000
    batch_size: int = 32  # images per step at 32 px; 64 px steps take batch_size // 4 (the same pixel count)
    sizes: tuple[int, ...] = (32, 64)
    emoji_every: int = 8  # every n-th step is a batch of emoji (0: none); the rest are world renders
    lr: float = 1e-3
    warmup: int = 100
    decay: float = 0.3  # linear decay to zero over the last fraction of steps (WSD)
    grad_weight: float = 1.0  # weight of the image-gradient L1 term
    latent_noise: float = 0.02  # decoder input z + latent_noise * std(z) * N(0, 1)
    latent_channels: int = 32  # 16 at 4x keeps too little of 32 px renders (BENCHMARKS.md); 32 keeps every style
    width: int = 128  # channels at the latent resolution
    enc_blocks: int = 2
    dec_blocks: int = 3
    seed: int = 0
    save_every: int = 500
    sample_every: int = 1000
    log_every: int = 50
    eval_images: int = 100  # per size, for the PSNR/checker figures logged at sample_every
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        from krea2.data.world import GEOMETRIES

        for name in ("steps", "batch_size", "latent_channels", "width", "enc_blocks", "dec_blocks", "save_every",
                     "sample_every", "log_every"):
            if getattr(self, name) < 1:
                raise Krea2Error(f"train-ae: {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 4:
            raise Krea2Error(f"train-ae: batch_size must be >= 4 (64 px steps take batch_size // 4), got "
                             f"{self.batch_size}")
        bad = [s for s in self.sizes if s not in GEOMETRIES or s % 4]
        if not self.sizes or bad:
            ok = [s for s in GEOMETRIES if s % 4 == 0]
            raise Krea2Error(f"train-ae: sizes must be world sizes divisible by 4 ({ok}), got {list(self.sizes)}")
        floats = (self.lr, self.decay, self.latent_noise, self.grad_weight)
        if (not all(math.isfinite(v) for v in floats) or not 0 <= self.decay <= 1 or self.lr <= 0
                or self.latent_noise < 0 or self.grad_weight < 0):
            raise Krea2Error("train-ae: need finite lr > 0, 0 <= decay <= 1, latent_noise >= 0 and grad_weight >= 0")
        if self.latent_channels > 3 * 4 * 4:
            raise Krea2Error(f"train-ae: latent_channels must be <= 48 (3 x 4 x 4 values per 4x4 patch), got "
                             f"{self.latent_channels}")
        if self.width % 8:
            raise Krea2Error(f"train-ae: width must be a multiple of 8 (GroupNorm of 8 groups), got {self.width}")
        if self.seed < 0 or self.warmup < 0 or self.emoji_every < 0 or self.eval_images < 0:
            raise Krea2Error("train-ae: seed, warmup, emoji_every and eval_images must be >= 0")


# --------------------------------------------------------------------------------------------------------- data
def world_renders(n: int, size: int, seed: int, styles=None) -> tuple[Tensor, list]:
    """n fresh world renders (every style unless restricted) and their scenes; deterministic in seed."""
    from krea2.data import world

    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, styles=styles) for _ in range(n)]
    images = np.stack([world.render(s, size, int(rng.integers(1 << 31))) for s in scenes])
    return to_tensor(images), scenes


class EmojiBank:
    """The emoji set rendered once per size (~3,900 images), drawn from by index."""

    def __init__(self):
        self._by_size: dict[int, np.ndarray] = {}

    def batch(self, n: int, size: int, seed: int) -> Tensor | None:
        from krea2.data.emoji import emoji_examples, font_path

        if font_path() is None:
            return None
        if size not in self._by_size:
            self._by_size[size] = np.stack([e.image for e in emoji_examples(size)])
        bank = self._by_size[size]
        idx = np.random.default_rng(seed).integers(len(bank), size=n)
        return to_tensor(bank[idx])


def step_batch(cfg: AEConfig, step: int, emoji: EmojiBank) -> Tensor:
    """The images of step `step`: a size by turn, emoji every `emoji_every`-th step, else world renders."""
    size = cfg.sizes[step % len(cfg.sizes)]
    n = max(1, cfg.batch_size * 32 * 32 // (size * size))
    seed = cfg.seed * 1_000_003 + step
    if cfg.emoji_every and step % cfg.emoji_every == 0:
        x = emoji.batch(n, size, seed)
        if x is not None:
            return x
    return world_renders(n, size, seed)[0]


# --------------------------------------------------------------------------------------------------------- loss
def image_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def reconstruction_loss(y: Tensor, x: Tensor, grad_weight: float) -> tuple[Tensor, dict[str, float]]:
    """L1 on pixels + grad_weight * L1 on horizontal/vertical pixel differences; y, x (B, 3, H, W) in [-1, 1]."""
    l1 = (y - x).abs().mean()
    (gy, gx), (ty, tx) = image_gradients(y), image_gradients(x)
    grad = (gy - ty).abs().mean() + (gx - tx).abs().mean()
    return l1 + grad_weight * grad, {"l1": l1.item(), "grad": grad.item()}


def lr_at(cfg: AEConfig, step: int) -> float:
    """Warmup, constant, then linear decay over the last `decay` fraction (step counts from 1)."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(1, cfg.warmup)
    start = cfg.steps * (1 - cfg.decay)
    if step <= start:
        return cfg.lr
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1.0, cfg.steps - start))


# ------------------------------------------------------------------------------------------------------- metrics
def _mse(y: Tensor, x: Tensor) -> float:
    """Mean squared error of the uint8-rounded reconstruction y against x, both (B, 3, H, W) in [-1, 1]."""
    return float(((to_tensor(to_uint8(y)) - x) ** 2).mean())


def _db(mse: float) -> float:
    return 10 * math.log10(4 / max(mse, 1e-12))  # peak-to-peak 2 on [-1, 1]


def psnr(y: Tensor, x: Tensor) -> float:
    """dB on the [-1, 1] range of the uint8-rounded reconstruction y against x."""
    return _db(_mse(y, x))


@torch.no_grad()
def reconstruction_report(encode, decode, size: int, n: int, seed: int = 12345) -> dict:
    """PSNR and exact-checker accuracy per style on n fresh ground-truth renders per style at `size`.

    `encode`/`decode` map images in [-1, 1] to latents and back. Returns {"psnr", "accuracy",
    "styles": {style: {"psnr", "accuracy"}}}; accuracy is the fraction whose reconstruction the checker reads as
    exactly the rendered scene (every object, attribute, background and style).
    """
    from krea2.data import world
    from krea2.eval import checker

    per_style, total_ok, total_se = {}, 0, 0.0
    for i, style in enumerate(world.STYLES):
        x, scenes = world_renders(n, size, seed + 7919 * i, styles=[style])
        y = torch.cat([decode(encode(x[j:j + 64])) for j in range(0, n, 64)])
        # the scene's whole record: every object with all its attributes, background and style
        ok = sum(checker.check(img, world.scene_to_record(sc)) for img, sc in zip(to_uint8(y), scenes))
        se = _mse(y, x)
        per_style[style] = {"psnr": _db(se), "accuracy": ok / n}
        total_ok, total_se = total_ok + ok, total_se + se
    k = len(world.STYLES)
    return {"size": size, "n_per_style": n, "psnr": _db(total_se / k), "accuracy": total_ok / (n * k),
            "styles": per_style}


@torch.no_grad()
def latent_stats(ae, cfg: AEConfig, n: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of E(x) over fresh world renders at every training size."""
    zs = []
    for size in cfg.sizes:
        x, _ = world_renders(n, size, seed=424242 + size)
        zs += [ae.encode(x[j:j + 128]).transpose(0, 1).flatten(1) for j in range(0, n, 128)]
    z = torch.cat(zs, 1)
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-4).tolist()


# ------------------------------------------------------------------------------------------------------ training
def build_ae(cfg: AEConfig):
    """A fresh WorldAE whose linear code is the PCA of 4x4 patches of 256 renders per training size."""
    torch.manual_seed(cfg.seed)
    ae = world_ae_class()(latent_channels=cfg.latent_channels, compression=4, width=cfg.width,
                          enc_blocks=cfg.enc_blocks, dec_blocks=cfg.dec_blocks)
    ae.init_linear([world_renders(256, size, seed=cfg.seed + size)[0] for size in cfg.sizes])
    return ae


def _recon_grid(ae, cfg: AEConfig) -> Tensor:
    """(3, H, W) in [0, 1]: rows of ground truth over reconstruction, 8 renders per size (for TensorBoard)."""
    rows = []
    ae.eval()
    with torch.no_grad():
        for size in cfg.sizes:
            x, _ = world_renders(8, size, seed=777 + size)
            y = ae.decode(ae.encode(x)).clamp(-1, 1)
            big = max(cfg.sizes)
            up = torch.nn.functional.interpolate(torch.cat([x, y]), size=(big, big), mode="nearest")
            rows += [torch.cat(list(up[:8]), 2), torch.cat(list(up[8:]), 2)]
    ae.train()
    return (torch.cat(rows, 1) + 1) / 2


def train_autoencoder(cfg: AEConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train the world autoencoder into `out` (state/ for --resume, tb/, final/ = the `--vae world:OUT/final` folder).

    Raises Krea2Error if `out` holds a run and resume is False, or its config differs from cfg.
    """
    cfg.validate()
    out = Path(out)
    state_dir = out / "state"
    ckpt.recover_checkpoint(state_dir)
    if (out / "config.json").exists():
        try:
            saved = json.loads((out / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Krea2Error(f"{out}/config.json is damaged; restore it or choose another --out") from None
        if not resume:
            raise Krea2Error(f"{out} already holds a train-ae run; pass --resume to continue it or choose another "
                             "--out")
        mine = json.loads(json.dumps(asdict(cfg)))
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k) and k not in
                      ("steps", "save_every", "sample_every", "log_every"))
        if diff:
            raise Krea2Error(f"--resume with a different config than {out}/config.json ({', '.join(diff)}); "
                             "resume with the same settings or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(asdict(cfg), indent=1))
    tmp.replace(out / "config.json")  # a kill mid-write never leaves a truncated config

    ae = build_ae(cfg)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = 0
    if resume and ckpt.is_checkpoint(state_dir):
        start = int(ckpt.load_training_state(state_dir, ae, opt)["step"])
    emoji = EmojiBank()
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=cfg.steps, initial=start, desc="train-ae", unit="step", disable=not progress)
    t0, n_images = time.perf_counter(), 0
    ae.train()
    for step in range(start + 1, cfg.steps + 1):
        x = step_batch(cfg, step, emoji)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        z = ae.encode(x)
        if cfg.latent_noise:
            gen.manual_seed(cfg.seed * 7 + step)  # noise from (seed, step): resume is exact
            z = z + cfg.latent_noise * z.detach().std() * torch.randn(z.shape, generator=gen)
        y = ae.decode(z)
        loss, parts = reconstruction_loss(y, x, cfg.grad_weight)
        if not torch.isfinite(loss):
            raise Krea2Error(f"train-ae: loss became {loss.item()} at step {step}; start a new --out with a lower "
                             f"lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        n_images += len(x)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = n_images / max(1e-9, time.perf_counter() - t0)
            writer.add_scalar("train/loss", loss.item(), step)
            for k, v in parts.items():
                writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/lr", lr_at(cfg, step), step)
            writer.add_scalar("train/images_per_s", rate, step)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
        if step % cfg.sample_every == 0 or step == cfg.steps:
            writer.add_image("reconstructions", _recon_grid(ae, cfg), step)
            ae.eval()
            for size in cfg.sizes:
                rep = reconstruction_report(ae.encode, lambda v: ae.decode(v).clamp(-1, 1), size,
                                            max(1, cfg.eval_images // len(STYLES)))
                writer.add_scalar(f"eval/psnr_{size}", rep["psnr"], step)
                writer.add_scalar(f"eval/checker_{size}", rep["accuracy"], step)
                tqdm.write(f"[train-ae] step {step} {size}px: PSNR {rep['psnr']:.2f} dB, checker "
                           f"{rep['accuracy']:.3f} " + " ".join(f"{s} {v['accuracy']:.2f}"
                                                                for s, v in rep["styles"].items()))
            ae.train()
        if step % cfg.save_every == 0 or step == cfg.steps:  # the last too: --resume of a finished run is a no-op
            ckpt.save_training_state(state_dir, ae, opt, {"step": step})
    bar.close()
    writer.close()
    return export_autoencoder(ae, cfg, out / "final")


def export_autoencoder(ae, cfg: AEConfig, path: Path, overwrite: bool = True) -> Path:
    """The diffusers folder (config.json + diffusion_pytorch_model.safetensors) plus latents.json, published whole."""
    ae.eval()
    mean, std = latent_stats(ae, cfg)

    def fill(tmp: Path) -> None:
        ae.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / LATENT_STATS).write_text(json.dumps({"latents_mean": mean, "latents_std": std}, indent=1))

    return publish_dir(path, fill, overwrite=overwrite)


def load_trained(path: str | Path) -> WorldAutoencoder:
    from krea2.models.autoencoders import load_autoencoder

    return load_autoencoder(f"world:{path}")
