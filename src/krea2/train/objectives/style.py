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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from krea2.errors import Krea2Error
from krea2.style import BACKBONE_DIR, INJECTIONS, StyleEncoder, load_style_encoder, style_adapter_dir
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
    # config's image_size; a Qwen-VL tower takes side (a multiple of its patch x merge, e.g. 448). PATH is relative
    # to the working directory; the adapter folder keeps the backbone's weights (style_encoder.safetensors) and
    # architecture (backbone/config.json), so it loads alone, at the backbone's size
    backbone: str = ""
    train_backbone: bool = False
    # > 0: add teacher_weight x ||v - v_teacher||², v_teacher the frozen base (adapters off, no reference) reading
    # the caption with the style and background in words (triplets' `styled` captions): the reference learns to do
    # what those words do (BENCHMARKS.md "Style references")
    teacher_weight: float = 0.0
    # start from a saved style adapter (world or a style / style_po folder): its encoder (whose shape wins over the
    # fields above) and its LoRA as [stages.lora] weights
    adapter: str = ""

    def __post_init__(self):
        super().__post_init__()
        if self.tokens < 1 or self.patch < 1 or self.width % self.heads:
            raise ValueError(f"style needs tokens >= 1 and width divisible by heads, got tokens {self.tokens}, width "
                             f"{self.width}, heads {self.heads}")
        if not self.backbone and self.side % self.patch:
            raise ValueError(f"style side {self.side} is not divisible by patch {self.patch} (the pixel-patch "
                             "encoder's patches tile the reference)")
        if self.backbone and (not self.backbone.startswith("hf:") or not self.backbone[3:].strip()):
            raise ValueError(f"style backbone {self.backbone!r}: use hf:PATH (a local transformers folder) or leave it "
                             "empty for the pixel-patch encoder")
        if self.injection not in INJECTIONS:
            raise ValueError(f"style injection {self.injection!r} unknown; choose one of {list(INJECTIONS)}")
        if self.adapter_width < 1:
            raise ValueError(f"adapter_width must be >= 1, got {self.adapter_width}")
        if self.train_backbone and not self.backbone:
            raise ValueError("train_backbone needs backbone = hf:PATH")
        if not (self.teacher_weight >= 0 and self.teacher_weight < float("inf")):
            raise ValueError(f"teacher_weight must be a finite number >= 0, got {self.teacher_weight}")
        if self.adapter and self.backbone:
            raise ValueError("adapter and backbone exclude each other: a saved adapter brings its own encoder")


    def check_files(self, model) -> None:
        """--validate (where it checks paths): the adapter it starts from, or the vision backbone's folder (config
        and safetensors; weights are read when the stage starts)."""
        if self.adapter:
            load_adapter(self.adapter, model.features, needs_reader=False)
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
        if cfg.adapter:
            self.encoder = load_adapter(cfg.adapter, env.model.features, needs_reader=False).train()
            self.encoder.requires_grad_(True)
            if cfg.injection != self.encoder.config["injection"]:
                raise Krea2Error(f"style adapter {cfg.adapter} injects as {self.encoder.config['injection']!r}, not "
                                 f"{cfg.injection!r}; a saved adapter brings its own injection, leave injection "
                                 "out or match it")
            return
        backbone = None
        if cfg.backbone:
            from krea2.models.vision import VisionBackbone, load_vision_backbone

            backbone = VisionBackbone(*load_vision_backbone(cfg.backbone[3:]), side=cfg.side)
        self.encoder = StyleEncoder(env.model.features, cfg.tokens, cfg.patch, cfg.width, cfg.heads, cfg.side,
                                    cfg.injection, env.model.layers, cfg.adapter_width, backbone, cfg.train_backbone)

    @classmethod
    def data_options(cls, cfg: StyleConfig) -> dict:
        return {"styled": True} if cfg.teacher_weight else {}  # the teacher reads the captions naming the style

    @classmethod
    def lora_config(cls, cfg: StyleConfig, lora):
        """Starting from a saved adapter, its LoRA starts the stage's adapters; and a teacher needs adapters that
        leave the base as it is when switched off."""
        if cfg.adapter:
            lora = adapter_lora_config(cfg.adapter, lora)
        if cfg.teacher_weight and lora is not None and lora.init in ("pissa", "olora"):
            raise Krea2Error(f"teacher_weight needs a [stages.lora] init that leaves the base as it is, not "
                             f"{lora.init}")
        return lora

    def loss(self, models: Models, batch: TripletBatch, step: int, generator: torch.Generator
             ) -> tuple[Tensor, dict]:
        B, N, _ = batch.x0.shape
        device = batch.x0.device
        t = self.timesteps(B, N, generator, device)
        noise = torch.randn(batch.x0.shape, generator=generator, device=device)
        v = self.velocity(models.policy, batch.x0, noise, t, batch.context, batch.txtmask, batch.gh, batch.gw,
                          reference=self.encoder(batch.images_ref), adapter=self.encoder.adapter)
        flow = flow_matching_loss(v, batch.x0, noise)
        metrics = {"loss/flow": flow.detach()}
        if not self.cfg.teacher_weight:
            return flow, metrics
        if batch.context_styled is None:
            raise Krea2Error("teacher_weight needs triplets with styled captions (the world triplets source)")
        from krea2.train.lora import adapters_disabled

        with torch.no_grad(), adapters_disabled(models.policy):
            v_teacher = self.velocity(models.policy, batch.x0, noise, t, batch.context_styled, batch.txtmask_styled,
                                      batch.gh, batch.gw)
        teacher = (v.float() - v_teacher.float()).square().mean()
        metrics["loss/teacher"] = teacher.detach()
        return flow + self.cfg.teacher_weight * teacher, metrics

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


def load_adapter(spec: str, features: int, needs_reader: bool = True) -> StyleEncoder:
    """A saved style adapter to start a stage from (`krea2.style.load_style_encoder`), checked: made for a DiT of
    width `features` and, with needs_reader, with a reference LoRA or a block adapter (what a preference step
    trains). Its LoRA is dropped: the stage's `[stages.lora] weights` carry it (`adapter_lora_config`). One-line
    Krea2Error otherwise."""
    start = load_style_encoder(spec)
    width = start.config["features"]
    if width != features:
        raise Krea2Error(f"style adapter {spec} was trained for a DiT of width {width}, not {features}; train one "
                         "for this base")
    if needs_reader:
        start.check_reads_tokens(spec)
    start.lora = None
    return start


def adapter_lora_config(spec: str, lora):
    """[stages.lora] for a stage that starts from the saved adapter `spec`: its LoRA file as `weights` (so the
    trained adapters start as the saved ones). An adapter without one (a block-adapter encoder) trains without
    [stages.lora], or with a fresh one. Krea2Error for a LoRA the stage lacks or a `weights` that is not the
    adapter's."""
    weights = str(style_adapter_dir(spec) / "lora.safetensors")
    if not Path(weights).is_file():
        if lora is not None and lora.weights:
            raise Krea2Error(f"style adapter {spec} has no reference LoRA; leave [stages.lora] weights empty")
        return lora
    if lora is None:
        raise Krea2Error(f"style adapter {spec} has a reference LoRA: add [stages.lora] with its rank and targets")
    if lora.weights and Path(lora.weights).resolve() != Path(weights).resolve():
        raise Krea2Error(f"[stages.lora] weights {lora.weights} is not the adapter's LoRA {weights}; leave it "
                         "empty (the stage sets it)")
    return replace(lora, weights=weights)
