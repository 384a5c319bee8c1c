"""Peak memory of loading a DiT checkpoint: our meta-device + assign + mmap loader vs a naive load, and quantised.

Each case runs in a fresh subprocess and reports its RSS high-water mark (VmHWM) above the RSS it had after
imports, in multiples of the checkpoint's weight bytes. "touched" reads every weight's bytes once after loading (a
forward pass does the same): memory-mapped pages then count in RSS too, so it shows the true steady-state cost.

    python benchmarks/load_memory.py [--features 2048] [--layers 8] [--dtype bf16]
    python benchmarks/load_memory.py --layout 12b [--width-div 4]   # + fp8 / int8 files and quantising on load

`--layout 12b` is the 12B's structure (28 blocks, 2 + 2 text-fusion blocks, 12 taps, head dim 128, GQA 4:1,
SwiGLU x4) with every width divided by --width-div (4: 1536 wide, 0.8B parameters, a 1.6 GB bf16 file): the real
file is 25.6 GB, more than this machine's memory. It adds the quantised cases (krea2.models.quantize): an fp8 file
(ComfyUI scaled fp8, per-tensor scales, as `krea2 export --dtype fp8` writes), an int8 file (per-row scales), and
a bf16 file quantised while loading (`load_dit(..., quantize=...)`), and prints the full-size 12B's byte counts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CASES = ("ours", "ours+touched", "naive", "naive+touched")
QUANT_CASES = ("fp8 file", "fp8 file+touched", "int8 file", "int8 file+touched", "bf16->fp8 on load+touched",
               "bf16->int8 on load+touched")


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(case: str, path: str, cfg_json: str, dtype: str) -> None:
    """Load once, print {"base": KiB, "hwm": KiB}. Everything imported before measuring the base."""
    from safetensors.torch import load_file

    from krea2.models.dit import DiT, DiTConfig
    from krea2.models.loading import load_dit

    cfg = DiTConfig.from_dict(json.loads(cfg_json))
    base = vm_kib("VmRSS")
    if case.startswith("ours") or "file" in case:
        model = load_dit(path, cfg)
    elif "on load" in case:  # a high-precision file quantised layer by layer while loading
        model = load_dit(path, cfg, quantize="fp8" if "fp8" in case else "int8")
    else:  # the usual code: random init in the default dtype, cast, then copy the file's tensors in
        model = DiT(cfg).to(getattr(torch, dtype))
        model.load_state_dict(load_file(path), strict=True)
    if case.endswith("touched"):
        with torch.no_grad():  # state_dict: quantised weights and scales are buffers, not parameters
            # read the stored bytes (a uint8 view, no copy): pages in every weight without the float32 temporary
            # of the largest tensor that `.float()` adds (38 MiB at --width-div 4), which is not load memory
            sum(int(p.detach().contiguous().reshape(-1).view(torch.uint8).max()) for p in model.state_dict().values())
    print(json.dumps({"base": base, "hwm": vm_kib("VmHWM")}))


def layout_12b(div: int):
    from krea2.models.dit import DiTConfig

    if 48 % div or 12 % div or 20 % div:
        sys.exit("--width-div must divide the 12B's head counts (48, 12, 20): 1, 2 or 4")
    return DiTConfig(features=6144 // div, tdim=256, txtdim=2560 // div, heads=48 // div, kvheads=12 // div,
                     multiplier=4, layers=28, patch=2, channels=16, txtlayers=12, txtheads=20 // div,
                     txtkvheads=20 // div, txtblocks=2)


def full_size_bytes() -> dict[str, int]:
    """Weight bytes of the released 12B (meta device: shapes only) stored in bf16, and with fp8 / int8 blocks."""
    from krea2.models.dit import DiT
    from krea2.models.quantize import QUANTIZED_MODULES

    with torch.device("meta"):
        model = DiT("krea2-12b")
    quant = rows = n_layers = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and QUANTIZED_MODULES.fullmatch(name):
            quant, rows, n_layers = quant + mod.weight.numel(), rows + mod.out_features, n_layers + 1
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "quantised params": quant, "bf16": 2 * total,
            "fp8 (per-tensor scales)": 2 * (total - quant) + quant + 4 * n_layers,
            "int8 (per-row scales)": 2 * (total - quant) + quant + 4 * rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--layout", choices=["bench", "12b"], default="bench",
                    help="bench: --features/--layers; 12b: the 12B's structure at widths / --width-div")
    ap.add_argument("--width-div", type=int, default=4)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    from krea2.models.dit import DiT, DiTConfig
    from krea2.models.loading import save_dit
    from krea2.models.quantize import save_quantized

    if args.layout == "12b":
        cfg = layout_12b(args.width_div)
    else:
        cfg = DiTConfig(features=args.features, heads=args.features // 128, kvheads=args.features // 512,
                        layers=args.layers, tdim=256, txtdim=1024, txtlayers=4, txtheads=8, txtkvheads=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        paths = {"fp8": Path(tmp) / "fp8.safetensors", "int8": Path(tmp) / "int8.safetensors"}
        torch.manual_seed(0)
        model = DiT(cfg)
        save_dit(model, path, dtype=getattr(torch, args.dtype))
        cases = CASES
        if args.layout == "12b":
            model = model.to(getattr(torch, args.dtype))  # quantised from the same weights as the file holds
            save_quantized(model, paths["fp8"], "fp8", per_row=False)
            save_quantized(model, paths["int8"], "int8", per_row=True)
            cases = CASES + QUANT_CASES
        del model
        weight_bytes = path.stat().st_size
        print(f"config features {cfg.features}, {cfg.layers} layers: {weight_bytes / 2**20:.0f} MiB of {args.dtype} "
              f"weights; RSS high-water mark above the post-import RSS, fresh process per case")
        if args.layout == "12b":
            sizes = {k: p.stat().st_size for k, p in paths.items()}
            print("files: " + ", ".join(f"{k} {n / 2**20:.0f} MiB ({n / weight_bytes:.2f}x)" for k, n in sizes.items()))
        print(f"{'case':28s} {'peak MiB':>9s} {'x weights':>10s}")
        for case in cases:
            file = paths["fp8" if case.startswith("fp8") else "int8"] if "file" in case else path
            out = subprocess.run([sys.executable, __file__, "--child", case, str(file), json.dumps(cfg.to_dict()),
                                  args.dtype], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"case {case} failed:\n{out.stderr}")
            out = out.stdout
            r = json.loads(out.strip().splitlines()[-1])
            peak = (r["hwm"] - r["base"]) * 1024
            print(f"{case:28s} {peak / 2**20:9.0f} {peak / weight_bytes:10.2f}")
    if args.layout == "12b":
        full = full_size_bytes()
        print(f"\nthe released 12B ({full.pop('params') / 1e9:.2f}B parameters, "
              f"{full.pop('quantised params') / 1e9:.2f}B in quantised Linears), weight bytes:")
        for k, v in full.items():
            print(f"  {k:24s} {v / 1e9:6.2f} GB  {v / full['bf16']:.3f}x")


if __name__ == "__main__":
    main()
