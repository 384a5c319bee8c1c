"""The released sampler as plain functions: schedule, patchify, positions, guided Euler from t = 1 to t = 0."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 52
    guidance: float = 3.5  # Krea convention: v = c + g (c - u); standard CFG scale is g + 1; 0 skips the uncond pass
    mu: float | None = None  # None: interpolate from the image-token count
    y1: float = 0.5
    y2: float = 1.15
    minres: int = 256
    maxres: int = 1280


PRESETS = {
    "raw": SamplingConfig(steps=52, guidance=3.5),
    "turbo": SamplingConfig(steps=8, guidance=0.0, mu=1.15),
}


def sampling_preset(name: str, **overrides) -> SamplingConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown sampling preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def resolution_mu(n_img_tokens: int, cfg: SamplingConfig, pixels_per_token: int = 16) -> float:
    """Shift mu linear in image-token count between minres² and maxres² (not clamped)."""
    x1, x2 = (cfg.minres // pixels_per_token) ** 2, (cfg.maxres // pixels_per_token) ** 2
    return cfg.y1 + (cfg.y2 - cfg.y1) * (n_img_tokens - x1) / (x2 - x1)


def shift_time(t: Tensor, mu: float) -> Tensor:
    """t -> e^mu / (e^mu + 1/t - 1): the same shift for the inference grid and for training timesteps."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def schedule(n_img_tokens: int, cfg: SamplingConfig, pixels_per_token: int = 16) -> Tensor:
    """Timesteps from 1 to 0 (steps + 1 values), returned as float64.

    Computed in float32 like the release (torch's default dtype), so the grid is bit-identical to the official one.
    """
    mu = cfg.mu if cfg.mu is not None else resolution_mu(n_img_tokens, cfg, pixels_per_token)
    ts = torch.linspace(1, 0, cfg.steps + 1, dtype=torch.float32)
    return shift_time(ts, mu).double()


def patchify(latent: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p·W/p, C·p·p), row-major over the grid, feature index c·p² + dy·p + dx."""
    B, C, H, W = latent.shape
    x = latent.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: Tensor, p: int, h: int, w: int) -> Tensor:
    """Inverse of patchify for a latent of h × w."""
    B, _, D = tokens.shape
    C = D // (p * p)
    x = tokens.reshape(B, h // p, w // p, C, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


def image_positions(gh: int, gw: int, device=None) -> Tensor:
    """(gh·gw, 3) positions (0, i, j) of the patch grid."""
    i, j = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(i), i, j], dim=-1).reshape(-1, 3).float()


def joint_inputs(txtmask: Tensor, gh: int, gw: int) -> tuple[Tensor, Tensor]:
    """Positions (B, Lt+N, 3) — text at (0,0,0) — and the joint validity mask (B, Lt+N) for a text mask (B, Lt)."""
    B, Lt = txtmask.shape
    img = image_positions(gh, gw, txtmask.device)
    pos = torch.cat([torch.zeros(Lt, 3, device=txtmask.device), img]).expand(B, -1, -1)
    mask = torch.cat([txtmask.bool(), torch.ones(B, gh * gw, dtype=torch.bool, device=txtmask.device)], dim=1)
    return pos, mask


@dataclass
class Conditioning:
    """Text states with their positions and mask for one branch (conditional or unconditional)."""

    context: Tensor
    pos: Tensor
    mask: Tensor

    @classmethod
    def build(cls, context: Tensor, txtmask: Tensor, gh: int, gw: int) -> Conditioning:
        pos, mask = joint_inputs(txtmask, gh, gw)
        return cls(context, pos, mask)


def guided_velocity(model: Callable, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None,
                    guidance: float) -> Tensor:
    """v = v_c + g (v_c - v_u); g = 0 (or no uncond) runs the conditional pass only."""
    vc = model(x, cond.context, t, cond.pos, cond.mask)
    if guidance == 0 or uncond is None:
        return vc
    vu = model(x, uncond.context, t, uncond.pos, uncond.mask)
    return vc + guidance * (vc - vu)


@torch.no_grad()
def euler_sample(model: Callable, x: Tensor, ts: Tensor, cond: Conditioning, uncond: Conditioning | None,
                 guidance: float, progress: Callable | None = None) -> Tensor:
    """Euler from ts[0] = 1 to ts[-1] = 0 over tokens x; the state stays in x's dtype (fp32 by default)."""
    B = x.shape[0]
    model_dtype = next(iter(model.parameters())).dtype if isinstance(model, torch.nn.Module) else x.dtype
    for k in range(len(ts) - 1):
        t = torch.full((B,), float(ts[k]), device=x.device, dtype=x.dtype)
        v = guided_velocity(model, x.to(model_dtype), t, cond, uncond, guidance)
        x = x + (float(ts[k + 1]) - float(ts[k])) * v.to(x.dtype)
        if progress is not None:
            progress(k)
    return x


def initial_noise(n: int, channels: int, h: int, w: int, seed: int, device="cpu", dtype=torch.float32) -> Tensor:
    """Image i uses randn(1, C, h, w) from a generator seeded seed + i (the release's seeding)."""
    out = []
    for i in range(n):
        g = torch.Generator(device=device).manual_seed(seed + i)
        out.append(torch.randn(1, channels, h, w, generator=g, device=device, dtype=dtype))
    return torch.cat(out)
