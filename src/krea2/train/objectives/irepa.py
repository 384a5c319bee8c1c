"""iREPA (arXiv 2512.10794): align an intermediate block's image tokens with a frozen vision encoder's patch
features of the clean image, through a 3×3 conv projector and spatially normalised teacher features.

A term any denoising objective can add (REPA's `loss.py` pattern): the objective owns the projector, asks the DiT
for the block's hidden states, and adds `weight(step) * irepa(hidden, images, gh, gw)` to its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krea2.errors import Krea2Error
from krea2.models.vision import VisionBackbone, load_vision_backbone


class HFVisionTeacher(nn.Module):
    """Patch tokens of a transformers vision backbone (`krea2.models.vision`: DINOv2/DINOv3, SigLIP, Qwen3-VL's
    vision tower) as a (B, D, g, g) grid."""

    def __init__(self, backbone: VisionBackbone):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.backbone.dim

    def features(self, images: Tensor) -> Tensor:
        tokens, g = self.backbone(images), self.backbone.grid
        return tokens.transpose(1, 2).reshape(len(images), -1, g, g)


class WorldTeacher(nn.Module):
    """The project's world encoder (trained on the world's labels): no downloads, any side 16-64."""

    def __init__(self):
        super().__init__()
        from krea2.eval.world_encoder import load_world_encoder

        self.encoder = load_world_encoder().eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.encoder.cfg.dim

    def features(self, images: Tensor) -> Tensor:
        return self.encoder.features(images)


@dataclass
class IREPAConfig:
    """`[stages.objective.irepa]`: `irepa = true` takes these defaults, `irepa = false` (or no table) turns it off."""

    until: int = 0  # steps of the stage with the alignment term on (ramped to 0 over the last 5%); 0: the whole stage
    layer: int = 2  # 1-based block whose image tokens are aligned
    weight: float = 0.5
    gamma: float = 0.6  # spatial normalisation strength of the teacher features
    teacher: str = "world"  # world (the project's world encoder) | hf:PATH (a transformers vision backbone)

    def __post_init__(self):
        if self.until < 0 or self.layer < 1 or not self.weight >= 0 or not 0 <= self.gamma <= 1:
            raise ValueError("irepa needs until >= 0, layer >= 1, weight >= 0 and gamma in [0, 1]")

    def check(self, layers: int, steps: int | None = None) -> None:
        if self.layer > layers:
            raise ValueError(f"irepa layer {self.layer} is outside 1..{layers}")
        if steps is not None and self.until > steps:
            raise ValueError(f"irepa until = {self.until} is past the stage's {steps} steps")
        if self.teacher != "world" and not self.teacher.startswith("hf:"):
            raise ValueError(f"irepa teacher {self.teacher!r} unknown; use world or hf:PATH")


def load_teacher(spec: str) -> nn.Module:
    if spec == "world":
        return WorldTeacher()
    if spec.startswith("hf:"):
        model, mean, std = load_vision_backbone(spec[3:])
        return HFVisionTeacher(VisionBackbone(model, mean, std))
    raise Krea2Error(f"unknown iREPA teacher {spec!r}; use world or hf:PATH")


def spatial_normalize(y: Tensor, gamma: float, eps: float = 1e-6) -> Tensor:
    """(y − γ·mean_tokens(y)) / (std_tokens(y) + eps), per sample and channel: stresses spatial contrast."""
    flat = y.flatten(2)
    mean, std = flat.mean(-1, keepdim=True), flat.std(-1, keepdim=True)
    return ((flat - gamma * mean) / (std + eps)).view_as(y)


class IREPA(nn.Module):
    def __init__(self, teacher: nn.Module, features: int, layer: int, weight: float, gamma: float, until: int):
        super().__init__()
        # kept outside the module tree: frozen, rebuilt from its spec, never in the optimizer or a checkpoint
        object.__setattr__(self, "teacher", teacher)
        self.projector = nn.Conv2d(features, teacher.dim, kernel_size=3, padding=1)
        self.layer, self.base_weight, self.gamma, self.until = layer, weight, gamma, until

    @classmethod
    def from_config(cls, cfg: IREPAConfig, features: int, stage_steps: int) -> IREPA:
        return cls(load_teacher(cfg.teacher), features, cfg.layer, cfg.weight, cfg.gamma, cfg.until or stage_steps)

    def _apply(self, fn, recurse=True):
        # the teacher is outside the module tree (no optimiser, no checkpoint) but must follow .to(device)
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def weight(self, step: int) -> float:
        """λ, ramped linearly to 0 over the last 5% of the aligned span, then off."""
        if step >= self.until:
            return 0.0
        ramp = max(1, int(0.05 * self.until))
        return self.base_weight * min(1.0, (self.until - step) / ramp)

    def forward(self, hidden: Tensor, images: Tensor, gh: int, gw: int) -> Tensor:
        """Mean negative cosine between projected DiT tokens (B, N, F) and the teacher grid resampled to (gh, gw)."""
        B, N, Fdim = hidden.shape
        p = self.projector(hidden.transpose(1, 2).reshape(B, Fdim, gh, gw).to(self.projector.weight.dtype))
        with torch.no_grad():
            y = self.teacher.features(images.float())
            if y.shape[-2:] != (gh, gw):
                y = F.interpolate(y, size=(gh, gw), mode="bilinear", align_corners=False)
            y = spatial_normalize(y.float(), self.gamma)
        return -F.cosine_similarity(p.float(), y, dim=1).mean()
