"""LoRA training: peft adapters injected into the policy by the model set, before sharding.

`[stages.lora]` turns a stage into adapter training: peft's `inject_adapter_in_model` wraps the target Linears
(official module names) in LoRA layers (Hu et al. 2021, arXiv 2106.09685; peft's `LoraConfig`), only the adapters
get gradients, and the EMA, the optimiser and the training state hold the adapters only (the frozen base is rebuilt
from the stage's init on resume). The stage writes its adapters (`<stage>/lora.safetensors`, krea2 LoRA format) and,
so later stages and `krea2 generate` can use it directly, the base with the adapters folded in (`<stage>/final`).

    [stages.lora]
    rank = 32
    alpha = 32.0
    targets = "all"          # every Linear (264 on the 12B) | "attention" (blocks' wq/wk/wv/wo/gate, 140) | a regex
    weights = ""             # start from a LoRA file (any format read_lora reads) instead of B = 0
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

TARGET_SETS = {
    "all": r".*",
    "attention": r"blocks\.\d+\.attn\.(wq|wk|wv|wo|gate)",
}
INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# PiSSA / OLoRA start the adapters from the base's own principal directions and take them out of the base
# (W' = W − s·B0 A0): the trained adapters alone are relative to W', a base users do not have
BASE_SHIFTING_INITS = ("pissa", "olora")
INITIAL = "_krea2_lora_initial"  # {official module: (A0, B0)} kept on the model for those inits


@dataclass
class LoRAConfig:
    rank: int = 32
    alpha: float = 32.0  # ΔW = alpha / rank · B A
    targets: str = "all"  # all | attention | a regex fully matching official Linear module names
    dropout: float = 0.0
    init: str = "default"  # default (A Kaiming-uniform, B = 0) | gaussian | pissa | olora (peft's init_lora_weights)
    # sample grids also show the adapters on this checkpoint, with its own preset (train on the base, preview on
    # the Turbo student: "world-turbo"); "" = the trained model only
    preview: str = ""
    # start the adapters from this LoRA file (musubi-tuner's --network_weights): continue an adapter's training, or a
    # preference stage from its supervised adapter. Its modules must be the targets, its rank the rank; its alpha may
    # differ (B is rescaled so ΔW is the file's). Roles that copy the policy's start (a DPO reference) get it merged
    # in, so they start where the policy starts. "" = the init above
    weights: str = ""

    def __post_init__(self):
        if self.rank < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise ValueError("lora needs rank >= 1, alpha > 0 and dropout in [0, 1)")
        if self.init not in INITS:
            raise ValueError(f"lora init {self.init!r} unknown; choose one of {sorted(INITS)}")
        if self.weights and self.init in BASE_SHIFTING_INITS:
            raise ValueError(f"lora weights start the adapters from a file; init {self.init!r} would replace them")
        try:
            re.compile(TARGET_SETS.get(self.targets, self.targets))
        except re.error as e:
            raise ValueError(f"lora targets {self.targets!r} is neither all, attention nor a regex ({e})") from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def lora_targets(model: nn.Module, targets: str) -> list[str]:
    """Official names of the Linear modules a target spec selects; ValueError when it selects none."""
    pattern = re.compile(TARGET_SETS.get(targets, targets))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    if not names:
        raise ValueError(f"lora targets {targets!r} match no Linear module (e.g. blocks.0.attn.wq, blocks.0.mlp.up)")
    return names


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap the targets in peft LoRA layers in place; freeze everything but the adapters. Returns the model."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=lora_targets(model, cfg.targets), init_lora_weights=INITS[cfg.init])
    model = inject_adapter_in_model(config, model)
    if cfg.init in BASE_SHIFTING_INITS:  # deterministic (SVD / QR of W): a resumed run recomputes the same factors
        model.__dict__[INITIAL] = {name: (m.lora_A["default"].weight.detach().cpu().clone(),
                                          m.lora_B["default"].weight.detach().cpu().clone())
                                   for name, m in model.named_modules() if hasattr(m, "base_layer")}
    if cfg.weights:
        load_initial_adapters(model, cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def initial_adapters(cfg: LoRAConfig, targets: list[str]):
    """The LoRA file `cfg.weights` (a `krea2.models.lora.LoRA`), checked against the stage: it adapts exactly the
    `targets` (official module names) at rank cfg.rank. One-line Krea2Error otherwise, or for a missing or damaged
    file (`read_lora`)."""
    from krea2.errors import Krea2Error
    from krea2.models.lora import read_lora

    lora = read_lora(cfg.weights)
    if set(lora.modules) != set(targets):
        extra, missing = sorted(set(lora.modules) - set(targets)), sorted(set(targets) - set(lora.modules))
        raise Krea2Error(f"lora weights {cfg.weights} adapt other modules than targets {cfg.targets!r} select "
                         f"(only in the file: {extra[:2]}, only in targets: {missing[:2]}); set targets to match")
    if lora.ranks != [cfg.rank]:
        raise Krea2Error(f"lora weights {cfg.weights} have rank {'/'.join(map(str, lora.ranks))}; set [stages.lora] "
                         f"rank = {lora.ranks[0]} to start from them")
    return lora


def load_initial_adapters(model: nn.Module, cfg: LoRAConfig) -> None:
    """Copy the LoRA file `cfg.weights` into the peft adapters of `model` (in place), B rescaled by the file's
    scaling over cfg's so each ΔW is the file's (to float rounding). Krea2Error as `initial_adapters`."""
    wrapped = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    lora = initial_adapters(cfg, list(wrapped))
    with torch.no_grad():
        for name, m in wrapped.items():
            mod = lora.modules[name]
            m.lora_A["default"].weight.copy_(mod.A)
            m.lora_B["default"].weight.copy_(mod.B.float() * (mod.scaling / cfg.scaling))


def initial_factors(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]] | None:
    """The (A0, B0) that PiSSA/OLoRA took out of each wrapped base weight, or None for inits that leave it as is."""
    return model.__dict__.get(INITIAL)


def relative_to_base(state: dict[str, Tensor], initial: dict | None) -> dict[str, Tensor]:
    """Adapters in the krea2 LoRA format (`<module>.lora_A.weight` (r, in), `.lora_B.weight` (out, r)) made exact
    against the original base: with W' = W − s·B0 A0, W' + s·B A = W + s·[B, −B0] [A; A0], a rank-2r LoRA with the
    same scale (store alpha · 2). Unchanged when initial is None."""
    if not initial:
        return state
    out = dict(state)
    for name, (a0, b0) in initial.items():
        a, b = out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"]
        out[f"{name}.lora_A.weight"] = torch.cat([a, a0.to(a)], 0)
        out[f"{name}.lora_B.weight"] = torch.cat([b, -b0.to(b)], 1)
    return out


def lora_transform(cfg: LoRAConfig, policy_copies: tuple[str, ...] = ()):
    """The model set's transform: adapters on the policy. The roles named in policy_copies (copies of the policy's
    start, e.g. a DPO reference) get the `weights` file merged in when the adapters start from one, so they start
    where the policy starts; other roles (a teacher checkpoint) stay as built."""

    def transform(role: str, model: nn.Module) -> nn.Module:
        if role == "policy":
            return inject_lora(model, cfg)
        if role in policy_copies and cfg.weights:
            from krea2.models.lora import merge_lora

            with torch.no_grad():
                merge_lora(model, initial_adapters(cfg, lora_targets(model, cfg.targets)))
        return model

    return transform


@contextmanager
def adapters_disabled(model: nn.Module):
    """The model's peft adapters switched off for the duration (peft's `enable_adapters(False)` on every LoRA
    layer): the base model exactly, where the adapters' init left it as it was (not PiSSA/OLoRA-style inits)."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "enable_adapters")]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def is_lora_model(model: nn.Module) -> bool:
    return any(".lora_A." in n for n, _ in model.named_parameters())


def adapter_modules(model: nn.Module) -> nn.ModuleDict:
    """The adapters as their own module tree (the same parameters): what the training state and EMA hold."""
    return nn.ModuleDict({name.replace(".", "__"): nn.ModuleDict({"lora_A": m.lora_A, "lora_B": m.lora_B})
                          for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")})


def adapter_state(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """peft tensor names -> the krea2 LoRA format: `<official module>.lora_A.weight` / `.lora_B.weight`."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.+)\.(lora_[AB])\.default\.weight", k)
        if m:
            out[f"{m[1]}.{m[2]}.weight"] = v
    return out


def fold_lora(sd: dict[str, Tensor], scaling: float, initial: dict | None = None, strength: float = 1.0
              ) -> dict[str, Tensor]:
    """A peft-wrapped state dict -> release names with the adapters folded into each wrapped weight (fp32):
    W' + scaling · B A at strength 1; strength 0 gives the original base (W' itself, or W' + scaling · B0 A0 for the
    PiSSA/OLoRA `initial` factors); between, the original base plus strength times the LoRA's ΔW."""
    out = {}
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        m = re.fullmatch(r"(.+)\.base_layer\.(weight|bias)", k)
        if m is None:
            out[k] = v
            continue
        name, kind = m[1], m[2]
        if kind == "weight" and f"{name}.lora_A.default.weight" in sd:
            a, b = sd[f"{name}.lora_A.default.weight"].float(), sd[f"{name}.lora_B.default.weight"].float()
            delta = b @ a
            if initial and name in initial:
                a0, b0 = (f.float() for f in initial[name])
                shift = b0 @ a0
                v = (v.float() + scaling * shift + strength * scaling * (delta - shift)).to(v.dtype)
            else:
                v = (v.float() + strength * scaling * delta).to(v.dtype)
        out[f"{name}.{kind}"] = v
    return out


def save_adapters(path, sd: dict[str, Tensor], cfg: LoRAConfig, initial: dict | None = None) -> None:
    """Adapter tensors of a peft-wrapped state dict to one file in the krea2 LoRA format (crash-safe), exact against
    the original base (`relative_to_base`)."""
    from krea2.models.lora import save_lora

    save_lora(path, relative_to_base(adapter_state(sd), initial), cfg.alpha * (2 if initial else 1))


class LoRAPreview:
    """The stage's current adapters applied to a second checkpoint (with its own sampling preset) for sample grids:
    what the LoRA does on the model it will be used with. Loaded once; the adapters are hot-swapped each time."""

    def __init__(self, spec: str, device):
        from krea2.pipeline import load_pipeline

        self.spec, self.pipe = spec, load_pipeline(spec, device=str(device))

    def grid(self, model: nn.Module, prompts: list[str], resolution: int, seed: int = 0):
        from krea2.models.lora import LoRA, LoRAModule, lora_state_from_peft
        from krea2.pipeline import image_grid

        state, alphas = lora_state_from_peft(model)
        if initial_factors(model):
            state, alphas = relative_to_base(state, initial_factors(model)), {k: 2 * a for k, a in alphas.items()}
        lora = LoRA({name: LoRAModule(state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], alpha)
                     for name, alpha in alphas.items()})
        self.pipe.load_lora(lora, name="training")  # the same name: the previous adapters are replaced
        images = self.pipe.generate(prompts, seed=seed, width=resolution, height=resolution)
        return image_grid(images, cols=min(len(images), 8))
