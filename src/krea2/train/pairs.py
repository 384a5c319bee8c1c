"""Preference pairs for Diffusion-DPO / STPO, sampled from the current model and judged by a reward.

On-policy (the release's first PO stage): G images per prompt from the model, scored by a reward (the world rubric by
default); the best and the worst of the group become winner and loser, and a group whose scores tie gives no pair.
Off-policy: the prompt's ground-truth render as the winner against the group's worst sample. Strict (a calibration
stage): only pairs whose winner passes the exact checker and whose loser fails it.
Prompts come from the world's caption grammar (long captions of fresh scenes, never the evaluation files); the
scene record is what the reward checks.
Style (the style system's preference step, `objectives/style_po.py`): G images per prompt drawn with a style
reference by a style adapter, judged by style accuracy minus leakage (`sample_style_pairs`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from krea2.errors import Krea2Error
from krea2.pipeline import to_uint8
from krea2.train.data import PROMPT_SEED, write_pairs

KINDS = ("onpolicy", "offpolicy", "both")  # sample_pairs; "style" is sample_style_pairs


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
        pixels = to_uint8(images)
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


def style_reward(det, record: dict, ref_scenes: list[dict], content_weight: float = 0.25) -> float:
    """What a style pair is judged by: 1 if the image is in the reference's style, minus 1 if it leaks a reference
    object the prompt did not ask for (`krea2.eval.style_eval.leaks`), plus content_weight if the checker passes the
    prompt's own requirements (a tie-break that keeps the prompt's content from being traded for style). Range
    [-1, 1 + content_weight]."""
    from krea2.eval import checker
    from krea2.eval.style_eval import content_record, leaks

    return (float(det.style == ref_scenes[0]["style"]) - float(leaks(det, record, ref_scenes))
            + content_weight * float(checker.matches(det, content_record(record))))


def sample_style_pairs(pipe, encoder, n_prompts: int, group_size: int = 4, seed: int = 0,
                       content_weight: float = 0.25, progress: bool = True):
    """Pairs drawn with a style reference: (captions, winners, losers, metas, references), images (H, W, 3) uint8.

    Prompts are the evaluation families' grammar from a training seed range (`make_eval_prompts`, never the public
    file's seeds); each gets one reference of a random style, rendered from a random scene of that style
    (`krea2.eval.style_eval.references`, so its objects are known), and `group_size` images at strength 1 from the
    adapter `encoder` (`krea2.style.load_style_encoder`). The best and the worst by `style_reward` make a pair; a
    group whose rewards tie gives none."""
    from krea2.data.world import STYLES, TAGS, make_eval_prompts
    from krea2.eval import checker
    from krea2.eval.style_eval import references
    from krea2.pipeline import to_pil
    from krea2.style import mix_references

    if group_size < 2 or n_prompts < 1:
        raise Krea2Error("needs --group >= 2 and --prompts >= 1")
    records = make_eval_prompts(-(-n_prompts // len(TAGS)), seed=PROMPT_SEED + 7919 * seed + 1)[:n_prompts]
    rng = np.random.default_rng([PROMPT_SEED, seed])
    captions, winners, losers, metas, refs = [], [], [], [], []
    for i, rec in enumerate(tqdm(records, desc="sampling style pairs", unit="prompt", disable=not progress)):
        rec = {**rec, "refs": [{"style": STYLES[int(rng.integers(len(STYLES)))], "weight": 1.0}]}
        pixels, weights, scenes = references(rec, i, pipe.resolution, PROMPT_SEED + seed)
        with torch.no_grad():
            tokens = encoder(pixels.to(pipe.device))
        mix = mix_references([tokens[:1]], weights, 1.0, **encoder.injection_kwargs)
        images = pipe.generate([rec["prompt"]] * group_size, seed=seed * 1_000_003 + i * group_size, style=mix)
        r = np.array([style_reward(checker.detect(im), rec, scenes, content_weight) for im in to_pil(images)])
        best, worst = int(r.argmax()), int(r.argmin())
        if r[best] == r[worst]:
            continue
        pixels_u8, ref_u8 = to_uint8(images), to_uint8(pixels[0])
        captions.append(rec["prompt"])
        winners.append(pixels_u8[best])
        losers.append(pixels_u8[worst])
        refs.append(ref_u8)
        metas.append({"kind": "style", "tag": rec["tag"], "style": scenes[0]["style"], "reward_w": float(r[best]),
                      "reward_l": float(r[worst])})
    return captions, winners, losers, metas, refs


def write_sampled_pairs(checkpoint: str, out: str | Path, n_prompts: int, group_size: int = 4, size: int | None = None,
                        seed: int = 0, kind: str = "onpolicy", strict: bool = False, progress: bool = True,
                        style_encoder: str | None = None) -> dict:
    """Sample pairs from a checkpoint and write them as a Parquet pairs file; returns counts per kind. kind "style"
    samples with the style adapter `style_encoder` (a `style_pairs` data source; size is the checkpoint's)."""
    from krea2.pipeline import load_pipeline

    out = Path(out)
    if out.exists():
        raise Krea2Error(f"{out} exists; choose another --out (pairs are never overwritten)")
    if kind not in (*KINDS, "style"):
        raise Krea2Error(f"pair kind {kind!r} unknown; choose one of {[*KINDS, 'style']}")
    if kind == "style" and style_encoder is None:
        raise Krea2Error("--kind style needs --style-encoder (the adapter to sample with)")
    if kind != "style" and style_encoder is not None:
        raise Krea2Error("--style-encoder only goes with --kind style")
    if kind == "style":
        from krea2.style import check_style_encoder, load_style_encoder

        if size:
            raise Krea2Error("--size does not go with --kind style (it samples at the checkpoint's size)")
        if strict:
            raise Krea2Error("--strict does not go with --kind style")
        encoder = load_style_encoder(style_encoder)  # a bad adapter fails before the checkpoint loads
        encoder.check_reads_tokens(style_encoder)  # the style_po stage these pairs feed trains it: refuse now
        pipe = load_pipeline(checkpoint)
        encoder = encoder.to(pipe.device)
        check_style_encoder(encoder, pipe.model)
        captions, winners, losers, metas, references = sample_style_pairs(pipe, encoder, n_prompts, group_size,
                                                                          seed, progress=progress)
    else:
        pipe, references = load_pipeline(checkpoint), None
        captions, winners, losers, metas = sample_pairs(pipe, n_prompts, group_size, size, seed, kind=kind,
                                                        strict=strict, progress=progress)
    if not captions:
        raise Krea2Error("no pairs: every group tied (the model is always right or always wrong on these prompts)")
    write_pairs(out, captions, winners, losers, metas, references)
    kinds = ("style",) if kind == "style" else ("onpolicy", "offpolicy")
    return {"pairs": len(captions), **{k: sum(m["kind"] == k for m in metas) for k in kinds},
            "mean_reward_gap": float(np.mean([m["reward_w"] - m["reward_l"] for m in metas]))}
