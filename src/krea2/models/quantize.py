"""Weight-only fp8 / int8 quantisation of the DiT, and the ComfyUI "scaled fp8" file layout, both ways.

What is quantised: the Linear layers of the transformer blocks (`blocks.N.attn.*`, `blocks.N.mlp.*`) and of the
text-fusion blocks (`txtfusion.{layerwise,refiner}_blocks.N.*`): 97% of the 12B's weights. Norms, modulations, the
embeddings (`first`, `tmlp`, `tproj`, `txtmlp`), the text-fusion `projector` (12 weights) and the final layer
(`last.*`) keep their stored precision: they are small and sit where an error reaches every token.

Formats (`QuantLinear` holds the weight as a buffer in the storage dtype plus a float32 scale buffer):
- fp8: torch.float8_e4m3fn, scale = amax / 448 per output row (scale (out, 1)) or per tensor (scale ()); relative
  error per weight <= 2^-4 (3 mantissa bits, round to nearest), absolute <= 2^-10 * scale in the subnormal range.
- int8: symmetric, round(w / scale) in [-127, 127], scale = amax / 127; absolute error per weight <= scale / 2.
Compute dequantises the weight to the activation's dtype (autocast's when on) for each forward and runs an ordinary
matmul: CPUs have no fp8 matmul, and this keeps every device on one path. Only the weight memory shrinks.

Files: `QuantLinear`'s state-dict names are ComfyUI's: `<module>.weight` in fp8 plus `<module>.scale_weight`, and a
`scaled_fp8` marker tensor whose dtype names the fp8 format (comfy/model_detection.py; the scale is a float32 scalar
there, dequantised as weight.to(dtype) * scale_weight in comfy/ops.py). `load_quantized_dit` also reads
`<module>.weight_scale` (per tensor or per row, shape (out,) or (out, 1)), plain fp8 weights without a scale (scale 1),
ignores `scale_input` (fp8 activations, not used here), and accepts a `model.diffusion_model.` or `diffusion_model.`
prefix. int8 files use the same names (no community layout exists), without the marker.

Why not torchao: torchao 0.18's Int8WeightOnlyConfig / Float8WeightOnlyConfig do run on the CPU build of torch 2.13
(tried from a PyPI wheel; it is not a dependency of this project), with the same dequantise-per-forward cost on CPU.
But they quantise an already materialised high-precision model (the 26 GB this exists to avoid), a ComfyUI file's
fp8 bytes and scales can only become its tensor subclasses through internal constructors, and safetensors cannot
save those subclasses (save_file fails on them). A buffer pair per layer loads with `assign=True` straight from a
memory-mapped file and saves as the community layout, in a few plain functions here.
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krea2.errors import Krea2Error
from krea2.models.dit import DiT, DiTConfig, compute_dtype

FORMATS = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}  # storage dtype, largest code
QUANT_DTYPES = {torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8", torch.int8: "int8"}
# the modules quantise_dit converts (official names); everything else keeps its precision
QUANTIZED_MODULES = re.compile(r"(blocks\.\d+|txtfusion\.(layerwise|refiner)_blocks\.\d+)\.(attn|mlp)\.\w+")
MARKER = "scaled_fp8"
SCALE_NAMES = ("scale_weight", "weight_scale")  # ComfyUI scaled fp8; compressed-tensors / newer ComfyUI files
IGNORED_SUFFIXES = (".scale_input", ".input_scale")  # activation scales for fp8 matmuls: weight-only here
CHUNK = 1 << 22  # elements per quantisation step: bounds the float32 temporaries to 16 MB on any layer size
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8}


def check_format(fmt: str) -> str:
    """fmt if it is a known format, else a one-line Krea2Error."""
    if fmt not in FORMATS:
        raise Krea2Error(f"unknown quantisation {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def quantize_weight(w: Tensor, fmt: str, per_row: bool = True) -> tuple[Tensor, Tensor]:
    """w (out, in) float -> (q (out, in) float8_e4m3fn | int8, scale float32 (out, 1) per row or () per tensor).

    w ~= q.float() * scale (error bounds in the module docstring). Works in row chunks (CHUNK elements), so a
    large bf16 weight never gets a full float32 copy. An all-zero row gets a tiny scale and zero codes.
    """
    qdtype, qmax = FORMATS[check_format(fmt)]
    rows = max(1, CHUNK // max(1, w.shape[1]))
    amax = torch.cat([c.float().abs().amax(1, keepdim=True) for c in w.split(rows)])
    if not per_row:
        amax = amax.amax()
    scale = amax.clamp(min=1e-12) / qmax
    q = torch.empty(w.shape, dtype=qdtype, device=w.device)
    for i, c in enumerate(w.split(rows)):
        x = c.float() / (scale[i * rows:(i + 1) * rows] if per_row else scale)
        if fmt == "int8":
            x = x.round_()
        # clamp first: a value rounding just past 448 would become NaN in e4m3fn (no infinities)
        q[i * rows:(i + 1) * rows] = x.clamp_(-qmax, qmax).to(qdtype)
    return q, scale


def dequantize_weight(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q (out, in) fp8 | int8 and scale () | (out, 1) -> the weight (out, in) in dtype.

    q.to(dtype) is exact for every fp8 e4m3 and int8 code in bf16, fp16 and fp32. fp16 goes through float32 since
    small scales (amax / 448 < 6e-5) are subnormal in fp16.
    """
    if dtype == torch.float16:
        return (q.float() * scale).to(dtype)
    return q.to(dtype) * scale.to(dtype)


class QuantLinear(nn.Module):
    """A Linear whose weight is stored quantised: `weight` (out, in) fp8/int8 and `scale_weight` float32 buffers.

    forward(x (..., in)) -> (..., out) in x's dtype (autocast's when on): the weight is dequantised to that dtype per
    call. `bias` (out,) stays a high-precision Parameter. The buffers keep their dtypes through `.to(dtype)`/.half()
    (they follow device moves only). Not trainable: for inference.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "fp8",
                 per_row: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        qdtype = FORMATS[check_format(fmt)][0]
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=qdtype, device=device))
        self.register_buffer("scale_weight", torch.ones((out_features, 1) if per_row else (), device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) \
            if bias else None

    @property
    def fmt(self) -> str:
        return QUANT_DTYPES[self.weight.dtype]

    @property
    def per_row(self) -> bool:
        return self.scale_weight.dim() > 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "fp8", per_row: bool = True) -> QuantLinear:
        """Quantise an nn.Linear (any float dtype, any device); the bias is kept as it is."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, per_row, device="meta")
        q, s = quantize_weight(linear.weight.detach(), fmt, per_row)
        out.weight, out.scale_weight = q, s
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_weight(self.weight, self.scale_weight, dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self.dequantize(dtype), bias)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) and .half() cast every floating buffer, fp8 included: keep the stored codes and the
        # float32 scale, and follow only the device move
        q, s = self.weight, self.scale_weight
        super()._apply(fn, recurse)
        self.weight, self.scale_weight = q.to(self.weight.device), s.to(self.scale_weight.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.fmt} per-{'row' if self.per_row else 'tensor'}")


def quantize_dit(model: nn.Module, fmt: str, per_row: bool = True) -> nn.Module:
    """Replace the block and text-fusion Linears (QUANTIZED_MODULES) by QuantLinear in place; returns model.

    Other modules are untouched (same tensors). Already quantised layers are left as they are.
    """
    check_format(fmt)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and QUANTIZED_MODULES.fullmatch(name):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantLinear.from_linear(mod, fmt, per_row))
    return model


def dequantize_dit(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Turn every QuantLinear back into an nn.Linear in dtype (the quantisation error stays); returns model."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = nn.Parameter(mod.dequantize(dtype))
            if mod.bias is not None:
                lin.bias = nn.Parameter(mod.bias.detach().to(dtype))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def quantized_format(model: nn.Module) -> str | None:
    """'fp8' or 'int8' when the model holds QuantLinear layers, else None."""
    return next((m.fmt for m in model.modules() if isinstance(m, QuantLinear)), None)


# ---- files -----------------------------------------------------------------------------------------------------------


def quantized_state_dict(model: nn.Module, fmt: str = "fp8", per_row: bool = False) -> dict[str, Tensor]:
    """The model's tensors in the scaled layout: each QUANTIZED_MODULES Linear as `weight` (fmt) + `scale_weight`
    (quantised here if still high precision, as they are if already QuantLinear), the rest as stored, plus the
    `scaled_fp8` marker (an empty fp8 tensor, as ComfyUI writes it) for fp8.

    per_row False (per tensor) by default: ComfyUI's scaled-fp8 layers hold a scalar scale_weight; per-row files load
    here but do not fit that parameter. Krea2Error for QuantLinear layers of another format.
    """
    check_format(fmt)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and mod.fmt != fmt:
            raise Krea2Error(f"the model is {mod.fmt}-quantised; cannot write it as {fmt} (re-quantising compounds "
                             "the error: start from the high-precision checkpoint)")
        if isinstance(mod, nn.Linear) and QUANTIZED_MODULES.fullmatch(name):
            sd[f"{name}.weight"], sd[f"{name}.scale_weight"] = quantize_weight(mod.weight.detach(), fmt, per_row)
    if fmt == "fp8":  # the marker's dtype names the fp8 format (e5m2 only for a file loaded in it)
        dtype = next((m.weight.dtype for m in model.modules() if isinstance(m, QuantLinear)), FORMATS["fp8"][0])
        sd[MARKER] = torch.empty(0, dtype=dtype)
    return sd


def save_quantized(model: nn.Module, path: str | Path, fmt: str = "fp8", per_row: bool = False,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write quantized_state_dict(model, fmt, per_row) as one safetensors file, atomically. Returns path."""
    from safetensors.torch import save_file

    from krea2.models.loading import atomic_write

    sd = {k: v.contiguous().cpu() for k, v in quantized_state_dict(model, fmt, per_row).items()}
    meta = {"format": "pt", "quantization": f"{fmt} weight-only, scale per {'row' if per_row else 'tensor'}",
            **(metadata or {})}
    atomic_write(Path(path), lambda tmp: save_file(sd, tmp, metadata=meta))
    return Path(path)


def save_fp8(model: nn.Module, path: str | Path, per_row: bool = False) -> Path:
    """The ComfyUI scaled-fp8 file of model (see quantized_state_dict)."""
    return save_quantized(model, path, "fp8", per_row)


def write_quantized_checkpoint(path: str | Path, model: DiT, config: dict, fmt: str = "fp8", per_row: bool = False,
                               overwrite: bool = False) -> Path:
    """A krea2 checkpoint folder whose model.safetensors is in the scaled layout (crash-safe, see publish_dir)."""
    from krea2.models.checkpoint import publish_dir

    def fill(tmp: Path) -> None:
        save_quantized(model, tmp / "model.safetensors", fmt, per_row)
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")  # last: a torn folder has no config

    return publish_dir(path, fill, overwrite=overwrite)


def is_scaled(sd: dict[str, Tensor]) -> bool:
    """Whether a file's tensors use the scaled layout: 8-bit weights, scale tensors or the marker (names and dtypes
    only, nothing is read)."""
    return any(v.dtype in QUANT_DTYPES or k == MARKER or k.rpartition(".")[2] in SCALE_NAMES for k, v in sd.items())


def streamed_reader(path: str | Path):
    """name -> tensor of the file mapped on its own (prefix-stripped names; copy-on-write, so writable).

    For quantising on load: pages of the file-wide map stay in the process's RSS once read, so reading every
    high-precision weight through it would hold the whole file. A tensor's own map is unmapped when it is freed,
    after its layer is quantised, and stays off the heap (no fragmentation from layer-sized buffers).
    """
    import numpy as np

    from krea2.models.loading import strip_prefix

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    entries, start = strip_prefix(header), 8 + n

    def read(name: str) -> Tensor:
        e = entries[name]
        a, b = e["data_offsets"]
        raw = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=start + a, shape=(b - a,)))
        return raw.view(SAFETENSORS_DTYPES[e["dtype"]]).view(e["shape"])

    return read


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    glibc serves 1-32 MB requests from its heap once a larger block was freed (its dynamic mmap threshold), and
    the long-lived quantised codes land between the freed layer-sized temporaries: without this, quantising a
    0.8B model (785 MiB of codes) while loading peaked at 2.2-2.5 GiB of RSS instead of 0.9 (load_memory.py).
    Full-size 12B layers (100-200 MB) are mmap-served and returned on free anyway.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc, or no C library to open
        pass


def _scale(path, name: str, scale: Tensor | None, fmt: str, out: int) -> Tensor:
    """A file's scale for one layer as () or (out, 1) float32; Krea2Error if it is missing (int8) or misshapen."""
    if scale is None:
        if fmt == "int8":
            raise Krea2Error(f"{path} stores {name}.weight in int8 without a scale_weight; it is not a scaled file")
        return torch.ones(())  # a plain fp8 cast (ComfyUI's unscaled fp8 files)
    if scale.numel() == 1:
        return scale.float().reshape(())
    if scale.numel() == out and scale.shape in ((out,), (out, 1)):
        return scale.float().reshape(out, 1)
    raise Krea2Error(f"{path}: the scale of {name} has shape {tuple(scale.shape)}; expected one value per tensor or "
                     f"per output row ({out})")


def load_quantized_dit(path: str | Path, sd: dict[str, Tensor], cfg: DiTConfig | None = None,
                       dtype: torch.dtype | None = None, device: str = "cpu", quantize: str | None = None,
                       per_row: bool = True) -> DiT:
    """A DiT with QuantLinear layers from a file's tensors `sd` (prefix stripped, memory-mapped on CPU).

    Files with 8-bit weights load as stored: those layers (whatever modules they are) become QuantLinear with the
    file's codes assigned from the map, never widened. Other files are quantised while loading (quantize 'fp8' |
    'int8', per_row): each QUANTIZED_MODULES weight is read alone, quantised and freed, so the high-precision model
    never exists in memory. Other tensors are assigned from the map, cast to dtype if given (8-bit ones, which
    would not compute, to dtype or bfloat16). The module is built on the meta device, as load_dit does.
    Krea2Error (one line) for an unknown format, an 8-bit file asked to load as another format, mixed formats,
    a scale without an 8-bit weight or of the wrong shape, and for names or shapes that do not match the model.
    """
    from krea2.models.loading import check_finite_tensors, check_state_dict, infer_config

    sd = {k: v for k, v in sd.items() if k != MARKER and not k.endswith(IGNORED_SUFFIXES)}
    scales = {}
    for k in list(sd):
        base, _, leaf = k.rpartition(".")
        if leaf in SCALE_NAMES:
            scales[base] = sd.pop(k)
    stored = {k.removesuffix(".weight"): QUANT_DTYPES[v.dtype] for k, v in sd.items()
              if k.endswith(".weight") and v.dtype in QUANT_DTYPES}
    formats = set(stored.values())
    if len(formats) > 1:
        raise Krea2Error(f"{path} mixes fp8 and int8 weights; it is not a file this loader knows")
    stored_fmt = formats.pop() if formats else None
    if quantize is not None:
        check_format(quantize)
        if stored_fmt not in (None, quantize):
            raise Krea2Error(f"{path} is already {stored_fmt}-quantised; load it as stored (no --quantize, or "
                             f"--quantize {stored_fmt})")
    fmt = stored_fmt or quantize
    cfg = cfg or infer_config(sd)
    with torch.device("meta"):
        model = DiT(cfg)
    # finiteness is checked per tensor below, as each is read: checking all first would page in the whole
    # high-precision file before quantising (2.4 GiB instead of 0.9 in load_memory.py's quantise-on-load case)
    check_state_dict(model, sd, source=str(path), finite=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in [*stored, *scales]:
        if name not in linears:
            raise Krea2Error(f"{path} has an 8-bit weight or a scale for {name}, which is not a Linear layer of "
                             "the model; only Linear weights can be quantised")
    orphans = sorted(set(scales) - set(stored))
    if orphans:
        raise Krea2Error(f"{path} has a scale for {orphans[0]} but stores its weight in "
                         f"{sd[orphans[0] + '.weight'].dtype}; {len(orphans)} such layer(s)")
    if stored_fmt:  # as the file has it, whichever Linears those are
        targets = list(stored)
    else:  # ours to choose (empty for a file that only carries the marker)
        targets = [n for n in linears if QUANTIZED_MODULES.fullmatch(n)] if fmt else []
        read = streamed_reader(path)
    for name in targets:
        lin = linears[name]
        if stored_fmt:
            q, s = sd[f"{name}.weight"], _scale(path, name, scales.get(name), fmt, lin.out_features)
        else:
            w = read(f"{name}.weight")
            check_finite_tensors({f"{name}.weight": w}, str(path))
            q, s = quantize_weight(w, fmt, per_row)
            del w
            release_freed_memory()
        sd[f"{name}.weight"], sd[f"{name}.scale_weight"] = q.to(device), s.to(device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(
            lin.in_features, lin.out_features, lin.bias is not None, fmt, s.dim() > 0, device="meta"))
    quantized = {f"{n}.{leaf}" for n in targets for leaf in ("weight", "scale_weight")}
    check_finite_tensors({k: v for k, v in sd.items() if k not in quantized}, str(path))
    for k, v in sd.items():
        if k not in quantized:
            want = dtype or (torch.bfloat16 if v.dtype in QUANT_DTYPES else v.dtype)
            sd[k] = v.to(device=device, dtype=want)  # a no-op (still the map) when nothing changes
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
