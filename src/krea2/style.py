"""Style references: an encoder whose tokens join the DiT's joint sequence as a reference segment, and the control
math of the product (strength, weighted mixing of several references, negative references).

The release path is untouched when no reference is given: no reference segment, the same five DiT inputs. With
references, tokens (B, Nr, features) sit between text and image (`krea2.sampling.joint_inputs`), at RoPE positions
(1, i, j) so the DiT tells them from image tokens. Control, per sampling step (Krea 2's API: up to 4 references,
strength 0-1, a weight per reference, negative references):
- several positive references: their tokens averaged with the weights normalised to sum 1 (relative weights; the
  order of references does not matter; one reference at weight 1 is the single-reference path);
- strength s: v = v_base + s (v_ref - v_base), so s = 0 is exactly the base model (no reference pass is run) and
  s = 1 the reference-conditioned velocity;
- negative references (weight < 0): their own averaged tokens give v_neg, and v gains s·|w_neg|·(v_ref - v_neg), an
  image-CFG branch that pushes away from the negative style;
- a reference LoRA (trained with the encoder, `[stages.lora]` in the style stage) is active in the reference passes
  only: a frozen base never attends to a segment it was not trained with, so the adapter teaches the base's attention
  to read it, while v_base (and strength 0) stays the release model exactly.
The other injection the field uses, a per-block adapter with a zero-initialised output (IP-Adapter's decoupled
cross-attention, `BlockAdapter`; `injection = "adapter"` in a style stage), replaces the segment; its hooks run in
the reference passes only, so strength 0 stays the base model exactly with it too. Measured on the world with the same
recipe, the segment + reference LoRA won (style 0.441 against 0.402, content 0.365 against 0.328, with half the
trainable weights; BENCHMARKS.md "Style references"), so it is the default and the shipped adapter's injection.
Each v_* is the text-guided velocity of `krea2.sampling.guided_velocity` with the same reference in both branches,
so text guidance and style strength stay separate knobs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krea2.errors import Krea2Error
from krea2.sampling import Conditioning, guided_velocity

INJECTIONS = ("segment", "adapter")  # how style tokens enter the DiT (the module docstring)


def canonical_tiles(x: Tensor, tile: int) -> Tensor:
    """(B, C, S, S) with S divisible by tile -> the same tiles rearranged in one canonical order (sorted by mean
    value, a fixed projection breaking ties), so any rearrangement of the tiles gives the same image: a backbone that
    reads the result cannot see the reference's layout, only its tiles."""
    B, C, S, _ = x.shape
    g = S // tile
    t = x.unfold(2, tile, tile).unfold(3, tile, tile).permute(0, 2, 3, 1, 4, 5).reshape(B, g * g, C * tile * tile)
    w = torch.linspace(-1, 1, t.shape[-1], device=x.device, dtype=t.dtype)
    order = (t.mean(-1) + 1e-3 * (t * w).mean(-1)).argsort(dim=1, stable=True)
    t = t.gather(1, order[..., None].expand_as(t))
    return t.reshape(B, g, g, C, tile, tile).permute(0, 3, 1, 4, 2, 5).reshape(B, C, S, S)


class BlockAdapter(nn.Module):
    """Per-block decoupled cross-attention from image tokens to style tokens (IP-Adapter, arXiv 2308.06721), the
    alternative to the reference segment: after DiT block i, the image tokens h (B, N, features) gain
    o_i(softmax(q_i(LN h) k_i(r)ᵀ / √width) v_i(r)), r the style tokens (B or 1, Nr, features). Every o_i starts
    at zero, so a fresh adapter is the base model exactly and training starts from it. Attached from outside by
    forward hooks on `model.blocks` (`attached`), the DiT's code and its release path untouched."""

    def __init__(self, features: int, layers: int, width: int = 64):
        super().__init__()
        self.q = nn.ModuleList(nn.Linear(features, width, bias=False) for _ in range(layers))
        self.kv = nn.ModuleList(nn.Linear(features, 2 * width, bias=False) for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(width, features) for _ in range(layers))
        for o in self.o:
            nn.init.zeros_(o.weight)
            nn.init.zeros_(o.bias)

    def delta(self, i: int, h: Tensor, tokens: Tensor) -> Tensor:
        """Block i's addition to image tokens h (B, N, features), in h's dtype."""
        dtype = self.o[i].weight.dtype
        q = self.q[i](F.layer_norm(h.to(dtype), h.shape[-1:]))
        k, v = self.kv[i](tokens.to(dtype)).expand(len(h), -1, -1).chunk(2, dim=-1)
        return self.o[i](F.scaled_dot_product_attention(q, k, v)).to(h.dtype)

    def check(self, model: nn.Module) -> None:
        """Krea2Error unless the model has as many blocks as this adapter."""
        blocks = getattr(model, "blocks", None)
        if blocks is None or len(blocks) != len(self.q):
            raise Krea2Error(f"this style adapter was trained for a DiT with {len(self.q)} blocks; the model has "
                             f"{'none' if blocks is None else len(blocks)}")

    @contextmanager
    def attached(self, model: nn.Module, tokens: Tensor, n_image: int):
        """The model with this adapter after each block for the duration: the last n_image tokens of a block's
        output (the image segment) gain `delta`. Krea2Error if the model's block count differs."""
        self.check(model)
        blocks = model.blocks

        def hook(i):
            def add(module, args, out):
                return torch.cat([out[:, :-n_image], out[:, -n_image:] + self.delta(i, out[:, -n_image:], tokens)], 1)
            return add

        handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(blocks)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def reference_pass(model, tokens: Tensor, n_image: int, lora=None, adapter: BlockAdapter | None = None):
    """The model set up for a pass with style tokens (B or 1, Nr, features): the reference LoRA added and, with a
    block adapter, its hooks attached (yields None: no segment); without one, yields the tokens, to be the reference
    segment."""
    with reference_lora(model, lora):
        if adapter is None:
            yield tokens
            return
        with adapter.attached(model, tokens, n_image):
            yield None


class StyleEncoder(nn.Module):
    """Reference images (B, 3, H, W) in [-1, 1] -> style tokens (B, tokens, features) in the DiT's width.

    A set encoder: patch features are embedded on their own, with no position, and `tokens` learned queries pool the
    set by attention. As a function of the multiset of patches it cannot see where anything is: layout is discarded
    by construction (what StyleShot gets from shuffling patches), leaving what patches look like (stroke, texture,
    fill, background). The patches are either `patch` x `patch` pixel patches of the reference resized to `side`
    (the world's encoder, trained in the project), or the patch tokens of a transformers vision backbone
    (`backbone`, a `krea2.models.vision.VisionBackbone`: SigLIP, DINOv2, Qwen3-VL's vision tower; frozen unless
    `train_backbone`) whose input tiles are first put in a canonical order (`canonical_tiles`), so its position
    embeddings and attention see the same mosaic whatever the reference's layout. Which objects a reference holds
    can still show in its patch statistics; training pairs a target with a reference of the same style and other
    objects, under captions that name the target's objects, so copying the reference's objects only costs loss, and
    `krea2 eval style` measures the leakage that remains. `injection`: how the tokens enter the DiT (the module
    docstring; "adapter" adds a `BlockAdapter` for the DiT's `layers` blocks).
    """

    def __init__(self, features: int, tokens: int = 4, patch: int = 4, width: int = 128, heads: int = 4,
                 side: int = 32, injection: str = "segment", layers: int = 0, adapter_width: int = 64,
                 backbone: nn.Module | None = None, train_backbone: bool = False):
        super().__init__()
        if tokens < 1 or patch < 1 or width % heads or backbone is None and side % patch:
            raise Krea2Error(f"style encoder needs tokens >= 1, width divisible by heads and (without a backbone) "
                             f"side divisible by patch; got tokens {tokens}, width {width}, heads {heads}, "
                             f"side {side}, patch {patch}")
        if injection not in INJECTIONS:
            raise Krea2Error(f"style injection {injection!r} unknown; choose one of {list(INJECTIONS)}")
        if injection == "adapter" and (layers < 1 or adapter_width < 1):
            raise Krea2Error(f"a block adapter needs the DiT's layers >= 1 and adapter_width >= 1, got {layers} and "
                             f"{adapter_width}")
        if train_backbone and backbone is None:
            raise Krea2Error("train_backbone needs a backbone")
        self.patch, self.side = patch, side
        self.config = {"features": features, "tokens": tokens, "patch": patch, "width": width, "heads": heads,
                       "side": side, "injection": injection}
        if injection == "adapter":
            self.config.update(layers=layers, adapter_width=adapter_width)
        self.backbone, self.train_backbone = backbone, train_backbone
        if backbone is not None:
            mean, std = backbone.mean_std
            self.config["backbone"] = {"model_type": backbone.model.config.model_type, "side": backbone.side,
                                       "mean": list(mean), "std": list(std), "train": train_backbone}
            backbone.requires_grad_(train_backbone)
        inputs = backbone.dim if backbone is not None else 3 * patch * patch
        self.embed = nn.Sequential(nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, width))
        self.queries = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.pool = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, features))
        # per-block cross-attention in place of the reference segment (None: the tokens are the segment)
        self.adapter = BlockAdapter(features, layers, adapter_width) if injection == "adapter" else None
        self.lora = None  # the reference LoRA (krea2.models.lora.LoRA) trained with this encoder, if any

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None and not self.train_backbone:
            self.backbone.eval()  # a frozen backbone keeps its dropout off
        return self

    def requires_grad_(self, requires_grad: bool = True):
        super().requires_grad_(requires_grad)
        if self.backbone is not None and not self.train_backbone:
            self.backbone.requires_grad_(False)  # a frozen backbone stays frozen whatever trains around it
        return self

    def patches(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> the unordered patch set (B, P, inputs) the encoder pools."""
        if self.backbone is not None:
            return self.backbone(images, before=lambda x: canonical_tiles(x, self.backbone.patch))
        x = images.float()
        if x.shape[-2:] != (self.side, self.side):
            x = F.interpolate(x, size=(self.side, self.side), mode="area")
        return F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (B, P, 3·p²), row order dropped below

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise Krea2Error(f"style references must be (B, 3, H, W) images, got shape {tuple(images.shape)}")
        h = self.embed(self.patches(images).float())
        pooled, _ = self.pool(self.queries.expand(len(images), -1, -1), h, h, need_weights=False)
        return self.out(pooled)

    @property
    def injection_kwargs(self) -> dict:
        """How the tokens enter the DiT, as `mix_references` and `reference_pass` take it: {"lora", "adapter"}."""
        return {"lora": self.lora, "adapter": self.adapter}

    def check_reads_tokens(self, what: str) -> None:
        """Krea2Error unless something makes the base read the tokens (a reference LoRA or a block adapter): what a
        preference step trains. `what` names the adapter in the message."""
        if self.lora is None and self.adapter is None:
            raise Krea2Error(f"style adapter {what} has neither a reference LoRA (lora.safetensors) nor a block "
                             "adapter, so the base model ignores its tokens; train it with [stages.lora] or "
                             "injection = \"adapter\"")


@dataclass
class StyleMix:
    """What sampling needs from a set of references: the positive and negative averaged tokens (1, Nr, features)
    (None where there are none), the negative references' total weight, the strength, and the reference LoRA that the
    reference passes run with (None: the base model reads the segment as it is) and the block adapter that takes
    the tokens instead of the segment (None: the tokens are the segment)."""

    positive: Tensor | None
    negative: Tensor | None
    negative_weight: float
    strength: float
    lora: object | None = None
    adapter: BlockAdapter | None = None


def mix_references(tokens: Sequence[Tensor], weights: Sequence[float], strength: float, lora=None,
                   adapter: BlockAdapter | None = None) -> StyleMix:
    """Style tokens of each reference ((1, Nr, features) or (Nr, features)) with their weights -> a StyleMix.

    Positive weights are normalised to sum 1 (relative), negative ones likewise among themselves, their total
    magnitude kept as the push-away scale. lora, adapter: the encoder's reference LoRA and block adapter
    (`StyleEncoder.lora`, `.adapter`; pass `**encoder.injection_kwargs`). Raises
    Krea2Error for mismatched lengths, non-finite or all-zero weights, a strength outside [0, 1], or more than 10
    references (the API's limit)."""
    import math

    if len(tokens) != len(weights):
        raise Krea2Error(f"{len(tokens)} style references but {len(weights)} weights; give one weight each")
    if len(tokens) > 10:
        raise Krea2Error(f"{len(tokens)} style references; at most 10")
    if not all(math.isfinite(w) for w in weights) or (weights and not any(weights)):
        raise Krea2Error(f"style reference weights must be finite and not all zero, got {list(weights)}")
    if not (math.isfinite(strength) and 0 <= strength <= 1):
        raise Krea2Error(f"style strength must be in [0, 1], got {strength}")

    def average(sign: int) -> tuple[Tensor | None, float]:
        chosen = [(t.reshape(1, *t.shape[-2:]), abs(w)) for t, w in zip(tokens, weights) if w * sign > 0]
        total = sum(w for _, w in chosen)
        if not chosen:
            return None, 0.0
        return sum(t * (w / total) for t, w in chosen), total

    positive, _ = average(1)
    negative, negative_weight = average(-1)
    if (lora is not None or adapter is not None) and negative is not None and positive is None:
        # the push-away term would also push against the LoRA's (or adapter's) own shift (v_ref is the base without it)
        raise Krea2Error("negative style references alone cannot be used with this style encoder (it has a "
                         "reference LoRA or block adapter); add a positive reference")
    return StyleMix(positive, negative, negative_weight, float(strength), lora, adapter)


def with_reference(cond: Conditioning, tokens: Tensor, gh: int, gw: int) -> Conditioning:
    """A branch's conditioning (text and image segments) with the reference segment added, tokens (1, Nr, features)
    broadcast over the batch."""
    txtmask = cond.mask[:, :cond.context.shape[1]]
    return Conditioning.build(cond.context, txtmask, gh, gw, reference=tokens.expand(len(txtmask), -1, -1))


def styled_velocity(model: Callable, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None,
                    guidance: float, mix: StyleMix | None, gh: int, gw: int) -> Tensor:
    """The velocity with the style control of the module docstring; mix None or strength 0: the base velocity
    (`guided_velocity`, no reference pass)."""
    v_base = guided_velocity(model, x, t, cond, uncond, guidance)
    if mix is None or mix.strength == 0 or mix.positive is None and mix.negative is None:
        return v_base

    def with_tokens(tokens: Tensor) -> Tensor:
        tokens = tokens.to(device=x.device, dtype=x.dtype)
        with reference_pass(model, tokens, x.shape[1], mix.lora, mix.adapter) as segment:
            if segment is None:
                return guided_velocity(model, x, t, cond, uncond, guidance)
            c = with_reference(cond, segment, gh, gw)
            u = None if uncond is None else with_reference(uncond, segment, gh, gw)
            return guided_velocity(model, x, t, c, u, guidance)

    v_ref = with_tokens(mix.positive) if mix.positive is not None else v_base
    v = v_base + mix.strength * (v_ref - v_base)
    if mix.negative is not None:
        v = v + mix.strength * mix.negative_weight * (v_ref - with_tokens(mix.negative))
    return v


REFERENCE_LORA = "style-reference"  # the name the reference LoRA is applied under, for the reference passes only


@contextmanager
def reference_lora(model, lora):
    """The model with the reference LoRA added for the duration (forward hooks, weights untouched; nothing when lora
    is None). Krea2Error if the model is not a plain module the hooks can go on."""
    if lora is None:
        yield
        return
    from krea2.models.lora import apply_lora, unload_lora

    if not isinstance(model, nn.Module):
        raise Krea2Error("a style encoder with a reference LoRA needs the DiT module itself as the sampler's model")
    apply_lora(model, lora, 1.0, REFERENCE_LORA)
    try:
        yield
    finally:
        unload_lora(model, REFERENCE_LORA)


def check_style_encoder(encoder: StyleEncoder, model: nn.Module) -> None:
    """A style encoder must fit the DiT it will run on: its width, its block adapter's block count, its reference
    LoRA's module names and shapes, and the DiT must not be 8-bit for a LoRA (the hooks compute in the adapted
    weight's dtype); one-line Krea2Error otherwise. Call it once the pipeline is loaded, before sampling."""
    features = getattr(getattr(model, "cfg", None), "features", None)
    if features is not None and features != encoder.config["features"]:
        raise Krea2Error(f"this style adapter was trained for a DiT of width {encoder.config['features']}, the model "
                         f"is {features} wide; train one for this base")
    if encoder.adapter is not None:
        encoder.adapter.check(model)
    if encoder.lora is None:
        return
    from krea2.models.lora import check_lora

    check_lora(encoder.lora, model)


def style_adapter_dir(spec) -> Path:
    """The folder of a style adapter spec: `world` (the shipped adapter) or a path."""
    return Path(__file__).resolve().parent / "assets" / "world_style" if str(spec) == "world" else Path(spec)


def load_style_encoder(folder, device="cpu") -> StyleEncoder:
    """`world` (the adapter shipped for the `world` checkpoint) or the folder a `style` stage wrote
    (style_encoder.safetensors + style.json, and lora.safetensors when it trained a reference LoRA).
    Raises Krea2Error for a missing or damaged folder."""
    import json

    from krea2.models.loading import read_safetensors

    shipped, folder = str(folder) == "world", style_adapter_dir(folder)
    if shipped and not (folder / "style.json").is_file():
        raise Krea2Error(f"the world style adapter is not in this install ({folder}); build it with "
                         "`make world-style`")
    cfg_file, weights = folder / "style.json", folder / "style_encoder.safetensors"
    if not folder.exists():
        raise Krea2Error(f"style adapter {folder} does not exist; train one (`make world-style`: recipes/"
                         "world-style.toml) or pass world")
    if not cfg_file.is_file() or not weights.is_file():
        raise Krea2Error(f"{folder} holds no style encoder (style.json and style_encoder.safetensors); pass the "
                         "folder of a style / style_po training stage (runs/OUT/STAGE)")
    try:
        cfg = json.loads(cfg_file.read_text())
        backbone = cfg.pop("backbone", None)
        if backbone is not None:
            cfg.update(backbone=saved_backbone(folder, backbone), train_backbone=backbone["train"])
        encoder = StyleEncoder(**cfg)
    except Krea2Error:
        raise
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise Krea2Error(f"{cfg_file} is damaged ({type(e).__name__}: {e}); copy the folder again from the run that "
                         "trained it") from None
    sd = read_safetensors(weights)
    missing = sorted(set(encoder.state_dict()) ^ set(sd))
    if missing:
        raise Krea2Error(f"{weights} does not fit {cfg_file}: tensor(s) {missing[:3]} missing or unexpected")
    encoder.load_state_dict(sd)
    if (folder / "lora.safetensors").is_file():  # the stage trained a reference LoRA with the encoder
        from krea2.models.lora import read_lora

        encoder.lora = read_lora(folder / "lora.safetensors")
    return encoder.to(device).eval().requires_grad_(False)


BACKBONE_DIR = "backbone"  # a style adapter's vision backbone config (its weights are in style_encoder.safetensors)


def saved_backbone(folder: Path, spec: dict) -> nn.Module:
    """The vision backbone of a saved style adapter, architecture from folder/backbone/config.json (weights
    follow with the encoder's)."""
    from transformers import AutoConfig, AutoModel

    from krea2.models.vision import VisionBackbone

    file = folder / BACKBONE_DIR / "config.json"
    if not file.is_file():
        raise Krea2Error(f"{folder} lacks {BACKBONE_DIR}/config.json (its vision backbone's architecture, written by "
                         "the style stage); copy the whole folder again from the run that trained it")
    try:
        cfg = AutoConfig.from_pretrained(file.parent, local_files_only=True)
        cfg = getattr(cfg, "vision_config", None) or cfg  # a whole model's config put back by hand: its tower
        model = AutoModel.from_config(cfg)
    except (ValueError, KeyError, OSError) as e:
        raise Krea2Error(f"{file} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); copy the folder "
                         "again from the run that trained it") from None
    if not hasattr(cfg, "patch_size"):
        raise Krea2Error(f"{file} is a {cfg.model_type} config, not a vision tower's; copy the folder again from the "
                         "run that trained it")
    return VisionBackbone(model, spec["mean"], spec["std"], spec["side"])


def decode_reference(data: bytes, what: str, max_pixels: int = 64 * 1024 * 1024) -> Tensor:
    """Image bytes -> (3, H, W) in [-1, 1], by curation's checked decoder (size capped from the header before any
    pixel is decoded, EXIF orientation applied, 16-bit scaled by its depth, alpha over white). A one-line
    Krea2Error naming `what` for an unreadable, truncated, oversized or animated image."""
    from krea2.data.curation.checks import Rejected, load_rgb
    from krea2.train.data import to_pixels

    try:
        rgb, meta = load_rgb(data, max_pixels=max_pixels)
    except Rejected as e:
        raise Krea2Error(f"{what} cannot be used: {e}") from None
    if meta.get("frames", 1) > 1:
        raise Krea2Error(f"{what} is animated ({meta['frames']} frames); give a still image")
    return to_pixels(torch.from_numpy(np.ascontiguousarray(rgb).copy()))  # decoders can hand read-only arrays


def read_reference(spec: str, max_pixels: int = 64 * 1024 * 1024) -> tuple[Tensor, float]:
    """`IMG[:WEIGHT]` -> (image (3, H, W) in [-1, 1], weight), decoded by `decode_reference`; a missing file or a
    bad weight is a one-line Krea2Error too."""
    import math
    from pathlib import Path

    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            if not Path(spec).exists() and Path(head).is_file():
                raise Krea2Error(f"--style-ref {spec}: the weight {tail!r} is not a number") from None
            path = spec  # a ':' inside the file name
    if not math.isfinite(weight) or weight == 0:
        raise Krea2Error(f"--style-ref {spec}: the weight must be a finite, non-zero number")
    file = Path(path)
    if not file.is_file():
        raise Krea2Error(f"style reference not found: {path}")
    return decode_reference(file.read_bytes(), f"style reference {path}", max_pixels), weight
