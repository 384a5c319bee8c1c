"""Text-to-image pipeline: a DiT, a text encoder, an autoencoder and the sampler, loaded from a checkpoint.

A krea2 checkpoint is a folder with `model.safetensors` (released tensor layout) and `config.json`:
    {"model": {official DiT fields}, "text_encoder": spec, "autoencoder": spec, "sampling": {...}, "resolution": px}
Released files are named `raw` / `turbo` (paths from KREA2_RAW / KREA2_TURBO) or given as a .safetensors path.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from krea2.errors import Krea2Error
from krea2.models.dit import DiT, DiTConfig, get_config
from krea2.models.loading import load_dit, save_dit, save_json
from krea2.sampling import (
    Conditioning,
    SamplingConfig,
    euler_sample,
    initial_noise,
    patchify,
    sampling_preset,
    schedule,
    unpatchify,
)

ASSETS = Path(__file__).resolve().parent / "assets"
RELEASED = {"raw": ("KREA2_RAW", "raw"), "turbo": ("KREA2_TURBO", "turbo")}
RELEASED_TEXT_ENCODER = "qwen3-vl"
RELEASED_AUTOENCODER = "qwen-image"


@dataclass
class CheckpointInfo:
    model_path: Path
    model: DiTConfig | None
    text_encoder: str
    autoencoder: str
    sampling: SamplingConfig
    resolution: int
    extra: dict = field(default_factory=dict)


def sampling_from_dict(d: dict | None, default: str = "raw") -> SamplingConfig:
    d = dict(d or {})
    preset = d.pop("preset", default)
    return sampling_preset(preset, **d)


def resolve_checkpoint(spec: str) -> CheckpointInfo:
    """`world`, `raw`, `turbo`, a krea2 checkpoint folder, or a released-layout .safetensors file."""
    if spec == "world":
        path = ASSETS / "world"
        if not (path / "model.safetensors").is_file():
            raise Krea2Error("the shipped world checkpoint is missing from this install (src/krea2/assets/world); "
                             "reinstall krea2 or pass --checkpoint DIR")
        return read_checkpoint_dir(path)
    if spec in RELEASED:
        env, preset = RELEASED[spec]
        value = os.environ.get(env)
        if not value:
            raise Krea2Error(f"--checkpoint {spec} needs the released file: set {env}=/path/to/krea-2-{spec}"
                             ".safetensors (download it from Hugging Face krea/Krea-2-" + spec.capitalize() + ")")
        return released_info(Path(value), preset)
    path = Path(spec)
    if path.is_dir():
        return read_checkpoint_dir(path)
    if path.suffix == ".safetensors" or path.exists():
        return released_info(path, "turbo" if "turbo" in path.name.lower() else "raw")
    raise Krea2Error(f"checkpoint not found: {spec} (use world, raw, turbo, a checkpoint folder or a "
                     ".safetensors file)")


def released_info(path: Path, preset: str) -> CheckpointInfo:
    if path.is_dir():
        return read_checkpoint_dir(path)
    return CheckpointInfo(path, None, RELEASED_TEXT_ENCODER, RELEASED_AUTOENCODER, sampling_preset(preset), 1024)


def read_checkpoint_dir(path: Path) -> CheckpointInfo:
    cfg_path, model_path = path / "config.json", path / "model.safetensors"
    if not cfg_path.is_file() or not model_path.is_file():
        raise Krea2Error(f"{path} is not a krea2 checkpoint folder (needs config.json and model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
        model_cfg = DiTConfig.from_dict(cfg["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise Krea2Error(f"{cfg_path} is not a valid krea2 config ({e}); it needs a 'model' block") from None
    return CheckpointInfo(model_path, model_cfg, cfg.get("text_encoder", RELEASED_TEXT_ENCODER),
                          cfg.get("autoencoder", RELEASED_AUTOENCODER), sampling_from_dict(cfg.get("sampling")),
                          int(cfg.get("resolution", 1024)), {k: v for k, v in cfg.items() if k not in {"model"}})


def write_checkpoint_dir(path: str | Path, model: DiT, text_encoder: str, autoencoder: str,
                         sampling: SamplingConfig | dict, resolution: int, dtype: torch.dtype | None = None,
                         extra: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sampling = asdict(sampling) if isinstance(sampling, SamplingConfig) else sampling
    save_dit(model, path / "model.safetensors", dtype=dtype)
    save_json({"model": model.cfg.to_dict(), "text_encoder": text_encoder, "autoencoder": autoencoder,
               "sampling": sampling, "resolution": resolution, **(extra or {})}, path / "config.json")
    return path


def save_random_checkpoint(path: str | Path, preset: str = "tiny-world", seed: int = 0, text_encoder: str = "minilm",
                           resolution: int = 32) -> Path:
    """A randomly initialised checkpoint folder: for tests and the untrained demo path."""
    torch.manual_seed(seed)
    model = DiT(get_config(preset))
    with torch.no_grad():  # zero-initialised gains/modulations would make every output identical; perturb them
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("mod.lin") or "modulation" in name:
                p.normal_(0, 0.02)
    sampling = {"steps": 8, "guidance": 1.5, "minres": resolution, "maxres": resolution * 5}
    return write_checkpoint_dir(path, model, text_encoder, "identity", sampling, resolution)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, as the release scales them."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


@dataclass
class Pipeline:
    model: DiT
    text_encoder: object
    autoencoder: object
    sampling: SamplingConfig
    resolution: int
    device: str = "cpu"

    @property
    def pixels_per_token(self) -> int:
        return self.autoencoder.compression * self.model.cfg.patch

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = self.text_encoder.encode(prompts)
        return states.to(self.device, self.model.first.weight.dtype), mask.to(self.device)

    def snap_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """Round sides up to a multiple of the token size, saying so, like the release."""
        m = self.pixels_per_token
        out = []
        for name, v in (("width", width or self.resolution), ("height", height or self.resolution)):
            if v <= 0:
                raise Krea2Error(f"{name} must be positive, got {v}")
            r = math.ceil(v / m) * m
            if r != v:
                print(f"note: {name} {v} is not a multiple of {m}; using {r}", file=sys.stderr)
            out.append(r)
        return out[0], out[1]

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 mu: float | None = None, width: int | None = None, height: int | None = None,
                 batch_size: int = 16, progress: bool = False) -> list[Image.Image]:
        """One image per prompt; image i uses noise seeded seed + i."""
        if not prompts:
            raise Krea2Error("no prompts given; pass at least one prompt")
        cfg = SamplingConfig(**{**asdict(self.sampling), **{k: v for k, v in
                                (("steps", steps), ("guidance", guidance), ("mu", mu)) if v is not None}})
        width, height = self.snap_size(width, height)
        f, p = self.autoencoder.compression, self.model.cfg.patch
        h, w = height // f, width // f
        gh, gw = h // p, w // p
        ts = schedule(gh * gw, cfg, self.pixels_per_token)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=math.ceil(len(prompts) / batch_size) * cfg.steps, desc="sampling", unit="step")
        images = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ctx, cmask = self.encode(chunk)
            cond = Conditioning.build(ctx, cmask, gh, gw)
            uncond = None
            if cfg.guidance != 0:
                uctx, umask = self.encode([""])
                uncond = Conditioning.build(uctx.expand(len(chunk), -1, -1, -1), umask.expand(len(chunk), -1), gh, gw)
            noise = initial_noise(len(chunk), self.model.cfg.channels, h, w, seed + start, device=self.device)
            x = euler_sample(self.model, patchify(noise, p), ts, cond, uncond, cfg.guidance,
                             progress=(lambda _: bar.update(1)) if bar else None)
            latent = unpatchify(x, p, h, w)
            images += to_pil(self.autoencoder.decode(latent.to(self.device)))
        if bar:
            bar.close()
        return images


def load_pipeline(checkpoint: str = "world", device: str = "cpu", dtype: torch.dtype | None = None,
                  text_encoder: str | None = None, autoencoder: str | None = None) -> Pipeline:
    from krea2.models.autoencoders import load_autoencoder
    from krea2.models.text_encoders import load_text_encoder

    info = resolve_checkpoint(checkpoint)
    model = load_dit(info.model_path, info.model, dtype=dtype or torch.float32, device=device)
    te = load_text_encoder(text_encoder or info.text_encoder, device=device)
    ae = load_autoencoder(autoencoder or info.autoencoder, device=device)
    if te.dim != model.cfg.txtdim or te.n_layers != model.cfg.txtlayers:
        raise Krea2Error(f"text encoder gives {te.n_layers} layers x {te.dim} but the model expects "
                         f"{model.cfg.txtlayers} x {model.cfg.txtdim}; use the checkpoint's own text encoder")
    if ae.channels != model.cfg.channels:
        raise Krea2Error(f"autoencoder has {ae.channels} channels but the model expects {model.cfg.channels}")
    return Pipeline(model, te, ae, info.sampling, info.resolution, device)


def image_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images into one picture (white gutters), row-major."""
    if not images:
        raise Krea2Error("no images to tile")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid
