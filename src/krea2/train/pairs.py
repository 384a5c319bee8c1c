"""Preference pairs for Diffusion-DPO / STPO, sampled from the current model and judged by a reward.

On-policy (the release's first PO stage): G images per prompt from the model, scored by a reward (the world rubric by
default); the best and the worst of the group become winner and loser, and a group whose scores tie gives no pair.
Off-policy: the prompt's ground-truth render as the winner against the group's worst sample. Strict (a calibration
stage): only pairs whose winner passes the exact checker and whose loser fails it.
Prompts come from the world's caption grammar (long captions of fresh scenes, never the evaluation files); the
scene record is what the reward checks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from krea2.errors import Krea2Error
from krea2.train.data import PROMPT_SEED, write_pairs

KINDS = ("onpolicy", "offpolicy", "both")


def sample_pairs(pipe, n_prompts: int, group_size: int = 4, size: int | None = None, seed: int = 0,
                 reward: str = "world_rubric", kind: str = "onpolicy", strict: bool = False,
                 batch_prompts: int = 16, progress: bool = True) -> tuple[list[str], list, list, list[dict]]:
    """(captions, winners, losers, metas): winners/losers (H, W, 3) uint8. pipe: a krea2.pipeline.Pipeline."""
    from krea2.data.world import world_examples
    from krea2.rewards import get_reward

    if kind not in KINDS:
        raise Krea2Error(f"pair kind {kind!r} unknown; choose one of {list(KINDS)}")
    if group_size < 2 or n_prompts < 1:
        raise Krea2Error("needs --group >= 2 and --prompts >= 1")
    size = size or pipe.resolution
    score, passes = get_reward(reward), get_reward("world_strict")
    examples = list(world_examples(n_prompts, size, PROMPT_SEED + 7919 * seed))
    captions, winners, losers, metas = [], [], [], []
    bar = tqdm(total=n_prompts, desc="sampling pairs", unit="prompt", disable=not progress)
    for start in range(0, n_prompts, batch_prompts):
        chunk = examples[start:start + batch_prompts]
        prompts = [ex.captions["long"] for ex in chunk for _ in range(group_size)]
        records = [ex.meta["scene"] for ex in chunk for _ in range(group_size)]
        images = pipe.generate(prompts, seed=seed * 1_000_003 + start * group_size, width=size, height=size)
        r = score(images, records).view(len(chunk), group_size)
        ok = passes(images, records).view(len(chunk), group_size)
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pixels = pixels.reshape(len(chunk), group_size, *pixels.shape[1:])
        for i, ex in enumerate(chunk):
            best, worst = int(r[i].argmax()), int(r[i].argmin())
            if kind in ("onpolicy", "both") and r[i, best] > r[i, worst] and (not strict or ok[i, best] > ok[i, worst]):
                captions.append(ex.captions["long"])
                winners.append(pixels[i, best])
                losers.append(pixels[i, worst])
                metas.append({"kind": "onpolicy", "reward_w": float(r[i, best]), "reward_l": float(r[i, worst])})
            if kind in ("offpolicy", "both") and r[i, worst] < 1 and (not strict or not ok[i, worst]):
                captions.append(ex.captions["long"])
                winners.append(np.asarray(ex.image))
                losers.append(pixels[i, worst])
                metas.append({"kind": "offpolicy", "reward_w": 1.0, "reward_l": float(r[i, worst])})
        bar.update(len(chunk))
    bar.close()
    return captions, winners, losers, metas


def write_sampled_pairs(checkpoint: str, out: str | Path, n_prompts: int, group_size: int = 4, size: int | None = None,
                        seed: int = 0, kind: str = "onpolicy", strict: bool = False, progress: bool = True) -> dict:
    """Sample pairs from a checkpoint and write them as a Parquet pairs file; returns counts per kind."""
    from krea2.pipeline import load_pipeline

    out = Path(out)
    if out.exists():
        raise Krea2Error(f"{out} exists; choose another --out (pairs are never overwritten)")
    pipe = load_pipeline(checkpoint)
    captions, winners, losers, metas = sample_pairs(pipe, n_prompts, group_size, size, seed, kind=kind,
                                                    strict=strict, progress=progress)
    if not captions:
        raise Krea2Error("no pairs: every group tied (the model is always right or always wrong on these prompts)")
    write_pairs(out, captions, winners, losers, metas)
    counts = {k: sum(m["kind"] == k for m in metas) for k in ("onpolicy", "offpolicy")}
    return {"pairs": len(captions), **counts,
            "mean_reward_gap": float(np.mean([m["reward_w"] - m["reward_l"] for m in metas]))}
