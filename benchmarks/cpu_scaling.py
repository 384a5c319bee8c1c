"""CPU scaling of FSDP2 training: the same global batch on 1 process and on N gloo processes (strong scaling).

    .venv/bin/python benchmarks/cpu_scaling.py --preset bench --global-batch 8 --steps 8 --procs 1 2

Each process gets `--threads` intra-op threads, so 1 process x 1 thread vs 2 processes x 1 thread compares equal
core counts per rank; a 1-process run with procs*threads threads is printed as the single-process ceiling.
Prints a markdown table (step time, samples/s, speedup, scaling efficiency).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from krea2.models.dit import DiT, get_config  # noqa: E402
from krea2.train.parallel import (  # noqa: E402
    ParallelConfig,
    all_reduce_mean,
    build_mesh,
    clip_grad_norm_,
    destroy_distributed,
    init_distributed,
    parallelize_dit,
    rank_slice,
)


def make_batch(cfg, batch: int, n_img: int, n_txt: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = int(n_img**0.5)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    pos = torch.zeros(batch, n_txt + n_img, 3)
    pos[:, n_txt:, 1:] = grid.float()
    return {"img": torch.randn(batch, n_img, cfg.token_dim, generator=g),
            "context": torch.randn(batch, n_txt, cfg.txtlayers, cfg.txtdim, generator=g),
            "t": torch.rand(batch, generator=g), "pos": pos, "target": torch.randn(batch, n_img, cfg.token_dim)}


def run(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads_now)
    init_distributed()
    torch.manual_seed(0)
    model = DiT(args.preset)
    if world > 1:
        pcfg = ParallelConfig(param_dtype="float32")
        parallelize_dit(model, build_mesh(pcfg), pcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = rank_slice(make_batch(get_config(args.preset), args.global_batch, args.img_tokens, args.txt_tokens),
                       rank, world)
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        v = model(batch["img"], batch["context"], batch["t"], batch["pos"])
        loss = (v.float() - batch["target"]).square().mean()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        all_reduce_mean(loss)  # the logged loss: part of a real step
        times.append(time.perf_counter() - t0)
    if rank == 0:
        torch.save(times[args.warmup:], out)
    destroy_distributed()


def measure(procs: int, threads: int, args) -> float:
    args.threads_now = threads
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "times.pt")
        mp.start_processes(run, args=(procs, port, args, out), nprocs=procs, start_method="spawn")
        return statistics.median(torch.load(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--img-tokens", type=int, default=256, help="256 = a 256 px image (16x16 patches)")
    p.add_argument("--txt-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    rows = [(f"1 process x {max(args.procs) * args.threads} threads (ceiling)",
             measure(1, max(args.procs) * args.threads, args), None)]
    for n in args.procs:
        t = measure(n, args.threads, args)
        how = "FSDP2, gloo" if n > 1 else "no sharding"
        rows.append((f"{n} process{'es' if n > 1 else ''} x {args.threads} thread ({how})", t, n))
    one = next(t for _, t, n in rows if n == 1) if 1 in args.procs else None
    print(f"\npreset {args.preset}, global batch {args.global_batch}, {args.img_tokens}+{args.txt_tokens} tokens, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores\n")
    print("| run | step time (s) | samples/s | speedup vs 1 process | efficiency |")
    print("|---|---|---|---|---|")
    for name, t, n in rows:
        sp = "" if (one is None or n is None) else f"{one / t:.2f}x"
        eff = "" if (one is None or n is None) else f"{one / t / n:.0%}"
        print(f"| {name} | {t:.3f} | {args.global_batch / t:.2f} | {sp} | {eff} |")


if __name__ == "__main__":
    main()
