"""Peak memory of loading a DiT checkpoint: our meta-device + assign + mmap loader vs a naive load.

Each case runs in a fresh subprocess and reports its RSS high-water mark (VmHWM) above the RSS it had after
imports, in multiples of the checkpoint's weight bytes. "touched" reads every weight once after loading (a forward
pass does the same): memory-mapped pages then count in RSS too, so it shows the true steady-state cost.

    python benchmarks/load_memory.py [--features 2048] [--layers 8] [--dtype bf16]
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
    if case.startswith("ours"):
        model = load_dit(path, cfg)
    else:  # the usual code: random init in the default dtype, cast, then copy the file's tensors in
        model = DiT(cfg).to(getattr(torch, dtype))
        model.load_state_dict(load_file(path), strict=True)
    if case.endswith("touched"):
        with torch.no_grad():
            sum(float(p.float().sum()) for p in model.parameters())
    print(json.dumps({"base": base, "hwm": vm_kib("VmHWM")}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    from krea2.models.dit import DiT, DiTConfig
    from krea2.models.loading import save_dit

    cfg = DiTConfig(features=args.features, heads=args.features // 128, kvheads=args.features // 512,
                    layers=args.layers, tdim=256, txtdim=1024, txtlayers=4, txtheads=8, txtkvheads=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        torch.manual_seed(0)
        save_dit(DiT(cfg), path, dtype=getattr(torch, args.dtype))
        weight_bytes = path.stat().st_size
        print(f"config features {cfg.features}, {cfg.layers} layers: {weight_bytes / 2**20:.0f} MiB of {args.dtype} "
              f"weights; RSS high-water mark above the post-import RSS, fresh process per case")
        print(f"{'case':16s} {'peak MiB':>9s} {'x weights':>10s}")
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--child", case, str(path), json.dumps(cfg.to_dict()),
                                  args.dtype], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"case {case} failed:\n{out.stderr}")
            out = out.stdout
            r = json.loads(out.strip().splitlines()[-1])
            peak = (r["hwm"] - r["base"]) * 1024
            print(f"{case:16s} {peak / 2**20:9.0f} {peak / weight_bytes:10.2f}")


if __name__ == "__main__":
    main()
