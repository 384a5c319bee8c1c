"""Style-reference training: a style encoder learns to carry a reference's style into a frozen base model.

Self-supervised, as the Krea 2 report describes its style system (its encoder, injection and mixing were not
disclosed): each example is a target, a reference that shares the target's style (and background) but not its
content, and the target's caption without style words (the world's short captions name objects only), so the
style can only come from the reference. The reference's tokens (`krea2.style.StyleEncoder`) join the joint
sequence as the reference segment; the loss is flow matching on the target (`flow.Denoising`'s timesteps). The
base model is frozen (`trains_policy = False`): the encoder trains, and with `[stages.lora]` a LoRA on the base too
(a frozen base has never attended to a reference segment and ignores it; measured in BENCHMARKS.md). At sampling the
LoRA runs in the reference passes only (`krea2.style.reference_lora`), so the release path without a reference is
the base model exactly. `injection = "adapter"` trains a per-block adapter (`krea2.style.BlockAdapter`, zero-
initialised outputs) instead of using the segment; `backbone = "hf:PATH"` reads references with a transformers
vision backbone (`krea2.models.vision`), frozen unless `train_backbone`. The stage writes
`style_encoder.safetensors` and `style.json` beside its output (and `backbone/config.json`, the backbone's
architecture), and the trainer writes the adapters as `lora.safetensors` in the same folder
(`krea2.style.load_style_encoder` reads all).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from krea2.style import BACKBONE_DIR, INJECTIONS, StyleEncoder
from krea2.train.data import TripletBatch
from krea2.train.objectives.base import Models
from krea2.train.objectives.flow import Denoising, TimestepConfig, flow_matching_loss

ENCODER_FILE, CONFIG_FILE = "style_encoder.safetensors", "style.json"


@dataclass
class StyleConfig(TimestepConfig):
    name: str = "style"
    tokens: int = 4  # reference tokens per reference
    patch: int = 4  # pixel patches the encoder reads
    width: int = 128
    heads: int = 4
    side: int = 32  # references are resized to side x side
    # segment: the tokens join the joint sequence (with a [stages.lora] to read them); adapter: per-block
    # cross-attention with zero-initialised outputs (krea2.style.BlockAdapter), adapter_width wide
    injection: str = "segment"
    adapter_width: int = 64
    # "": the world's pixel-patch encoder; hf:PATH: a transformers vision backbone's patch tokens (SigLIP, DINOv2,
    # Qwen3-VL's vision tower; krea2.models.vision), frozen unless train_backbone. ViT-like backbones take their
    # config's image_size; a Qwen-VL tower takes side (a multiple of its patch x merge, e.g. 448)
    backbone: str = ""
    train_backbone: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.tokens < 1 or self.patch < 1 or self.side % self.patch or self.width % self.heads:
            raise ValueError("style needs tokens >= 1, side divisible by patch and width divisible by heads")
        if self.backbone and not self.backbone.startswith("hf:"):
            raise ValueError(f"style backbone {self.backbone!r}: use hf:PATH (a local transformers folder) or leave it "
                             "empty for the pixel-patch encoder")
        if self.injection not in INJECTIONS:
            raise ValueError(f"style injection {self.injection!r} unknown; choose one of {list(INJECTIONS)}")
        if self.adapter_width < 1:
            raise ValueError(f"adapter_width must be >= 1, got {self.adapter_width}")
        if self.train_backbone and not self.backbone:
            raise ValueError("train_backbone needs backbone = hf:PATH")


    def check_files(self, model) -> None:
        """--validate (where it checks paths): the vision backbone's folder (config and safetensors; weights are
        read when the stage starts)."""
        if self.backbone:
            from krea2.models.vision import check_vision_backbone, input_side

            input_side(check_vision_backbone(self.backbone[3:]), self.side)


class StyleAdapter(Denoising):
    Config = StyleConfig
    name = "style"
    data_kind = "triplets"
    guard_metric = "loss"
    trains_policy = False

    def __init__(self, cfg: StyleConfig, env):
        super().__init__(cfg, env)
        backbone = None
        if cfg.backbone:
            from krea2.models.vision import VisionBackbone, load_vision_backbone

            backbone = VisionBackbone(*load_vision_backbone(cfg.backbone[3:]), side=cfg.side)
        self.encoder = StyleEncoder(env.model.features, cfg.tokens, cfg.patch, cfg.width, cfg.heads, cfg.side,
                                    cfg.injection, env.model.layers, cfg.adapter_width, backbone, cfg.train_backbone)

    def loss(self, models: Models, batch: TripletBatch, step: int, generator: torch.Generator
             ) -> tuple[Tensor, dict]:
        B, N, _ = batch.x0.shape
        device = batch.x0.device
        t = self.timesteps(B, N, generator, device)
        noise = torch.randn(batch.x0.shape, generator=generator, device=device)
        v = self.velocity(models.policy, batch.x0, noise, t, batch.context, batch.txtmask, batch.gh, batch.gw,
                          reference=self.encoder(batch.images_ref), adapter=self.encoder.adapter)
        loss = flow_matching_loss(v, batch.x0, noise)
        return loss, {"loss/flow": loss.detach()}

    def export(self, stage_dir, write: bool) -> None:
        export_style_encoder(self.encoder, stage_dir, write)


def export_style_encoder(encoder: StyleEncoder, stage_dir, write: bool) -> None:
    """style_encoder.safetensors and style.json into stage_dir (crash-safe; gathered on every rank, written where
    `write`): what `krea2.style.load_style_encoder` reads beside the stage's lora.safetensors."""
    from safetensors.torch import save_file

    from krea2.models.loading import atomic_write

    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
          for k, v in encoder.state_dict().items()}
    if not write:
        return
    stage_dir = Path(stage_dir)
    atomic_write(stage_dir / ENCODER_FILE, lambda tmp: save_file(sd, tmp))
    if encoder.backbone is not None:  # its architecture; the weights are in the encoder's file
        (stage_dir / BACKBONE_DIR).mkdir(exist_ok=True)
        text = encoder.backbone.model.config.to_json_string()
        atomic_write(stage_dir / BACKBONE_DIR / "config.json", lambda tmp: Path(tmp).write_text(text))
    atomic_write(stage_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(encoder.config, indent=1) + "\n"))
