"""Training throughput of a recipe stage: samples/s and the fraction of this machine's measured matmul peak.

Runs the trainer's own step (`krea2.train.trainer.build_stage` + `train_step`: the stage's objective, its model
set, AdamW with clipping and the spike guard) on the stage's own data source for a few steps of each stage of a
recipe, without writing checkpoints.

    python benchmarks/train_throughput.py recipes/world.toml [--steps 30] [--pool 256] [--set parallel.compile=true]
                                          [--profile 5 [--stage NAME]]

--profile N also records N more steps of each stage (or of --stage only) with torch.profiler and prints the 15 ops
with the most self CPU time: where a step's time goes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from dit_step import matmul_peak  # benchmarks/ is on sys.path when run as a script

from krea2.models.autoencoders import load_autoencoder
from krea2.models.dit import DiT
from krea2.models.text_encoders import load_text_encoder
from krea2.train.config import load_recipe
from krea2.train.data import build_data, token_count
from krea2.train.health import dit_train_flops
from krea2.train.parallel import DistInfo
from krea2.train.trainer import Context, build_stage, init_weights, recipe_model_config, train_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pool", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], help="recipe override, as `krea2 train --set`")
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps per stage (0: off)")
    ap.add_argument("--stage", default=None, help="only this stage")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    te, ae = load_text_encoder(recipe.text_encoder), load_autoencoder(recipe.autoencoder)
    cfg = recipe_model_config(recipe)
    ctx = Context(recipe, Path(tempfile.mkdtemp()), te, ae, DistInfo(), progress=False)
    peaks = {"fp32": matmul_peak(torch.float32) * 1e9, "bf16": matmul_peak(torch.bfloat16) * 1e9}
    print(f"{torch.get_num_threads()} threads; matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'stage':14s} {'px':>4s} {'batch':>5s} {'tokens':>11s} {'samples/s':>10s} {'GFLOP/sample':>13s} "
          f"{'% peak':>7s}")
    for stage in recipe.stages:
        if args.stage and stage.name != args.stage:
            continue
        stage.data.pool = min(stage.data.pool, args.pool)
        torch.manual_seed(0)
        rt = build_stage(ctx, stage, init_weights(DiT(cfg)))
        data = build_data(stage.data, stage.seed, te, ae, cfg.patch, progress=False)
        flops, times, n_txt = 0.0, [], []
        for step in range(args.steps + 3):
            t = time.perf_counter()
            batch = data.batch(step, stage.batch_size)
            train_step(rt, batch, step, torch.Generator().manual_seed(step))
            if step >= 3:  # warm-up excluded
                times.append(time.perf_counter() - t)
                n_img, n = token_count(batch)
                flops += dit_train_flops(cfg, n_img, n) * stage.batch_size
                n_txt.append(n)
        seconds = sum(times)
        samples = args.steps * stage.batch_size
        tokens = f"{n_img}+{max(n_txt)}txt"
        print(f"{stage.name:14s} {stage.data.native:4d} {stage.batch_size:5d} {tokens:>11s} "
              f"{samples / seconds:10.1f} {flops / samples / 1e9:13.2f} "
              f"{100 * flops / seconds / peaks[stage.precision]:6.0f}%")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for step in range(args.steps + 3, args.steps + 3 + args.profile):
                    train_step(rt, data.batch(step, stage.batch_size), step, torch.Generator().manual_seed(step))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
