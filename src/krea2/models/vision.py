"""transformers vision backbones as patch-feature extractors: SigLIP / SigLIP 2, DINOv2 / DINOv3, CLIP, and the
vision tower of Qwen3-VL (Krea 2's text encoder family), loaded offline from a local folder, weights from
safetensors only.

`load_vision_backbone(path)` takes a folder as `save_pretrained` writes it: a vision model (Dinov2Model,
SiglipVisionModel), a dual or multimodal model (SiglipModel, CLIPModel, Qwen3VLForConditionalGeneration), from which
only the vision tower's tensors are read (found by the suffix of the tower's own tensor names, so any wrapping prefix
- `vision_model.`, `model.visual.` - works). `VisionBackbone` turns it into images (B, 3, H, W) in [-1, 1] -> patch
tokens (B, P, hidden) in row order: iREPA's teacher (`train/objectives/irepa.py`) and the style encoder's
backbone (`krea2.style`) use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krea2.errors import Krea2Error

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
QWEN_VISION = ("qwen3_vl_vision", "qwen3_vl_moe_vision", "qwen2_5_vl_vision", "qwen2_vl_vision")


def tower_prefix(names, wanted) -> str | None:
    """The prefix under which a wrapping model's tensor names (`names`) hold every name of `wanted` (the tower's
    own): "", `vision_model.`, `visual.`, `model.visual.`...; None if there is none."""
    names, first = set(names), next(iter(wanted))
    for prefix in {k[: len(k) - len(first)] for k in names if k.endswith(first)}:
        if (prefix == "" or prefix.endswith(".")) and all(prefix + k in names for k in wanted):
            return prefix
    return None


def _vision_config(cfg):
    return getattr(cfg, "vision_config", None) or cfg


def check_vision_backbone(path: str | Path):
    """The cheap checks of a backbone folder (config.json that transformers reads, safetensors weights), without
    loading weights: what `krea2 train --validate` runs. Returns the config; one-line Krea2Error otherwise."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise Krea2Error(f"vision backbone {str(path)!r} not found locally (no config.json); nothing is downloaded "
                         "at run time: fetch it first (`hf download google/siglip-base-patch16-224 --local-dir "
                         "models/siglip`) and pass the folder (hf:models/siglip)")
    if not any(path.glob("*.safetensors")):
        raise Krea2Error(f"{path} holds no .safetensors weights (pickled weights are not loaded for safety); convert "
                         "them once: load the model with transformers and save_pretrained it to a new folder")
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise Krea2Error(f"{path}/config.json is not a transformers config ({type(e).__name__}: {e})") from None
    if not hasattr(_vision_config(cfg), "patch_size"):
        raise Krea2Error(f"{path} is a {cfg.model_type} model without a vision tower; pass a SigLIP, DINOv2, CLIP or "
                         "Qwen-VL folder")
    return cfg


def load_vision_backbone(path: str | Path) -> tuple[nn.Module, tuple, tuple]:
    """A local transformers folder -> (the vision tower with its weights, mean, std of its input normalisation).

    A dual or multimodal model's tower is built alone and its tensors read from the shards by name (a Qwen3-VL
    folder's language model is never loaded); where transformers renames tensors on load (older layouts), the whole
    model loads and the tower is taken from it. The normalisation comes from the folder's preprocessor_config.json
    (image_mean / image_std) when it has one, else ImageNet statistics for DINO models and 0.5 / 0.5 for the rest
    (SigLIP, Qwen-VL). Raises Krea2Error as `check_vision_backbone`, or for weights that lack the tower."""
    from safetensors import safe_open
    from transformers import AutoModel

    path = Path(path)
    cfg = check_vision_backbone(path)
    vcfg = _vision_config(cfg)
    try:
        if vcfg is cfg:
            model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        else:
            model = AutoModel.from_config(vcfg)
            wanted, shard = model.state_dict(), {}
            for file in sorted(path.glob("*.safetensors")):  # headers only: where each tensor lives
                with safe_open(str(file), "pt") as f:
                    shard |= dict.fromkeys(f.keys(), file)
            prefix = tower_prefix(shard, wanted)
            if prefix is not None:
                found = {}
                for file in sorted(set(shard[prefix + k] for k in wanted)):
                    with safe_open(str(file), "pt") as f:
                        found |= {k: f.get_tensor(prefix + k) for k in wanted if shard[prefix + k] == file}
            else:  # renamed on load (an older layout): take the tower from the loaded model
                full = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).state_dict()
                prefix = tower_prefix(full, wanted)
                if prefix is None:
                    raise Krea2Error(f"{path}'s weights do not hold its vision tower; is the folder complete?")
                found = {k: full[prefix + k] for k in wanted}
            model.load_state_dict(found)
    except (ValueError, KeyError, OSError) as e:
        raise Krea2Error(f"{path} does not load as a transformers model ({type(e).__name__}: {e})") from None
    mean, std = IMAGENET if "dino" in vcfg.model_type else HALF
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        spec = json.loads(pre.read_text())
        mean, std = tuple(spec.get("image_mean", mean)), tuple(spec.get("image_std", std))
    return model.eval(), tuple(mean), tuple(std)


def input_side(cfg, side: int | None = None) -> int:
    """The side (px) a vision tower's input is resized to: a ViT's config image_size; for a Qwen-VL tower `side`
    (default 4 merge windows), which must be a multiple of patch x merge and at least 4 patches. Krea2Error
    otherwise."""
    cfg = _vision_config(cfg)
    if cfg.model_type not in QWEN_VISION:
        return cfg.image_size
    unit = cfg.patch_size * cfg.spatial_merge_size
    side = side or unit * 4
    if side % unit or side < 4 * cfg.patch_size:
        raise Krea2Error(f"a {cfg.model_type} backbone needs a side divisible by patch x merge = {unit} and at least "
                         f"4 patches ({4 * cfg.patch_size} px), got {side}; set the style stage's side (e.g. 448)")
    return side


class VisionBackbone(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> patch tokens (B, g·g, hidden), g = side / patch, in row order.

    ViT-like models (DINOv2, SigLIP, CLIP) get `pixel_values` at their config's image_size and return their last
    hidden state without the CLS / register tokens that precede the patches; Qwen-VL vision towers get the
    processor's flattened patches (temporal patch repeated, 2 x 2 merge windows in order) at `side` (a multiple of
    patch x merge) and return their pre-merger hidden states back in row order. `before` (B, 3, s, s) -> same, if
    given, runs on the resized image (the style encoder rearranges tiles there)."""

    def __init__(self, model: nn.Module, mean=HALF[0], std=HALF[1], side: int | None = None):
        super().__init__()
        self.model = model
        cfg = model.config
        self.qwen = cfg.model_type in QWEN_VISION
        self.patch = cfg.patch_size
        if self.qwen:
            self.merge, self.temporal = cfg.spatial_merge_size, cfg.temporal_patch_size
        self.side = input_side(cfg, side)
        self.mean_std = (tuple(mean), tuple(std))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[None, :, None, None], persistent=False)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def grid(self) -> int:
        return self.side // self.patch

    def forward(self, images: Tensor, before=None) -> Tensor:
        x = F.interpolate((images.float() + 1) / 2, size=(self.side, self.side), mode="bilinear",
                          align_corners=False)
        if before is not None:
            x = before(x)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        g = self.grid
        if not self.qwen:
            return self.model(pixel_values=x).last_hidden_state[:, -g * g:]
        B, C, m, p = len(x), x.shape[1], self.merge, self.patch
        # Qwen2VLImageProcessor's layout: (t, C, gh/m, m, p, gw/m, m, p) -> rows (gh/m, gw/m, m, m), cols (C, t, p, p)
        t = x[:, None].expand(B, self.temporal, C, self.side, self.side)
        t = t.reshape(B, self.temporal, C, g // m, m, p, g // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = t.reshape(B * g * g, C * self.temporal * p * p)
        grid_thw = torch.tensor([[1, g, g]] * B, device=x.device)
        h = self.model(flat, grid_thw=grid_thw).last_hidden_state.reshape(B, g // m, g // m, m, m, -1)
        return h.permute(0, 1, 3, 2, 4, 5).reshape(B, g * g, -1)  # merge-window order back to row order
