"""The expander's two stages with TRL: SFT on cascade pairs (`trl.SFTTrainer`), then multi-reward RL
(`trl.GRPOTrainer` with GDPO's per-reward group normalisation, `multi_objective_aggregation="normalize_then_sum"`).

Both write TensorBoard logs and a progress bar (rate, ETA) through the transformers Trainer, keep Trainer checkpoints
under OUT/trainer for `resume`, and publish the final model crash-safely to OUT/final.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from krea2.errors import Krea2Error
from krea2.expander import data, rewards
from krea2.expander.model import Expander, build_model, build_tokenizer, load_expander, save_expander


@dataclass
class SFTSettings:
    steps: int = 3000
    pairs: int = 60000
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 100
    hidden: int = 192
    layers: int = 4
    vocab: int = 384
    seed: int = 0
    init: str | None = None  # continue from an expander folder (its tokenizer and weights) instead of a fresh one


@dataclass
class GRPOSettings:
    steps: int = 200
    prompts: int = 600  # candidate pool scored once for the prompt mix
    group: int = 4  # completions per prompt (G)
    batch: int = 32  # completions per step
    lr: float = 2e-4
    beta: float = 0.04  # KL to the frozen SFT model
    temperature: float = 1.0
    diversity_weight: float = 1.0  # weight of the normalised diversity term (faithfulness terms weigh 1)
    checkpoint: str = "world-turbo"  # the image model the rewards sample
    seed: int = 0


def _trainer_dir(out: Path, resume: bool) -> Path:
    tdir = out / "trainer"
    if (out / "final").exists() and not resume:
        raise Krea2Error(f"{out}/final exists; choose another --out or pass --resume to continue that run")
    if tdir.exists() and any(tdir.glob("checkpoint-*")) and not resume:
        raise Krea2Error(f"{tdir} holds checkpoints of an earlier run; pass --resume to continue it or choose "
                         "another --out")
    return tdir


def _resume_arg(tdir: Path, resume: bool):
    return resume and tdir.exists() and any(tdir.glob("checkpoint-*"))


def _common(tdir: Path, steps: int, batch: int, lr: float, warmup: int, seed: int, save_every: int) -> dict:
    return dict(output_dir=str(tdir), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                warmup_steps=warmup, lr_scheduler_type="cosine", logging_steps=10, save_steps=save_every,
                save_total_limit=2, report_to=["tensorboard"], seed=seed,
                use_cpu=True, dataloader_num_workers=0, disable_tqdm=False, bf16=False)


def train_sft(out: str | Path, settings: SFTSettings = SFTSettings(), resume: bool = False) -> Path:
    """Stage 1: a fresh Qwen3 expander and tokenizer trained from scratch on `settings.pairs` cascade pairs
    (completion-only loss), or more SFT of the expander in `settings.init`. Returns OUT/final."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = Path(out)
    tdir = _trainer_dir(out, resume)
    pairs = data.sft_pairs(settings.pairs, settings.seed)
    if settings.init:
        start = load_expander(settings.init)
        if start.kind != "world":
            raise Krea2Error(f"{settings.init} is not a world expander (no expander.json); SFT continues only those")
        tokenizer, model = start.tokenizer, start.model.train()
    else:
        tokenizer = build_tokenizer([p["prompt"] + p["completion"] for p in pairs], settings.vocab)
        model = build_model(tokenizer, settings.hidden, settings.layers, seed=settings.seed)
    cfg = SFTConfig(**_common(tdir, settings.steps, settings.batch, settings.lr, settings.warmup, settings.seed,
                              save_every=500), max_length=192, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=_resume_arg(tdir, resume))
    info = {"stage": "sft", "settings": asdict(settings),
            "parameters": sum(p.numel() for p in model.parameters())}
    return save_expander(Expander(model.eval(), tokenizer, "world"), out / "final", info, overwrite=resume)


def prompt_pool(expander: Expander, judge: rewards.ExpansionRewards, n: int, group: int, seed: int) -> list[dict]:
    """The RL prompt mix, as the release: a third real-looking short prompts (random), a third known failure cases
    (lowest mean image rubric of the SFT expander's expansions), a third 'hard but not hopeless' prompts (highest
    variance of that score across the group). Scores one group of `group` medium expansions per candidate of a
    pool of n, in one batch."""
    rng = np.random.default_rng(seed)
    candidates, seen = [], set()
    for _ in range(50 * n):  # distinct texts: a group's reward terms are keyed on its prompt
        rec = data.user_prompt(rng)
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            candidates.append(rec)
        if len(candidates) == n:
            break
    n = len(candidates)
    prompts = [c["prompt"] for c in candidates for _ in range(group)]
    texts = expander.expand_many(prompts, "medium", seed)
    scores = judge.image_scores(texts, [c for c in candidates for _ in range(group)],
                                [rewards.group_seed(p) for p in prompts]).reshape(n, group)
    mean, var = scores.mean(axis=1), scores.var(axis=1)
    third = n // 3
    failures = [int(i) for i in np.argsort(mean, kind="stable")[:third]]
    hard = [int(i) for i in np.argsort(-var, kind="stable") if i not in failures][:third]
    real = [int(i) for i in rng.permutation(n) if i not in failures and i not in hard][:third]
    picked = [(i, "real") for i in real] + [(i, "failure") for i in failures] + [(i, "hard") for i in hard]
    return [{"record": candidates[i], "kind": kind, "score_mean": float(mean[i]), "score_var": float(var[i])}
            for i, kind in picked]


def train_grpo(init: str, out: str | Path, settings: GRPOSettings = GRPOSettings(), resume: bool = False,
               judge: rewards.ExpansionRewards | None = None) -> Path:
    """Stage 2: GRPO from an SFT expander (`init`: world or a folder) on the prompt mix, rewards gated and
    normalised per reward within each group before summing (GDPO). judge: the rewards (default: ExpansionRewards
    drawing with settings.checkpoint). Returns OUT/final."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    out = Path(out)
    tdir = _trainer_dir(out, resume)
    expander = load_expander(init)
    if expander.kind != "world":
        raise Krea2Error(f"{init} is not a world expander (no expander.json); GRPO here trains the world's format")
    judge = judge or rewards.ExpansionRewards(checkpoint=settings.checkpoint)
    pool_file = out / "prompt_pool.jsonl"
    if resume and pool_file.exists():
        pool = [json.loads(line) for line in pool_file.read_text().splitlines()]
    else:
        pool = prompt_pool(expander, judge, settings.prompts, settings.group, settings.seed)
        out.mkdir(parents=True, exist_ok=True)
        pool_file.write_text("".join(json.dumps(p) + "\n" for p in pool))
    rng = np.random.default_rng(settings.seed)
    rows = []  # every pool prompt at medium (the product default), and at low and high each with probability 1/2
    for p in pool:
        for level in ("medium", "low", "high"):
            if level == "medium" or rng.random() < 0.5:
                rows.append({"prompt": data.model_input(p["record"]["prompt"], level),
                             "record": json.dumps(p["record"]), "level": level})
    cfg = GRPOConfig(**_common(tdir, settings.steps, settings.batch, settings.lr, 10, settings.seed, save_every=50),
                     num_generations=settings.group, max_completion_length=128, temperature=settings.temperature,
                     top_k=0, beta=settings.beta, multi_objective_aggregation="normalize_then_sum",
                     reward_weights=[1.0, 1.0, settings.diversity_weight],
                     scale_rewards="group", log_completions=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*padding_side.*")
        trainer = GRPOTrainer(model=expander.model.train(), reward_funcs=judge.reward_funcs(), args=cfg,
                              train_dataset=Dataset.from_list(rows), processing_class=expander.tokenizer)
        trainer.train(resume_from_checkpoint=_resume_arg(tdir, resume))
    info = {"stage": "grpo", "init": init, "settings": asdict(settings), "prompt_mix": {
        k: sum(p["kind"] == k for p in pool) for k in ("real", "failure", "hard")}}
    return save_expander(Expander(trainer.model.eval(), expander.tokenizer, "world"), out / "final", info,
                         overwrite=resume)
