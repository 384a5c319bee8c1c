"""Autoencoders: frozen diffusers VAEs behind one interface, normalisation inside.

Every autoencoder has `channels`, `compression` (spatial factor), `encode(images (B,3,H,W) in [-1,1]) -> normalised
latent (B,C,H/f,W/f)` (posterior mean, float32) and `decode(z) -> images in [-1,1]` (clamped, float32).
Specs for `load_autoencoder`:
    qwen-image[:PATH]   the released Qwen-Image VAE (16 channels, 8x), a VAE folder or a Qwen-Image folder with vae/
    flux2[:PATH]        the FLUX.2 VAE (32 channels, 8x)
    world[:PATH]        the embedded world's autoencoder (4x; see WorldAE), shipped in the package; PATH: a
                        folder written by `krea2 train-ae`
    identity            pixels as latents (3 channels, 1x), for tiny models
Files are read locally only, never downloaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

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


WORLD_AE = Path(__file__).resolve().parents[1] / "assets" / "world_ae"
LATENT_STATS = "latents.json"


def _world_ae_class():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.resnet import ResnetBlock2D

    class WorldAE(ModelMixin, ConfigMixin):
        """The world autoencoder: a linear patch code plus a learned non-linear residual, at the latent resolution.

        encode: u = pixel_unshuffle(x, f) (3·f² channels); z = W_e (u - mu) + g_e(u)
        decode: u = W_d z + mu + g_d(z); x = pixel_shuffle(u, f)
        W_e, W_d start as the top `latent_channels` principal directions of f x f render patches (`init_linear`) and
        g_e, g_d (diffusers ResnetBlock2D stacks, output convs zero-initialised) start at zero, so training begins
        at the best linear code and learns what is left (edges, grain), every conv at 1/f resolution. Images (B, 3,
        H, W) in [-1, 1] with H, W multiples of f; latents (B, latent_channels, H/f, W/f), unnormalised.
        """

        @register_to_config
        def __init__(self, latent_channels: int = 32, compression: int = 4, width: int = 128, enc_blocks: int = 2,
                     dec_blocks: int = 3, groups: int = 8):
            super().__init__()
            c, f = latent_channels, compression
            pix = 3 * f * f
            self.enc_linear = nn.Conv2d(pix, c, 1)
            self.dec_linear = nn.Conv2d(c, pix, 1)

            self.enc_net = _ResidualNet(pix, c, width, enc_blocks, groups, ResnetBlock2D)
            self.dec_net = _ResidualNet(c, pix, width, dec_blocks, groups, ResnetBlock2D)

        @torch.no_grad()
        def init_linear(self, images: Tensor | list[Tensor]) -> None:
            """PCA of the f x f patches of `images` (B, 3, H, W) in [-1, 1], or a list of such batches of any sizes,
            into the linear encoder/decoder."""
            f = self.config.compression
            v = torch.cat([torch.nn.functional.pixel_unshuffle(x.float(), f).permute(0, 2, 3, 1).reshape(-1, 3 * f * f)
                           for x in (images if isinstance(images, list) else [images])])
            mu = v.mean(0)
            basis = torch.linalg.svd(v - mu, full_matrices=False).Vh[: self.config.latent_channels]  # (c, pix)
            self.enc_linear.weight.copy_(basis[:, :, None, None])
            self.enc_linear.bias.copy_(-basis @ mu)
            self.dec_linear.weight.copy_(basis.T[:, :, None, None])
            self.dec_linear.bias.copy_(mu)

        def encode(self, images: Tensor) -> Tensor:
            u = torch.nn.functional.pixel_unshuffle(images, self.config.compression)
            return self.enc_linear(u) + self.enc_net(u)

        def decode(self, z: Tensor) -> Tensor:
            return torch.nn.functional.pixel_shuffle(self.dec_linear(z) + self.dec_net(z), self.config.compression)

    return WorldAE


class _ResidualNet(nn.Module):
    """conv in, diffusers ResnetBlock2D stack (no time embedding), norm-act-conv out; the output conv starts at zero."""

    def __init__(self, cin: int, cout: int, width: int, blocks: int, groups: int, block_cls):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, width, 3, padding=1)
        self.blocks = nn.ModuleList(block_cls(in_channels=width, out_channels=width, temb_channels=None, groups=groups)
                                    for _ in range(blocks))
        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, cout, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, None)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


def world_ae_class():
    """The diffusers model class of the world autoencoder (built on first use: diffusers imports slowly)."""
    global _WORLD_AE
    if _WORLD_AE is None:
        _WORLD_AE = _world_ae_class()
    return _WORLD_AE


_WORLD_AE = None


class WorldAutoencoder(nn.Module):
    """The world autoencoder (`krea2 train-ae`) behind the autoencoder interface; z = (E(x) - mean) / std per channel
    with the stats of `latents.json`, as the release normalises Qwen-Image latents."""

    def __init__(self, vae: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.channels = vae.config.latent_channels
        self.compression = vae.config.compression
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        _check_sides(images, self.compression)
        z = self.vae.encode(images.to(self.vae.dtype)).float()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        z = z.float() * self.std + self.mean
        return self.vae.decode(z.to(self.vae.dtype)).float().clamp(-1, 1)


def load_world_autoencoder(path: str | None, device="cpu", dtype=torch.float32) -> WorldAutoencoder:
    folder = Path(path) if path else WORLD_AE
    stats = folder / LATENT_STATS
    if not (folder / "config.json").is_file() or not stats.is_file():
        hint = "train one with `krea2 train-ae --out DIR` and pass world:DIR/final" if path else \
            "the package is incomplete; reinstall krea2"
        raise Krea2Error(f"no world autoencoder in {str(folder)!r} (needs config.json, weights and {LATENT_STATS}); "
                         f"{hint}")
    try:
        vae = world_ae_class().from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                            use_safetensors=True)
        s = json.loads(stats.read_text())
        mean, std = s["latents_mean"], s["latents_std"]
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise Krea2Error(f"cannot load the world autoencoder from {str(folder)!r}: {first}") from e
    c = vae.config.latent_channels
    if (not isinstance(mean, list) or not isinstance(std, list) or len(mean) != c or len(std) != c
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in mean + std)
            or min(std) <= 0):
        raise Krea2Error(f"{stats}: latents_mean and latents_std need {c} finite numbers each, std > 0")
    return WorldAutoencoder(vae, mean, std).to(device)


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
    if kind == "world":
        return load_world_autoencoder(path or None, device, dtype)
    if kind == "qwen-image":
        from diffusers import AutoencoderKLQwenImage

        vae = _load_vae(AutoencoderKLQwenImage, path or os.environ.get("KREA2_AUTOENCODER") or QWEN_IMAGE,
                        QWEN_IMAGE, kind, dtype)
        return QwenImageAutoencoder(vae).to(device)
    if kind == "flux2":
        from diffusers import AutoencoderKLFlux2

        vae = _load_vae(AutoencoderKLFlux2, path or os.environ.get("KREA2_AUTOENCODER") or FLUX2, FLUX2, kind, dtype)
        return Flux2Autoencoder(vae).to(device)
    raise Krea2Error(f"unknown autoencoder {spec!r}: use qwen-image[:PATH], flux2[:PATH], world[:PATH] or identity")
