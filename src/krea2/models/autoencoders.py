"""Autoencoders: frozen diffusers VAEs behind one interface, normalisation inside.

Every autoencoder has `channels`, `compression` (spatial factor), `encode(images (B,3,H,W) in [-1,1]) -> normalised
latent (B,C,H/f,W/f)` (posterior mean, float32) and `decode(z) -> images in [-1,1]` (clamped, float32).
Specs for `load_autoencoder`:
    qwen-image[:PATH]   the released Qwen-Image VAE (16 channels, 8x), a VAE folder or a Qwen-Image folder with vae/
    flux2[:PATH]        the FLUX.2 VAE (32 channels, 8x)
    identity            pixels as latents (3 channels, 1x), for tiny models
Files are read locally only, never downloaded.
"""

from __future__ import annotations

import os

import torch
from einops import rearrange
from torch import Tensor, nn

from krea2.errors import Krea2Error
from krea2.models.text_encoders import local_model_dir

QWEN_IMAGE = "Qwen/Qwen-Image"
FLUX2 = "black-forest-labs/FLUX.2-dev"


class QwenImageAutoencoder(nn.Module):
    """diffusers AutoencoderKLQwenImage on single frames; z = (E(x) - mean) / std per channel, as the release."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.channels = vae.config.z_dim
        self.compression = vae.spatial_compression_ratio
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        _check_sides(images, self.compression)
        x = images[:, :, None].to(self.vae.dtype)  # a video VAE: one frame, [B, C, 1, H, W]
        z = self.vae.encode(x).latent_dist.mode()[:, :, 0].float()
        return (z - self.mean) / self.std

    def decode(self, z: Tensor) -> Tensor:
        z = z.float() * self.std + self.mean
        return self.vae.decode(z[:, :, None].to(self.vae.dtype)).sample[:, :, 0].float().clamp(-1, 1)


class Flux2Autoencoder(nn.Module):
    """diffusers AutoencoderKLFlux2, normalised as diffusers' Flux2 pipeline does it.

    The pipeline patchifies the latent 2x2 (C*4 channels, c*4 + dy*2 + dx) and normalises with the VAE's batch-norm
    running stats. We unpatchify after normalising: the DiT's own 2x2 patchify (same index order) then gives exactly
    FLUX.2's tokens, and `channels` stays the VAE's latent channels.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.channels = vae.config.latent_channels
        self.compression = 2 ** (len(vae.config.block_out_channels) - 1)
        self.patch = tuple(vae.config.patch_size)

    def _stats(self) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        return (bn.running_mean.float().view(1, -1, 1, 1),
                torch.sqrt(bn.running_var.float().view(1, -1, 1, 1) + self.vae.config.batch_norm_eps))

    def _patchify(self, z: Tensor) -> Tensor:
        return rearrange(z, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=self.patch[0], pw=self.patch[1])

    def _unpatchify(self, z: Tensor) -> Tensor:
        return rearrange(z, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=self.patch[0], pw=self.patch[1])

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        _check_sides(images, self.compression * self.patch[0])
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode().float()
        mean, std = self._stats()
        return self._unpatchify((self._patchify(z) - mean) / std)

    def decode(self, z: Tensor) -> Tensor:
        mean, std = self._stats()
        z = self._unpatchify(self._patchify(z.float()) * std + mean)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


class PixelAutoencoder(nn.Module):
    """Pixels as latents: lets tiny models train and sample in seconds without a VAE."""

    channels = 3
    compression = 1

    def encode(self, images: Tensor) -> Tensor:
        return images.float()

    def decode(self, z: Tensor) -> Tensor:
        return z.float().clamp(-1, 1)


def _check_sides(images: Tensor, multiple: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise Krea2Error(f"expected images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    if images.shape[-2] % multiple or images.shape[-1] % multiple:
        raise Krea2Error(f"image sides must be multiples of {multiple}, got {images.shape[-2]}x{images.shape[-1]}")


def _load_vae(cls, path: str, repo: str, kind: str, dtype: torch.dtype) -> nn.Module:
    """`cls.from_pretrained` from a VAE folder or a pipeline folder with vae/ (local or HF cache); never the network."""
    folder = local_model_dir(path, f"{kind} autoencoder", f"{kind}:/path/to/vae", f"{repo} --include 'vae/*'",
                             "KREA2_AUTOENCODER")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as e:  # a folder without a (recognisable) model in it
        raise Krea2Error(f"cannot load the {kind} autoencoder from {str(folder)!r}: {str(e).splitlines()[0]}") from e


def load_autoencoder(spec: str | None, device="cpu", dtype=torch.float32) -> nn.Module:
    """Resolve a spec (module docstring); a bare name reads the folder from KREA2_AUTOENCODER, else the HF cache."""
    kind, _, path = (spec or "qwen-image").partition(":")
    if kind == "identity":
        return PixelAutoencoder().to(device)
    if kind == "qwen-image":
        from diffusers import AutoencoderKLQwenImage

        vae = _load_vae(AutoencoderKLQwenImage, path or os.environ.get("KREA2_AUTOENCODER") or QWEN_IMAGE,
                        QWEN_IMAGE, kind, dtype)
        return QwenImageAutoencoder(vae).to(device)
    if kind == "flux2":
        from diffusers import AutoencoderKLFlux2

        vae = _load_vae(AutoencoderKLFlux2, path or os.environ.get("KREA2_AUTOENCODER") or FLUX2, FLUX2, kind, dtype)
        return Flux2Autoencoder(vae).to(device)
    raise Krea2Error(f"unknown autoencoder {spec!r}: use qwen-image[:PATH], flux2[:PATH] or identity")
