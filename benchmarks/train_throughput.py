"""Training throughput of a recipe stage: samples/s and the fraction of this machine's measured matmul peak.

Runs the trainer's own pieces (StageData batches, the stage's objective, AdamW with clipping) for a few steps of
each stage of a recipe, without writing checkpoints.

    python benchmarks/train_throughput.py recipes/world.toml [--steps 30] [--pool 256]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from dit_step import matmul_peak  # benchmarks/ is on sys.path when run as a script

from krea2.models.autoencoders import load_autoencoder
from krea2.models.dit import DiT
from krea2.models.text_encoders import load_text_encoder
from krea2.pipeline import sampling_from_dict
from krea2.train.config import load_recipe
from krea2.train.data import StageData
from krea2.train.health import dit_train_flops
from krea2.train.objectives.flow import FlowMatching
from krea2.train.trainer import init_weights, param_groups, recipe_model_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pool", type=int, default=256)
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    te, ae = load_text_encoder(recipe.text_encoder), load_autoencoder(recipe.autoencoder)
    cfg = recipe_model_config(recipe)
    peaks = {"fp32": matmul_peak(torch.float32) * 1e9, "bf16": matmul_peak(torch.bfloat16) * 1e9}
    print(f"{torch.get_num_threads()} threads; matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'stage':14s} {'px':>4s} {'batch':>5s} {'tokens':>11s} {'samples/s':>10s} {'GFLOP/sample':>13s} "
          f"{'% peak':>7s}")
    for stage in recipe.stages:
        stage.data.pool = min(stage.data.pool, args.pool)
        torch.manual_seed(0)
        model = init_weights(DiT(cfg)).train()
        objective = FlowMatching(stage.objective, model, sampling_from_dict(recipe.sampling),
                                 ae.compression * cfg.patch, stage.steps)
        params = torch.nn.ModuleList([model, objective])
        opt = torch.optim.AdamW(param_groups([params], 0.1), lr=1e-4)
        data = StageData(stage.data, stage.seed, te, ae, cfg.patch, progress=False)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if stage.precision == "bf16" else nullcontext()
        flops, times, n_txt = 0.0, [], []
        for step in range(args.steps + 3):
            t = time.perf_counter()
            batch = data.batch(step, stage.batch_size)
            with autocast:
                loss, _ = objective(model, batch, step, torch.Generator().manual_seed(step))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 3:  # warm-up excluded
                times.append(time.perf_counter() - t)
                flops += dit_train_flops(cfg, batch.x0.shape[1], batch.context.shape[1]) * stage.batch_size
                n_txt.append(batch.context.shape[1])
        seconds = sum(times)
        samples = args.steps * stage.batch_size
        tokens = f"{batch.x0.shape[1]}+{max(n_txt)}txt"
        print(f"{stage.name:14s} {stage.data.native:4d} {stage.batch_size:5d} {tokens:>11s} "
              f"{samples / seconds:10.1f} {flops / samples / 1e9:13.2f} "
              f"{100 * flops / seconds / peaks[stage.precision]:6.0f}%")


if __name__ == "__main__":
    main()
