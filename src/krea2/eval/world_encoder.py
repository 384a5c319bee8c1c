"""A small CNN trained on world renders: FID features for the world and the world's iREPA teacher.

It learns the ground truth (background, style, and per grid cell the shape, colour and size), so its features
measure exactly what the world is about, with no downloaded network. Weights ship in krea2/assets.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from krea2.data import world
from krea2.errors import Krea2Error

ASSET = Path(__file__).resolve().parents[1] / "assets" / "world_encoder.safetensors"
CELL_CLASSES = {"shape": world.SHAPES, "color": tuple(world.COLORS), "size": world.SIZES}  # class 0 = empty cell


@dataclass
class WorldEncoderConfig:
    width: int = 24  # channels of the stride-1 stage; doubled at stride 2
    dim: int = 96  # feature channels D at stride 4


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU())


class WorldEncoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1], any side 16-64 -> patch features (B, D, H/4, W/4)."""

    def __init__(self, cfg: WorldEncoderConfig = WorldEncoderConfig()):
        super().__init__()
        self.cfg = cfg
        w, d = cfg.width, cfg.dim
        self.body = nn.Sequential(_conv(3, w), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w), _conv(2 * w, d, 2),
                                  _conv(d, d), nn.Conv2d(d, d, 3, 1, 1))
        self.background = nn.Linear(d, len(world.BACKGROUNDS))
        self.style = nn.Linear(d, len(world.STYLES))
        self.cell = nn.ModuleDict({k: nn.Linear(d, len(v) + 1) for k, v in CELL_CLASSES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D): the FID feature."""
        return self.features(images).mean((2, 3))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        g = f.mean((2, 3))
        cells = F.adaptive_avg_pool2d(F.gelu(f), 3).flatten(2).transpose(1, 2)  # (B, 9, D) in POSITIONS order
        return {"background": self.background(g), "style": self.style(g),
                **{k: head(cells) for k, head in self.cell.items()}}


# ----------------------------------------------------------------------------------------------------- data
def to_tensor(images) -> torch.Tensor:
    """uint8 (B, H, W, 3) array or list of PIL/arrays -> float (B, 3, H, W) in [-1, 1]."""
    a = np.stack([np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1


def scene_labels(scene: world.Scene) -> dict[str, list]:
    cells = {k: [0] * 9 for k in CELL_CLASSES}
    for o in scene.objects:
        p = world.POSITIONS.index(o.position)
        for k, values in CELL_CLASSES.items():
            cells[k][p] = values.index(getattr(o, k)) + 1
    return {"background": list(world.BACKGROUNDS).index(scene.background),
            "style": world.STYLES.index(scene.style), **cells}


def labelled_batch(rng: np.random.Generator, n: int, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes = [world.sample_scene(rng) for _ in range(n)]
    images = to_tensor([world.render(s, size, int(rng.integers(2**31))) for s in scenes])
    labels = [scene_labels(s) for s in scenes]
    return images, {k: torch.tensor([lab[k] for lab in labels]) for k in labels[0]}


def losses(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(F.cross_entropy(out[k].reshape(-1, out[k].shape[-1]), labels[k].reshape(-1)) for k in out)


@torch.no_grad()
def accuracy(model: WorldEncoder, sizes=(16, 32, 64), n: int = 300, seed: int = 999) -> dict[str, float]:
    """Held-out accuracy per label (cells: all nine), and the fraction of images read entirely right."""
    model.eval()
    rng = np.random.default_rng(seed)
    hits: dict[str, list[float]] = {}
    for size in sizes:
        images, labels = labelled_batch(rng, n, size)
        out = model(images)
        all_right = torch.ones(n, dtype=torch.bool)
        for k, logits in out.items():
            right = logits.argmax(-1) == labels[k]
            hits.setdefault(k, []).append(right.float().mean().item())
            all_right &= right if right.dim() == 1 else right.all(-1)
        hits.setdefault(f"scene@{size}", []).append(all_right.float().mean().item())
    return {k: round(float(np.mean(v)), 4) for k, v in hits.items()}


def train_world_encoder(steps: int = 900, batch: int = 32, lr: float = 2e-3, seed: int = 0,
                        sizes=(16, 32, 32, 64), log_every: int = 100, val_n: int = 300) -> tuple[WorldEncoder, dict]:
    """Train on fresh renders at mixed sides (a few minutes on CPU); light noise keeps features steady on samples."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = WorldEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(steps):
        model.train()
        images, labels = labelled_batch(rng, batch, sizes[step % len(sizes)])
        images = images + 0.03 * torch.randn_like(images)
        loss = losses(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return model, {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "seconds": round(time.perf_counter() - t0),
                   "val_accuracy": accuracy(model, n=val_n)}


def save_world_encoder(model: WorldEncoder, info: dict, path: str | Path = ASSET) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"config": asdict(model.cfg), **info}, indent=1) + "\n")
    return path


def load_world_encoder(path: str | Path = ASSET, device: str = "cpu") -> WorldEncoder:
    """The shipped, frozen encoder (eval mode, no gradients)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"world encoder weights not found at {path}; train them with "
                                "`krea2 eval train-encoder`")
    meta = json.loads(path.with_suffix(".json").read_text())
    model = WorldEncoder(WorldEncoderConfig(**meta["config"]))
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise Krea2Error(f"{path} does not match the world encoder ({str(e).splitlines()[0]}); retrain it") from None
    return model.to(device).eval().requires_grad_(False)
