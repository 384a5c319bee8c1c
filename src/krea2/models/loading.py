"""Load and save DiT weights as safetensors in the released layout, with one-line errors for bad files.

Models are built on the meta device and filled with `assign=True` from memory-mapped tensors, so peak memory stays
near one copy of the weights (no random init, no second copy).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from krea2.errors import Krea2Error
from krea2.models.dit import DiT, DiTConfig, swiglu_hidden

DIFFUSERS_PREFIX = "model.diffusion_model."
# ComfyUI full checkpoints nest the DiT under the first, its standalone diffusion-model files sometimes the second
PREFIXES = (DIFFUSERS_PREFIX, "diffusion_model.")
# read once, single-threaded: os.umask can only be read by setting it, which would race async checkpoint threads
UMASK = os.umask(0)
os.umask(UMASK)


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file (memory-mapped on CPU), with clear errors for the usual mistakes."""
    path = Path(path)
    if not path.exists():
        raise Krea2Error(f"checkpoint not found: {path} (check the path, or set KREA2_RAW / KREA2_TURBO)")
    if path.is_dir():
        raise Krea2Error(f"{path} is a directory; pass the .safetensors file inside it or a krea2 checkpoint folder")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: u64 little-endian header length, then a JSON header. Check that shape rather than sniffing for
    # pickle magic: the length's low byte can itself be 0x80 or "P" in a perfectly good file.
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
    if not (head[8:9] == b"{" and 8 + n <= path.stat().st_size):
        pickled = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"
        raise Krea2Error(f"{path} is not a safetensors file" + (" (pickled .pt/.ckpt files are not loaded for safety)"
                         if pickled else "") + "; convert it to .safetensors first")
    try:
        out = {}
        with safe_open(str(path), framework="pt", device=device) as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out
    except (SafetensorError, OSError, ValueError) as e:
        raise Krea2Error(f"{path} is not a readable safetensors file ({e}); re-download or re-export it") from None


def read_shapes(path: str | Path) -> dict[str, torch.Tensor]:
    """Meta tensors with the file's names and shapes, read from the header alone (for 12B files too)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return strip_prefix({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})


def strip_prefix(sd: dict) -> dict:
    """Accept ComfyUI-style files whose keys sit under `model.diffusion_model.` or `diffusion_model.`.

    Raises Krea2Error when two keys name one tensor (`first.weight` beside `model.diffusion_model.first.weight`):
    a file mixing layouts would otherwise load with whichever copy came last."""
    out, source = {}, {}
    for k, v in sd.items():
        name = next((k.removeprefix(p) for p in PREFIXES if k.startswith(p)), k)
        if name in out:
            raise Krea2Error(f"the file holds two tensors for {name}: {source[name]!r} and {k!r} (key layouts "
                             "mixed); keep one of them and save the file again")
        out[name], source[name] = v, k
    return out


def infer_config(sd: dict[str, torch.Tensor], patch: int = 2, theta: float = 1000.0) -> DiTConfig:
    """Read the architecture off the tensor shapes (patch and theta cannot be seen; released values by default)."""
    try:
        features, token_dim = sd["first.weight"].shape
        head_dim = sd["blocks.0.attn.qknorm.qnorm.scale"].shape[0]
        txtdim = sd["txtmlp.0.scale"].shape[0]
        txt_head = sd["txtfusion.refiner_blocks.0.attn.qknorm.qnorm.scale"].shape[0]
        hidden = sd["blocks.0.mlp.gate.weight"].shape[0]
        multiplier = next(m for m in range(1, 17) if swiglu_hidden(features, m) == hidden)
        return DiTConfig(
            features=features, tdim=sd["tmlp.0.weight"].shape[1], txtdim=txtdim, heads=features // head_dim,
            kvheads=sd["blocks.0.attn.wk.weight"].shape[0] // head_dim, multiplier=multiplier,
            layers=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), patch=patch,
            channels=token_dim // (patch * patch), bias="blocks.0.attn.wq.bias" in sd, theta=theta,
            txtlayers=sd["txtfusion.projector.weight"].shape[1], txtheads=txtdim // txt_head,
            txtkvheads=sd["txtfusion.refiner_blocks.0.attn.wk.weight"].shape[0] // txt_head,
            txtblocks=len({k.split(".")[2] for k in sd if k.startswith("txtfusion.refiner_blocks.")}),
        )
    except (KeyError, StopIteration, ValueError) as e:
        raise Krea2Error(f"cannot read a Krea 2 architecture from these tensors ({e!r}); is this a Krea 2 DiT "
                         "checkpoint?") from None


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint",
                     finite: bool = True) -> None:
    """Names and shapes must match exactly; the error lists the first offenders. finite: also check every floating
    tensor for NaN/inf (reads each one; a loader that streams tensors checks them as it reads them instead)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise Krea2Error(f"{source} does not match the model: {len(missing)} missing tensor(s) {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}; check the config/preset matches the file")
    wrong = [f"{k} {tuple(sd[k].shape)} != {v}" for k, v in expected.items() if tuple(sd[k].shape) != v]
    if wrong:
        raise Krea2Error(f"{source} has {len(wrong)} tensor(s) of the wrong shape, e.g. {wrong[0]}; "
                         "check the config/preset matches the file")
    if finite:
        check_finite_tensors(sd, source)


def check_finite_tensors(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Krea2Error naming the first tensor holding NaN or inf: such a file (a diverged run, a damaged download)
    would sample black images without a word. One tensor at a time, so no second copy of the model is made."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and v.dtype.itemsize > 1
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise Krea2Error(f"{source} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[0]}; "
                         "the file is damaged or its training diverged: use an earlier checkpoint")


def load_dit(path: str | Path, cfg: DiTConfig | None = None, dtype: torch.dtype | None = None,
             device: str = "cpu", quantize: str | None = None) -> DiT:
    """Build on meta, check, and assign the file's tensors (cast only if dtype differs).

    quantize 'fp8' | 'int8': weight-only quantisation of the block Linears while loading. Files stored in 8 bits
    (ComfyUI scaled fp8, `krea2 export --dtype fp8`) load quantised as stored. See krea2.models.quantize.
    """
    from krea2.models.quantize import is_scaled, load_quantized_dit

    # quantising reads through the CPU map, so the high-precision weights never go to the device
    sd = strip_prefix(read_safetensors(path, device="cpu" if quantize else device))
    if quantize is not None or is_scaled(sd):
        return load_quantized_dit(path, sd, cfg, dtype=dtype, device=device, quantize=quantize)
    cfg = cfg or infer_config(sd)
    with torch.device("meta"):
        model = DiT(cfg)
    check_state_dict(model, sd, source=str(path))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over path: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the permissions a plain open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_dit(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None,
             metadata: dict[str, str] | None = None) -> None:
    """Released-layout safetensors (official names, contiguous tensors), written atomically."""
    sd = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu()
          for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(sd, tmp, metadata=metadata))


def save_json(obj: dict, path: str | Path) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))
