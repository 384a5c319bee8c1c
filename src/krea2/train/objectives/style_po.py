"""Style preference optimisation: DPO / STPO on pairs sampled with a style reference (Krea 2's second style step).

The report trains its style system self-supervised, then with a preference-optimisation step. Ours: the supervised
adapter (`style.py`: a style encoder and a reference LoRA on the frozen base) samples G images per prompt and
reference; `krea2 pairs --kind style` judges them by style accuracy minus leakage (the exact checker: the image is in
the reference's style; it holds no reference object the prompt did not ask for) and keeps the best and the worst
(`krea2.train.pairs.sample_style_pairs`). This objective then runs STPO (or Diffusion-DPO, `method = "dpo"`) on
those pairs with the reference segment in every pass:

    policy     v_θ(x_t | text, E_θ(ref))      the encoder and the reference LoRA being trained (base frozen)
    reference  v_0(x_t | text, E_0(ref))      the supervised adapter as it started (encoder and LoRA frozen)

(E includes the encoder's block adapter where it injects by one; such an adapter may have no LoRA, and the stage then
needs no [stages.lora]; a frozen vision backbone stays frozen and is shared by E_θ and E_0.)

so the implicit reward is how much more the adapter now prefers the winner than it did, and strength 0 (no reference
pass) stays the base model exactly. The stage starts from `adapter`: its encoder is copied into the trained and the
frozen encoder, and its LoRA starts the trained adapters (`lora_config` sets `[stages.lora] weights`), which the
trainer also merges into the frozen `ref` role (a copy of the policy's start). The stage writes the same folder layout
as a `style` stage (style_encoder.safetensors, style.json, lora.safetensors), so `--style-encoder` takes it as is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from krea2.errors import Krea2Error
from krea2.style import style_adapter_dir
from krea2.train.data import StylePairBatch
from krea2.train.objectives.base import Models
from krea2.train.objectives.dpo import DiffusionDPO
from krea2.train.objectives.stpo import STPO, STPOConfig
from krea2.train.objectives.style import adapter_lora_config, export_style_encoder, load_adapter

METHODS = ("stpo", "dpo")


@dataclass
class StylePOConfig(STPOConfig):
    name: str = "style_po"
    adapter: str = ""  # the supervised style adapter to start from: `world` or a `style` stage's folder
    method: str = "stpo"  # stpo | dpo (STPO's anchor / trust / scale_loser apply to stpo only)

    def __post_init__(self):
        super().__post_init__()
        if not self.adapter:
            raise ValueError("style_po needs adapter = the style adapter to start from (world or a style stage's "
                             "folder)")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} unknown; choose one of {list(METHODS)}")

    def check_files(self, model) -> None:
        """--validate (where it checks paths): the adapter loads, fits the DiT's width and has a reference LoRA or a
        block adapter."""
        load_adapter(self.adapter, model.features)


class StylePreference(STPO):
    Config = StylePOConfig
    name = "style_po"
    data_kind = "style_pairs"
    guard_metric = "loss/dpo"
    trains_policy = False  # the base stays frozen; the encoder and the stage's LoRA train

    def __init__(self, cfg: StylePOConfig, env):
        super().__init__(cfg, env)
        start = load_adapter(cfg.adapter, env.model.features)
        # a frozen vision backbone is shared by the trained and the reference encoder, not copied
        memo = {} if start.backbone is None or start.train_backbone else {id(start.backbone): start.backbone}
        self.encoder = copy.deepcopy(start, memo).train().requires_grad_(True)
        self.ref_encoder = start.eval().requires_grad_(False)
        # the adapter's files as this run started from them: a resume checks them (the reference is rebuilt from them)
        self.register_buffer("adapter_digest", adapter_digest(cfg.adapter))
        self.files_digest = self.adapter_digest.clone()  # a resume restores the buffer; the files must still match
        self.digest_checked = False  # once, at the first step (after any resume); not on every step

    @classmethod
    def lora_config(cls, cfg: StylePOConfig, lora):
        """The trained adapters start as the supervised adapter's LoRA (policy = reference at step 0)."""
        return adapter_lora_config(cfg.adapter, lora)

    def pair_velocities(self, models: Models, batch: StylePairBatch, generator: torch.Generator):
        """As Diffusion-DPO's (shared t, noise and text for winner and loser), with the reference tokens (as the
        segment, or through each encoder's block adapter): the trained encoder in the policy pass, the starting one
        in the reference pass (whose DiT holds the starting LoRA merged in, where the adapter has one)."""
        if not self.digest_checked:
            if not torch.equal(self.adapter_digest.cpu(), self.files_digest):
                raise Krea2Error(f"style adapter {self.cfg.adapter} changed since this run started; resume with the "
                                 "adapter it started from or start a new --out")
            self.digest_checked = True
        with torch.no_grad():
            ref_tokens = self.ref_encoder(batch.images_ref)
        return super().pair_velocities(models, batch, generator, self.encoder(batch.images_ref), ref_tokens,
                                       self.encoder.adapter, self.ref_encoder.adapter)

    def loss(self, models: Models, batch: StylePairBatch, step: int, generator: torch.Generator
             ) -> tuple[Tensor, dict]:
        loss_fn = STPO.loss if self.cfg.method == "stpo" else DiffusionDPO.loss
        return loss_fn(self, models, batch, step, generator)

    def export(self, stage_dir, write: bool) -> None:
        export_style_encoder(self.encoder, stage_dir, write)


def adapter_digest(spec: str) -> Tensor:
    """SHA-256 (32 uint8) of the adapter's weight files."""
    import hashlib

    h = hashlib.sha256()
    for name in ("style_encoder.safetensors", "lora.safetensors"):
        if (style_adapter_dir(spec) / name).is_file():
            h.update((style_adapter_dir(spec) / name).read_bytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
