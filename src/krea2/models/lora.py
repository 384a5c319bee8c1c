"""LoRA adapters for the DiT: read and write every format in use, apply reversibly, merge, extract.

A LoRA adds ΔW = scale · (alpha / rank) · B @ A to the weight W (out, in) of a Linear, with A (rank, in) and
B (out, rank) (Hu et al. 2021, arXiv 2106.09685; peft's `LoraLayer` convention: scaling = lora_alpha / r). In memory
modules are named by their official module names (`blocks.3.attn.wq`), whatever the file's format:

    format      key of A (B: lora_B / lora_up)                            where alpha is
    krea2       blocks.0.attn.wq.lora_A.weight                            metadata lora_alpha (+ lora_alphas, JSON)
    diffusers   transformer.transformer_blocks.0.attn.to_q.lora_A.weight  metadata lora_adapter_metadata (LoraConfig)
    comfyui     diffusion_model.blocks.0.attn.wq.lora_A.weight            folded into lora_B (see below)
    ai-toolkit  base_model.model.blocks.0.attn.wq.lora_A.weight           folded into lora_B (see below)
    kohya       lora_unet_blocks_0_attn_wq.lora_down.weight               lora_unet_blocks_0_attn_wq.alpha (scalar)

Reading detects the format per key and accepts, under any prefix, lora_A/lora_B or lora_down/lora_up and a
`<module>.alpha` scalar (ComfyUI's and kohya's spelling). Where a file says nothing, alpha = rank (scale 1), the
peft/diffusers convention. The diffusers names are diffusers' own (`convert_krea2_transformer_checkpoint_to_diffusers`
and `_convert_non_diffusers_krea2_lora_to_diffusers` in diffusers 0.42), and diffusers format writes alpha the way
diffusers' `save_lora_weights` does, as a peft LoraConfig (r, lora_alpha, rank_pattern, alpha_pattern) in the
metadata, which `load_lora_adapter` reads back exactly.

ComfyUI and ai-toolkit files have no alpha that diffusers' Krea 2 converter accepts (it rejects `.alpha` keys and
ignores metadata for them), so alpha / rank is folded into lora_B when it is not 1, and every reader (ComfyUI,
diffusers, ai-toolkit, us) applies the same ΔW. A power-of-two alpha / rank (alpha = rank, rank / 2, 1, ...) folds
without rounding and the original alpha is recorded in the metadata (`krea2_folded_alphas`), so reading the file back
restores the exact tensors; any other ratio rounds lora_B once (relative 2^-24 in fp32) and reads back as alpha = rank.

Applying (`apply_lora`) registers forward hooks on the targeted Linears: nothing in the model's parameters, names or
state_dict changes, several LoRAs run at once with their own scales, and unloading removes the hooks. `merge_lora`
folds ΔW into the weights instead (for release-format checkpoints: `krea2 lora merge`).
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krea2.errors import Krea2Error
from krea2.models.dit import DiT, DiTConfig, get_config

FORMATS = ("krea2", "diffusers", "comfyui", "kohya", "ai-toolkit")
KREA2_FORMAT = "krea2-lora"  # metadata["format"] of our files
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
FOLDED = "krea2_folded_alphas"  # comfyui/ai-toolkit: {module: alpha} folded exactly into lora_B (power-of-two ratio)
# metadata we interpret; everything else a file carries (training info) is kept and written back on conversion
_FORMAT_KEYS = {"format", "lora_alpha", "lora_alphas", "rank", DIFFUSERS_METADATA, FOLDED}
_PREFIX = {"diffusers": "transformer.", "comfyui": "diffusion_model.", "ai-toolkit": "base_model.model.",
           "kohya": "lora_unet_", "krea2": ""}
_SUFFIX = {"lora_A.weight": "A", "lora_down.weight": "A", "lora_B.weight": "B", "lora_up.weight": "B", "alpha": "alpha"}

# ---- module names ---------------------------------------------------------------------------------------------------
# Official Linear names, and diffusers' names for them (diffusers' single-file and LoRA converters for Krea 2)
_STANDALONE = {"first": "img_in", "last.linear": "final_layer.linear", "tmlp.0": "time_embed.linear_1",
               "tmlp.2": "time_embed.linear_2", "tproj.1": "time_mod_proj", "txtmlp.1": "txt_in.linear_1",
               "txtmlp.3": "txt_in.linear_2", "txtfusion.projector": "text_fusion.projector"}
_STANDALONE_INV = {v: k for k, v in _STANDALONE.items()}
_ATTN = {"wq": "to_q", "wk": "to_k", "wv": "to_v", "wo": "to_out.0", "gate": "to_gate"}
_ATTN_INV = {v: k for k, v in _ATTN.items()}
_BLOCKS = {"blocks": "transformer_blocks", "txtfusion.layerwise_blocks": "text_fusion.layerwise_blocks",
           "txtfusion.refiner_blocks": "text_fusion.refiner_blocks"}
_BLOCKS_INV = {v: k for k, v in _BLOCKS.items()}
_OFFICIAL_BLOCK = re.compile(r"(blocks|txtfusion\.layerwise_blocks|txtfusion\.refiner_blocks)\.(\d+)\."
                             r"(?:attn\.(wq|wk|wv|wo|gate)|mlp\.(gate|up|down))")
_DIFFUSERS_BLOCK = re.compile(r"(transformer_blocks|text_fusion\.layerwise_blocks|text_fusion\.refiner_blocks)\.(\d+)\."
                              r"(?:attn\.(to_q|to_k|to_v|to_out\.0|to_gate)|ff\.(gate|up|down))")
# kohya flattens dots to underscores; the block kinds contain underscores themselves, so parse, don't replace back
_KOHYA_BLOCKS = {kohya_block: block for block in _BLOCKS for kohya_block in [block.replace(".", "_")]}
_KOHYA_BLOCK = re.compile(r"(blocks|txtfusion_layerwise_blocks|txtfusion_refiner_blocks)_(\d+)_"
                          r"(?:attn_(wq|wk|wv|wo|gate)|mlp_(gate|up|down))")


def is_module_name(name: str) -> bool:
    """Whether `name` is an official Linear module name of some Krea 2 DiT (any depth)."""
    return name in _STANDALONE or _OFFICIAL_BLOCK.fullmatch(name) is not None


def diffusers_name(name: str) -> str:
    """Official Linear name -> `Krea2Transformer2DModel` module name (blocks.0.attn.wo -> transformer_blocks.0.attn.
    to_out.0, blocks.0.mlp.up -> transformer_blocks.0.ff.up). KeyError for a name that is not a Linear of the DiT."""
    if name in _STANDALONE:
        return _STANDALONE[name]
    m = _OFFICIAL_BLOCK.fullmatch(name)
    if m is None:
        raise KeyError(name)
    blocks, idx, attn, mlp = m.groups()
    return f"{_BLOCKS[blocks]}.{idx}." + (f"attn.{_ATTN[attn]}" if attn else f"ff.{mlp}")


def official_from_diffusers(name: str) -> str | None:
    """Inverse of diffusers_name; None for a name that maps to no Linear of the DiT."""
    if name in _STANDALONE_INV:
        return _STANDALONE_INV[name]
    m = _DIFFUSERS_BLOCK.fullmatch(name)
    if m is None:
        return None
    blocks, idx, attn, ff = m.groups()
    return f"{_BLOCKS_INV[blocks]}.{idx}." + (f"attn.{_ATTN_INV[attn]}" if attn else f"mlp.{ff}")


def kohya_name(name: str) -> str:
    """Official name -> kohya's flattened one, without the lora_unet_ prefix (blocks.0.attn.wq -> blocks_0_attn_wq)."""
    return name.replace(".", "_")


def official_from_kohya(flat: str) -> str | None:
    """Inverse of kohya_name (the flattening is ambiguous in general; the DiT's names parse uniquely)."""
    for name in _STANDALONE:
        if kohya_name(name) == flat:
            return name
    m = _KOHYA_BLOCK.fullmatch(flat)
    if m is None:
        return None
    blocks, idx, attn, mlp = m.groups()
    return f"{_KOHYA_BLOCKS[blocks]}.{idx}." + (f"attn.{attn}" if attn else f"mlp.{mlp}")


def lora_modules(model: nn.Module | DiTConfig | str | dict) -> dict[str, tuple[int, int]]:
    """{official Linear name: (out, in)} of a DiT (a model, config, preset name or config dict), in module order.

    A DiT wrapped by peft or hooked by us has the same answer: it is read off the config, not the live modules.
    """
    cfg = model.cfg if isinstance(model, DiT) else getattr(model, "cfg", None) or get_config(model)
    return dict(_linears(tuple(sorted(cfg.to_dict().items()))))


@functools.lru_cache(maxsize=8)
def _linears(cfg_items: tuple) -> tuple[tuple[str, tuple[int, int]], ...]:
    with torch.device("meta"):  # names and shapes only; cached, the 12B takes a moment to build even on meta
        ref = DiT(DiTConfig(**dict(cfg_items)))
    return tuple((n, (m.out_features, m.in_features)) for n, m in ref.named_modules() if isinstance(m, nn.Linear))


# ---- the LoRA in memory ---------------------------------------------------------------------------------------------


@dataclass
class LoRAModule:
    """One adapted Linear: A (rank, in), B (out, rank), alpha (ΔW = alpha / rank · B @ A)."""

    A: Tensor
    B: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta(self, scale: float = 1.0) -> Tensor:
        """ΔW = scale · alpha / rank · B @ A, (out, in) float32."""
        return (scale * self.scaling) * (self.B.float() @ self.A.float())


@dataclass
class LoRA:
    """A LoRA by official module name. `metadata`: the file's own entries other than the format's (training info),
    kept through conversions; `format`: the format it was read in."""

    modules: dict[str, LoRAModule]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "krea2"

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules.values()})

    def summary(self) -> str:
        """One line: module count, rank(s), alpha(s)."""
        ranks, alphas = self.ranks, self.alphas
        r = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        a = f"{alphas[0]:g}" if len(alphas) == 1 else f"{alphas[0]:g}-{alphas[-1]:g}"
        return f"{len(self.modules)} modules, rank {r}, alpha {a}"


def _num(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _pattern_value(patterns: dict, name: str, default):
    """peft's rank/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first pattern p with
    re.match(rf"(.*\\.)?({p})$", name) wins."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", name):
            return v
    return default


def _diffusers_alphas(raw: str | None) -> tuple[float | None, dict]:
    """(lora_alpha, alpha_pattern) from diffusers' lora_adapter_metadata (keys with or without `transformer.`)."""
    if not raw:
        return None, {}
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None, {}
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()}
    alpha = cfg.get("lora_alpha")
    return (None if alpha is None else float(alpha)), dict(cfg.get("alpha_pattern") or {})


def _split_key(key: str) -> tuple[str, str, str | None, str] | None:
    """key -> (format, stem, official module or None, kind A|B|alpha); None when the key is no LoRA tensor."""
    suffix = next((sfx for sfx in _SUFFIX if key.endswith("." + sfx)), None)
    if suffix is None:
        return None
    stem, kind = key[: -len(suffix) - 1], _SUFFIX[suffix]
    if stem.startswith("lora_unet_"):
        return "kohya", stem, official_from_kohya(stem[len("lora_unet_"):]), kind
    if stem.startswith("transformer."):
        return "diffusers", stem, official_from_diffusers(stem[len("transformer."):]), kind
    for fmt, prefix in (("comfyui", "model.diffusion_model."), ("comfyui", "diffusion_model."),
                        ("ai-toolkit", "base_model.model.")):
        if stem.startswith(prefix):
            stem_module = stem[len(prefix):]
            return fmt, stem, stem_module if is_module_name(stem_module) else None, kind
    return "krea2", stem, stem if is_module_name(stem) else None, kind


def lora_from_state_dict(sd: dict[str, Tensor], metadata: dict[str, str] | None = None,
                         model: nn.Module | DiTConfig | str | dict | None = None, strict: bool = True,
                         source: str = "the LoRA") -> LoRA:
    """Tensors (+ safetensors metadata) in any supported format -> LoRA; see read_lora."""
    metadata = dict(metadata or {})
    targets = lora_modules(model) if model is not None else None
    parts: dict[str, dict[str, Tensor]] = {}
    seen: dict[tuple[str, str], str] = {}
    formats: Counter = Counter()
    unmatched = []
    for key, value in sd.items():
        parsed = _split_key(key)
        if parsed is None or parsed[2] is None or (targets is not None and parsed[2] not in targets):
            unmatched.append(key)
            continue
        fmt, _, module, kind = parsed
        if (module, kind) in seen:  # two spellings of one tensor: whichever came last would silently win
            raise Krea2Error(f"{source} holds two tensors for {module} {kind}: {seen[module, kind]!r} and {key!r} "
                             "(key formats mixed); keep one of them and save the file again")
        seen[module, kind] = key
        formats[fmt] += 1
        parts.setdefault(module, {})[kind] = value
    if not parts:
        if not sd:
            raise Krea2Error(f"{source} has no tensors; it is not a LoRA")
        raise Krea2Error(f"{source} has no key of a Krea 2 LoRA{' for this model' if targets else ''}: "
                         f"{sorted(sd)[0]!r} (one of {len(sd)} keys) matches no Linear module; expected e.g. "
                         "blocks.0.attn.wq.lora_A.weight or its diffusers (transformer.transformer_blocks.0.attn.to_q."
                         "lora_A.weight), ComfyUI (diffusion_model.), ai-toolkit (base_model.model.) or kohya "
                         "(lora_unet_blocks_0_attn_wq.lora_down.weight) spelling")
    if unmatched:
        msg = (f"{source}: {len(unmatched)} of {len(sd)} keys match no Linear module of the model (e.g. "
               f"{sorted(unmatched)[0]!r}); it may be for another architecture or size, or hold adapter kinds "
               "krea2 does not apply (DoRA, biases)")
        if strict:
            raise Krea2Error(msg)
        warnings.warn(msg + "; those keys are skipped", stacklevel=2)

    ours = metadata.get("format") == KREA2_FORMAT
    try:
        krea2_alpha = float(metadata["lora_alpha"]) if ours and "lora_alpha" in metadata else None
        krea2_alphas = json.loads(metadata.get("lora_alphas") or "{}") if ours else {}
        folded = json.loads(metadata.get(FOLDED) or "{}")
    except ValueError as e:
        raise Krea2Error(f"{source} has unreadable alpha metadata ({e}); rewrite it with krea2.models.lora.save_lora"
                         ) from None
    diff_alpha, diff_pattern = _diffusers_alphas(metadata.get(DIFFUSERS_METADATA))
    modules = {}
    order = list(targets) if targets is not None else sorted(parts, key=_module_order)
    for name in order:
        p = parts.get(name)
        if p is None:
            continue
        if "A" not in p or "B" not in p:
            have = ", ".join(sorted({"A": "lora_A", "B": "lora_B", "alpha": "alpha"}[k] for k in p))
            raise Krea2Error(f"{source} has only {have} for {name}; a LoRA module needs lora_A and lora_B")
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise Krea2Error(f"{source}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; expected "
                             "(rank, in) and (out, rank)")
        if targets is not None and (B.shape[0], A.shape[1]) != targets[name]:
            raise Krea2Error(f"{source}: {name} is {A.shape[1]} -> {B.shape[0]} in the LoRA but {targets[name][1]} "
                             f"-> {targets[name][0]} in the model; the LoRA was made for another model size")
        rank = A.shape[0]
        if "alpha" in p:
            alpha = _num(p["alpha"])
        elif name in krea2_alphas:
            alpha = float(krea2_alphas[name])
        elif krea2_alpha is not None:
            alpha = krea2_alpha
        elif diff_alpha is not None:
            alpha = float(_pattern_value(diff_pattern, diffusers_name(name), diff_alpha))
        else:
            alpha = float(rank)
            if name in folded:  # our comfyui/ai-toolkit export: undo an exact (power-of-two) fold
                s = float(folded[name]) / rank
                B = B / s
                alpha = float(folded[name])
        modules[name] = LoRAModule(A, B, alpha)
    fmt = formats.most_common(1)[0][0]
    return LoRA(modules, {k: v for k, v in metadata.items() if k not in _FORMAT_KEYS}, fmt)


def _module_order(name: str) -> tuple:
    # numeric block order for files read without a model (blocks.10 after blocks.9)
    return tuple(int(t) if t.isdigit() else t for t in name.split("."))


def read_lora(path: str | Path, model: nn.Module | DiTConfig | str | dict | None = None, strict: bool = True) -> LoRA:
    """Read a LoRA .safetensors file in any supported format (detected from the keys; see the module docstring).

    model (a DiT, DiTConfig, preset name or config dict) checks every module exists with the LoRA's shapes; None only
    checks the names are Linear names of some Krea 2 DiT. Raises a one-line Krea2Error for a missing or unreadable
    file, a file whose keys match no module (naming one), a file of which only some keys match (saying how many; with
    strict=False those are skipped with a warning), lora_A without lora_B, or shapes that do not fit the model.
    """
    from safetensors import safe_open

    from krea2.models.loading import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise Krea2Error(f"LoRA file not found: {path}")
    sd = read_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return lora_from_state_dict(sd, metadata, model, strict=strict, source=str(path))


# ---- writing --------------------------------------------------------------------------------------------------------


def _common(values: list):
    return Counter(values).most_common(1)[0][0]


def _fold(B: Tensor, s: float) -> tuple[Tensor, bool]:
    """B · s and whether that is exact (a power-of-two s, no overflow or underflow): then B · s / s == B."""
    if s == 1.0:
        return B, True
    if math.frexp(s)[0] == 0.5:
        out = B * s
        if torch.isfinite(out).all() and torch.equal(out / s, B):
            return out, True
    return (B.float() * s).to(B.dtype), False


def lora_state_dict(lora: LoRA, fmt: str = "krea2") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of `lora` in one of FORMATS; see the module docstring for the layouts."""
    if fmt not in FORMATS:
        raise Krea2Error(f"unknown LoRA format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not lora.modules:
        raise Krea2Error("the LoRA has no modules; nothing to write")
    meta = {k: str(v) for k, v in lora.metadata.items() if k not in _FORMAT_KEYS}
    mods = lora.modules
    sd: dict[str, Tensor] = {}
    if fmt == "krea2":
        alpha = _common([m.alpha for m in mods.values()])
        for n, m in mods.items():
            sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = m.A, m.B
        rank = _common([m.rank for m in mods.values()])
        meta.update(format=KREA2_FORMAT, lora_alpha=repr(float(alpha)), rank=str(rank))
        if any(m.alpha != alpha for m in mods.values()):
            meta["lora_alphas"] = json.dumps({n: m.alpha for n, m in mods.items()})
    elif fmt == "diffusers":
        # what diffusers' save_lora_weights writes: the transformer's peft LoraConfig, keys prefixed "transformer."
        r, alpha = _common([m.rank for m in mods.values()]), _common([m.alpha for m in mods.values()])
        config = {"r": r, "lora_alpha": alpha, "target_modules": [diffusers_name(n) for n in mods],
                  "rank_pattern": {re.escape(diffusers_name(n)): m.rank for n, m in mods.items() if m.rank != r},
                  "alpha_pattern": {re.escape(diffusers_name(n)): m.alpha for n, m in mods.items() if m.alpha != alpha}}
        for n, m in mods.items():
            d = diffusers_name(n)
            sd[f"transformer.{d}.lora_A.weight"], sd[f"transformer.{d}.lora_B.weight"] = m.A, m.B
        meta.update({"format": "pt", DIFFUSERS_METADATA: json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                                     sort_keys=True)})
    elif fmt == "kohya":
        for n, m in mods.items():
            k = f"lora_unet_{kohya_name(n)}"
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = m.A, m.B
            # float32 like kohya's, unless that would round this alpha (then float64, which every reader .item()s)
            a32 = torch.tensor(m.alpha, dtype=torch.float32)
            sd[f"{k}.alpha"] = a32 if float(a32) == m.alpha else torch.tensor(m.alpha, dtype=torch.float64)
    else:  # comfyui, ai-toolkit: alpha folded into lora_B (the module docstring says why)
        prefix, folded = _PREFIX[fmt], {}
        for n, m in mods.items():
            B, exact = _fold(m.B, m.scaling)
            if exact and m.alpha != m.rank:
                folded[n] = m.alpha
            sd[f"{prefix}{n}.lora_A.weight"], sd[f"{prefix}{n}.lora_B.weight"] = m.A, B
        if folded:
            meta[FOLDED] = json.dumps(folded)
    return sd, meta


def write_lora(lora: LoRA, path: str | Path, fmt: str = "krea2") -> Path:
    """Write `lora` as a .safetensors file in `fmt` (see FORMATS), crash-safe (temp file + rename).

    Tensors are written as they are (dtype kept). Raises Krea2Error for an unknown format or an empty LoRA.
    """
    from safetensors.torch import save_file

    from krea2.models.loading import atomic_write

    sd, meta = lora_state_dict(lora, fmt)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return path


def inexact_folds(lora: LoRA) -> list[str]:
    """Modules whose alpha / rank a comfyui/ai-toolkit export folds with rounding (not a power of two)."""
    return [n for n, m in lora.modules.items() if m.scaling != 1.0 and math.frexp(m.scaling)[0] != 0.5]


def save_lora(path: str | Path, state: dict[str, Tensor], alpha: float | dict[str, float],
              metadata: dict | None = None) -> Path:
    """Write adapter tensors in our format: what the trainer calls.

    state: {`<official module>.lora_A.weight`: (rank, in), `<official module>.lora_B.weight`: (out, rank)}, e.g. from
    lora_state_from_peft. alpha: one value for every module or {module: alpha}. metadata: extra entries (values that
    are not strings are JSON-encoded). Crash-safe (temp file + rename). Raises Krea2Error for a key that is not
    `<Linear name>.lora_A|lora_B.weight`, an unpaired A/B, a module without an alpha, or an empty state.
    """
    parts: dict[str, dict[str, Tensor]] = {}
    for k, v in state.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", k)
        if m is None or not is_module_name(m[1]):
            raise Krea2Error(f"save_lora: {k!r} is not <official Linear name>.lora_A|lora_B.weight "
                             "(e.g. blocks.0.attn.wq.lora_A.weight)")
        parts.setdefault(m[1], {})[m[2]] = v
    modules = {}
    for name in sorted(parts, key=_module_order):
        p = parts[name]
        if set(p) != {"A", "B"}:
            raise Krea2Error(f"save_lora: {name} has lora_{''.join(p)} only; both lora_A and lora_B are needed")
        if isinstance(alpha, dict):
            if name not in alpha:
                raise Krea2Error(f"save_lora: no alpha for {name}")
            a = float(alpha[name])
        else:
            a = float(alpha)
        modules[name] = LoRAModule(p["A"], p["B"], a)
    if not modules:
        raise Krea2Error("save_lora: no adapter tensors to save")
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return write_lora(LoRA(modules, extra), path, "krea2")


def lora_state_from_peft(model: nn.Module, adapter: str = "default") -> tuple[dict[str, Tensor], dict[str, float]]:
    """Adapters of a DiT wrapped by peft (`inject_adapter_in_model` or `get_peft_model`) -> (state, alphas) for
    save_lora: state in our keys (`blocks.0.attn.wq.lora_A.weight`: (rank, in), `...lora_B.weight`: (out, rank)),
    detached CPU copies; alphas {module: alpha} such that alpha / rank is peft's scaling (rsLoRA's alpha / sqrt(rank)
    becomes alpha · sqrt(rank)).

    Module names lose peft's `base_model.model.` prefix and wrapper components (`_orig_mod`, `_checkpoint_wrapped_
    module`, `_fsdp_wrapped_module`); FSDP2/DTensor shards are gathered with full_tensor(), a collective: call it on
    every rank. Raises Krea2Error when the model has no adapter of that name, or for DoRA adapters (not supported).
    """
    state, alphas = {}, {}
    for name, mod in model.named_modules():
        lora_A = getattr(mod, "lora_A", None)
        if not isinstance(lora_A, nn.ModuleDict) or adapter not in lora_A:
            continue
        parts = [p for p in name.split(".") if p not in ("_orig_mod", "_checkpoint_wrapped_module",
                                                         "_fsdp_wrapped_module")]
        official = ".".join(parts).removeprefix("base_model.model.")
        magnitude = getattr(mod, "lora_magnitude_vector", None)
        if magnitude is not None and adapter in magnitude:
            raise Krea2Error(f"{official} is a DoRA adapter; krea2 LoRA files hold plain LoRA only")
        r = mod.r[adapter]
        alpha = float(mod.lora_alpha[adapter])
        if getattr(mod, "use_rslora", {}).get(adapter, False):
            alpha = alpha * math.sqrt(r)
        for kind, sub in (("A", lora_A[adapter]), ("B", mod.lora_B[adapter])):
            w = sub.weight.detach()
            if hasattr(w, "full_tensor"):  # a DTensor (FSDP2 / tensor parallel)
                w = w.full_tensor()
            state[f"{official}.lora_{kind}.weight"] = w.to("cpu", copy=True)
        alphas[official] = alpha
    if not state:
        raise Krea2Error(f"the model has no peft LoRA adapter named {adapter!r}")
    return state, alphas


# ---- applying -------------------------------------------------------------------------------------------------------


def _linear(model: nn.Module, name: str) -> nn.Linear:
    """The nn.Linear behind an official name (through peft wrappers, whose base layer holds the weight)."""
    mod = model.get_submodule(name)
    while hasattr(mod, "base_layer"):
        mod = mod.base_layer
    return mod


def refuse_quantized(model: nn.Module) -> None:
    """A LoRA cannot go on an 8-bit DiT: its hooks compute in the adapted weight's dtype (fp8 / int8) and a merge
    would add ΔW to the stored integers without their scales. One-line Krea2Error saying what to do instead."""
    from krea2.models.quantize import quantized_format

    fmt = quantized_format(model)
    if fmt is not None:
        raise Krea2Error(f"LoRAs cannot be applied to a {fmt}-quantised DiT yet; load the checkpoint without "
                         "--quantize, or merge the LoRA into the high-precision checkpoint (krea2 lora merge) and "
                         "quantise the result")


def check_lora(lora: LoRA, model: nn.Module) -> None:
    """Every module of the LoRA exists in the model with its shapes, and the model is not 8-bit
    (`refuse_quantized`); one-line Krea2Error otherwise."""
    refuse_quantized(model)
    targets = lora_modules(model)
    for name, m in lora.modules.items():
        if name not in targets:
            raise Krea2Error(f"the LoRA adapts {name}, which this model does not have; it was made for another "
                             "architecture or size")
        if (m.B.shape[0], m.A.shape[1]) != targets[name]:
            raise Krea2Error(f"the LoRA's {name} is {m.A.shape[1]} -> {m.B.shape[0]} but the model's is "
                             f"{targets[name][1]} -> {targets[name][0]}; it was made for another model size")


@dataclass
class _Adapter:
    lora: LoRA
    scale: float
    cache: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # module -> (A, B) as the weight

    def weights(self, name: str, weight: Tensor) -> tuple[Tensor, Tensor]:
        # moved/cast lazily on first use and again after the model moves (pipe.model.to(...))
        ab = self.cache.get(name)
        if ab is None or ab[0].device != weight.device or ab[0].dtype != weight.dtype:
            m = self.lora.modules[name]
            ab = (m.A.to(weight.device, weight.dtype), m.B.to(weight.device, weight.dtype))
            self.cache[name] = ab
        return ab


@dataclass
class LoRAPatch:
    """The LoRAs applied to one model (kept on it as `_krea2_lora`): adapters by name, one hook per adapted Linear."""

    adapters: dict[str, _Adapter] = field(default_factory=dict)
    hooks: dict[str, torch.utils.hooks.RemovableHandle] = field(default_factory=dict)

    def hook(self, name: str):
        def forward_hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            x = args[0]
            for ad in self.adapters.values():
                m = ad.lora.modules.get(name)
                if m is None or ad.scale == 0:
                    continue
                A, B = ad.weights(name, mod.weight)
                # scale the (tokens, rank) intermediate, not B: the cheapest place for the factor
                out = out + F.linear(F.linear(x, A) * (ad.scale * m.scaling), B)
            return out

        return forward_hook


def _patch(model: nn.Module) -> LoRAPatch:
    patch = model.__dict__.get("_krea2_lora")
    if patch is None:
        patch = LoRAPatch()
        model.__dict__["_krea2_lora"] = patch  # a plain attribute: not a submodule, not in the state_dict
    return patch


def _sync_hooks(model: nn.Module, patch: LoRAPatch) -> None:
    wanted = {n for ad in patch.adapters.values() for n in ad.lora.modules}
    for name in set(patch.hooks) - wanted:
        patch.hooks.pop(name).remove()
    for name in sorted(wanted - set(patch.hooks)):
        patch.hooks[name] = _linear(model, name).register_forward_hook(patch.hook(name))


def apply_lora(model: nn.Module, lora: LoRA, scale: float = 1.0, name: str | None = None) -> str:
    """Add `lora` to the model's forward at `scale` (reversible: forward hooks; weights untouched). Returns its name.

    Several LoRAs stack, each with its own scale: y = W x + Σ_i scale_i · alpha/rank · B_i A_i x. A name already in
    use is hot-swapped (the old adapter replaced, no reload of the base); name None picks `lora0`, `lora1`, ...
    The adapter tensors follow the weights' device and dtype (cast on first use). Not for sharded (FSDP / tensor
    parallel) models: merge there. Raises Krea2Error when a module does not fit the model.
    """
    check_lora(lora, model)
    patch = _patch(model)
    if name is None:
        name = next(f"lora{i}" for i in range(len(patch.adapters) + 1) if f"lora{i}" not in patch.adapters)
    patch.adapters[name] = _Adapter(lora, float(scale))
    _sync_hooks(model, patch)
    return name


def active_loras(model: nn.Module) -> dict[str, float]:
    """{name: scale} of the LoRAs applied to the model, in application order."""
    patch = model.__dict__.get("_krea2_lora")
    return {} if patch is None else {n: ad.scale for n, ad in patch.adapters.items()}


def _known(model: nn.Module, name: str) -> LoRAPatch:
    patch = model.__dict__.get("_krea2_lora")
    if patch is None or name not in patch.adapters:
        loaded = ", ".join(active_loras(model)) or "none"
        raise Krea2Error(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
    return patch


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Change an applied LoRA's scale (0 switches it off without unloading). Krea2Error for an unknown name."""
    _known(model, name).adapters[name].scale = float(scale)


def unload_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove one applied LoRA (its hooks go when no other LoRA uses them), or all with name None; the model is then
    exactly as before. Krea2Error for an unknown name."""
    if name is None:
        patch = model.__dict__.get("_krea2_lora")
        if patch is not None:
            patch.adapters.clear()
            _sync_hooks(model, patch)
        return
    patch = _known(model, name)
    del patch.adapters[name]
    _sync_hooks(model, patch)


@torch.no_grad()
def merge_lora(model: nn.Module, lora: LoRA, scale: float = 1.0) -> nn.Module:
    """Fold ΔW = scale · alpha/rank · B @ A into the weights in place (computed in fp32, stored in the weight's
    dtype); not reversible. Returns the model. Raises Krea2Error when a module does not fit the model."""
    check_lora(lora, model)
    for name, m in lora.modules.items():
        w = _linear(model, name).weight
        w.copy_((w.float() + m.delta(scale).to(w.device)).to(w.dtype))
    return model


def merge_into_state_dict(sd: dict[str, Tensor], lora: LoRA, scale: float = 1.0) -> dict[str, Tensor]:
    """A copy of a released-layout state dict with ΔW folded into `<module>.weight` (fp32 math, each tensor's dtype
    kept); untouched tensors are shared. Krea2Error when a weight is missing or has another shape."""
    out = dict(sd)
    for name, m in lora.modules.items():
        key = f"{name}.weight"
        if key not in out:
            raise Krea2Error(f"the LoRA adapts {name} but the checkpoint has no {key}")
        w = out[key]
        if tuple(w.shape) != (m.B.shape[0], m.A.shape[1]):
            raise Krea2Error(f"the LoRA's {name} is {m.A.shape[1]} -> {m.B.shape[0]} but the checkpoint's {key} is "
                             f"{tuple(w.shape)}; it was made for another model size")
        out[key] = (w.float() + m.delta(scale)).to(w.dtype)
    return out


# ---- extraction -----------------------------------------------------------------------------------------------------


@dataclass
class Extraction:
    """What extract_lora did: relative Frobenius errors ‖ΔW − BA‖ / ‖ΔW‖ overall and per module; tensors that differ
    but are not Linear weights (norms, biases, modulations), which a LoRA cannot carry."""

    error: float
    errors: dict[str, float]
    other_changed: list[str]

    def worst(self) -> tuple[str, float]:
        return max(self.errors.items(), key=lambda kv: kv[1])


@torch.no_grad()
def extract_lora(base: dict[str, Tensor], tuned: dict[str, Tensor], rank: int,
                 dtype: torch.dtype = torch.float32) -> tuple[LoRA, Extraction]:
    """LoRA of rank <= `rank` approximating tuned − base per Linear (released-layout state dicts), by truncated SVD.

    For ΔW = U S Vᵀ: B = U_r √S_r, A = √S_r V_rᵀ (the singular values split evenly between the factors), alpha =
    rank (scale 1), so B @ A is the best rank-r approximation (Eckart–Young). r is `rank` or the difference's
    numerical rank if lower (numpy's matrix_rank tolerance); unchanged Linears are left out.
    Raises Krea2Error for rank < 1, different tensor names or shapes, or no Linear weight that differs.
    """
    if rank < 1:
        raise Krea2Error(f"--rank must be at least 1, got {rank}")
    if set(base) != set(tuned):
        diff = sorted(set(base) ^ set(tuned))
        raise Krea2Error(f"the two checkpoints hold different tensors ({len(diff)}, e.g. {diff[0]}); extract needs "
                         "one architecture")
    modules, errors, other = {}, {}, []
    num = den = 0.0
    for key in base:
        if tuple(base[key].shape) != tuple(tuned[key].shape):
            raise Krea2Error(f"{key} is {tuple(base[key].shape)} in the base but {tuple(tuned[key].shape)} in the "
                             "tuned checkpoint; extract needs one architecture")
        name = key.removesuffix(".weight")
        linear = key.endswith(".weight") and is_module_name(name) and base[key].dim() == 2
        d = tuned[key].float() - base[key].float()
        if not d.any():
            continue
        if not linear:
            other.append(key)
            continue
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        # numerical rank as numpy's matrix_rank counts it: singular values below that are rounding, not signal
        tol = S[0] * max(d.shape) * torch.finfo(torch.float32).eps
        r = max(1, min(rank, int((S > tol).sum())))
        sq = S[:r].sqrt()
        B, A = U[:, :r] * sq, sq[:, None] * Vh[:r]
        err, norm = torch.linalg.matrix_norm(d - B @ A).item(), torch.linalg.matrix_norm(d).item()
        num, den = num + err**2, den + norm**2
        errors[name] = err / norm
        modules[name] = LoRAModule(A.to(dtype).contiguous(), B.to(dtype).contiguous(), float(r))
    if not modules:
        raise Krea2Error("no Linear weight differs between the two checkpoints; nothing to extract"
                         + (f" ({len(other)} other tensors differ, e.g. {other[0]})" if other else ""))
    ordered = dict(sorted(modules.items(), key=lambda kv: _module_order(kv[0])))
    return LoRA(ordered, {"extracted_rank": str(rank)}), Extraction(math.sqrt(num / den), errors, other)


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (path, scale); the scale defaults to 1 (a colon not followed by a number is the path's)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0
